"""`editkit export` / Session.export: weight-change edits become a plain checkpoint that
transformers loads with the edited model's logits; routing methods refuse and write nothing."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from editkit.errors import InvalidRequest
from editkit.session import Session

FAST = {"steps": 4, "lr": 0.05, "early_stop_loss": 0.0}
EDITS = [{"prompt": "The capital of France is", "target_new": "Rome"},
         {"prompt": "Who wrote Hamlet?", "target_new": "the lazy dog"}]
TEXT = "The capital of France is Paris. Who wrote Hamlet? The quick brown fox"


@torch.no_grad()
def logits(model, tokenizer, text=TEXT):
    return model(tokenizer(text, return_tensors="pt").input_ids).logits


def test_ft_exports_a_checkpoint_with_the_edited_logits(tmp_path, tiny_loaded, tiny_family):
    loaded = tiny_loaded[tiny_family]
    pristine = logits(loaded.model, loaded.tokenizer)
    with Session.open(tmp_path / "ws", loaded=loaded, method="ft", method_config=FAST) as s:
        s.edit(EDITS)
        edited = logits(loaded.model, loaded.tokenizer)
        out = s.export(tmp_path / "out")
        assert torch.equal(logits(loaded.model, loaded.tokenizer), edited)  # the session's model is as it was
    assert torch.equal(logits(loaded.model, loaded.tokenizer), pristine)
    plain = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    exported = logits(plain, tokenizer)
    assert not torch.allclose(exported, pristine, atol=1e-4)
    assert torch.allclose(exported, edited, atol=1e-5), (exported - edited).abs().max()
    assert torch.equal(exported.argmax(-1), edited.argmax(-1))
    card = (out / "README.md").read_text()
    assert loaded.fingerprint in card and "`ft`" in card and "The capital of France is" in card
    assert "| 2 | Who wrote Hamlet? | the lazy dog |" in card


def test_ultraedit_exports_the_weights_it_wrote(tmp_path, tiny_loaded):
    loaded = tiny_loaded["gpt_neox"]
    pristine = logits(loaded.model, loaded.tokenizer)
    with Session.open(tmp_path / "ws", loaded=loaded, method="ultraedit") as s:
        s.edit(EDITS, measure=False)
        edited = logits(loaded.model, loaded.tokenizer)
        out = s.export(tmp_path / "out")
    exported = logits(AutoModelForCausalLM.from_pretrained(out), loaded.tokenizer)
    assert torch.equal(exported, edited) and not torch.equal(exported, pristine)


def test_ph3_heads_fold_into_the_output_projection(tmp_path, tiny_loaded):
    loaded = tiny_loaded["llama"]
    with Session.open(tmp_path / "ws", loaded=loaded, method="ft", method_config=FAST) as s:
        s.edit(EDITS[0])
        s.add_intervention("ph3", {"favour": "memory"},
                           state=({"heads": torch.tensor([[1, 0], [1, 2], [3, 1]])}, {"k": 3, "kind": "context"}))
        served = logits(loaded.model, loaded.tokenizer)
        out = s.export(tmp_path / "out")
    exported = logits(AutoModelForCausalLM.from_pretrained(out), loaded.tokenizer)
    assert torch.allclose(exported, served, atol=1e-5)
    assert "intervention: `ph3`" in (out / "README.md").read_text()


@pytest.mark.parametrize("method, config, reason", [
    ("grace", {"steps": 2}, "codebook"),
    ("wise", {"steps": 2, "n_contexts": 0, "unrelated_per_edit": 2, "replay": 0}, "routes each sequence"),
    ("nmc", {"fast_steps": 0, "slow_steps": 2}, "key-value memory"),
])
def test_routing_methods_refuse_and_write_nothing(tmp_path, tiny_loaded, method, config, reason):
    with Session.open(tmp_path / "ws", loaded=tiny_loaded["gpt2"], method=method, method_config=config) as s:
        s.edit(EDITS[0], measure=False)
        with pytest.raises(InvalidRequest, match=f"{method} cannot be exported as plain weights: .*{reason}"):
            s.export(tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ws"]


def test_export_refuses_a_used_directory_and_pushes_through_huggingface_hub(tmp_path, tiny_loaded, tiny_dirs,
                                                                          monkeypatch):
    from typer.testing import CliRunner

    from editkit.cli.main import build_app

    loaded = tiny_loaded["gpt2"]
    with Session.open(tmp_path / "ws", loaded=loaded, method="ft", method_config=FAST) as s:
        s.edit(EDITS[0], measure=False)
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "keep.txt").write_text("mine")
    calls = []

    class StubApi:  # no network in tests: huggingface_hub's client, stood in for
        def __init__(self, token=None):
            calls.append(("init", token))

        def create_repo(self, repo_id, private, exist_ok):
            calls.append(("create", repo_id, private, exist_ok))

        def upload_folder(self, repo_id, folder_path, commit_message):
            calls.append(("upload", repo_id, sorted(p.name for p in __import__("pathlib").Path(folder_path).iterdir())))
            return type("Info", (), {"commit_url": f"https://hub.example/{repo_id}/commit/1"})()

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", StubApi)
    monkeypatch.setenv("HF_TOKEN", "t0ken")
    app, model = build_app(), ["--model", str(tiny_dirs["gpt2"]), "--device", "cpu"]
    result = CliRunner().invoke(app, ["export", "-w", str(tmp_path / "ws"), "--out", str(tmp_path / "used"), *model])
    assert result.exit_code == 1 and "not an empty directory" in result.stderr
    assert (tmp_path / "used" / "keep.txt").read_text() == "mine"
    result = CliRunner().invoke(app, ["export", "-w", str(tmp_path / "ws"), "--out", str(tmp_path / "out"),
                                      "--push-to-hub", "me/edited", *model])
    assert result.exit_code == 0, result.output
    assert "pushed to https://hub.example/me/edited/commit/1" in result.stdout
    assert calls[0] == ("init", "t0ken") and calls[1] == ("create", "me/edited", True, True)
    assert calls[2][0] == "upload" and "model.safetensors" in calls[2][2] and "README.md" in calls[2][2]
