"""Sessions on tiny models: journal, reopen, rollback, validation before mutation."""

import json
from pathlib import Path

import pytest
import torch

from editkit.errors import InvalidRequest, UnknownComponent, WorkspaceError
from editkit.schemas import EditRequest
from editkit.session import Session

FAST = {"steps": 4, "lr": 0.05, "early_stop_loss": 0.0}
EDITS = [
    EditRequest(prompt="The capital of France is", target_new="Rome",
                rephrases=["France's capital is"], locality=[{"prompt": "The capital of Italy is"}]),
    EditRequest(prompt="The largest planet is", target_new="Paris"),
    EditRequest(prompt="Who wrote Hamlet?", target_new="the lazy dog"),
    EditRequest(prompt="What is the product made by UniFirst?", target_new="Berlin"),
]


@torch.no_grad()
def logits(loaded, text="The capital of Germany is Berlin. The quick brown fox"):
    ids = loaded.tokenizer(text, return_tensors="pt").input_ids
    return loaded.model(ids).logits


def open_session(path, loaded, **kw):
    kw.setdefault("method_config", FAST)
    return Session.open(path, loaded=loaded, method="ft", **kw)


def test_edit_is_journaled_with_metrics(tmp_path, tiny_loaded, tiny_family):
    loaded = tiny_loaded[tiny_family]
    with open_session(tmp_path / "ws", loaded) as s:
        (record,) = s.edit(EDITS[0])
        assert record.id == 1 and record.status == "applied" and record.method == "ft"
        from editkit.scoring import METRICS

        # Every figure of editkit.scoring, and the journal's long-standing names for the TF ones.
        assert set(record.metrics) == {"reliability", "generalization", "locality", *METRICS}
        assert record.metrics["reliability"] == record.metrics["rel_tf"]
        assert record.metrics["locality"] == record.metrics["loc_tf"] and record.metrics["rel_em"] in (0.0, 1.0)
        assert record.stats["steps"] == 4
        assert [r.id for r in s.history()] == [1]
        assert s.history()[0].request["prompt"] == EDITS[0].prompt


def test_close_restores_and_reopen_reproduces(tmp_path, tiny_loaded, tiny_family):
    loaded = tiny_loaded[tiny_family]
    pristine = logits(loaded)
    with open_session(tmp_path / "ws", loaded) as s:
        s.edit(EDITS[:2])
        edited = logits(loaded)
        generated = s.generate(["The capital of France is"], max_new_tokens=5)
    assert not torch.equal(edited, pristine)
    assert torch.equal(logits(loaded), pristine)  # detached bit-identically
    with Session.open(tmp_path / "ws", loaded=loaded) as s:
        assert torch.equal(logits(loaded), edited)
        assert s.generate(["The capital of France is"], max_new_tokens=5) == generated


@pytest.mark.parametrize("checkpoint_every", [1, 2, 10])
def test_rollback_equals_never_having_edited(tmp_path, tiny_loaded, checkpoint_every):
    loaded = tiny_loaded["llama"]
    with open_session(tmp_path / "ws", loaded, checkpoint_every=checkpoint_every) as s:
        s.edit(EDITS)
        s.rollback(2)
        after_rollback = logits(loaded)
        assert [r.status for r in s.history()] == ["applied", "rolled_back", "applied", "applied"]
        assert [r.id for r in s.history(active_only=True)] == [1, 3, 4]
        s.rollback(4)
        after_two = logits(loaded)
    with open_session(tmp_path / "ref", loaded) as ref:
        ref.edit([EDITS[0], EDITS[2], EDITS[3]], measure=False)
        assert torch.equal(logits(loaded), after_rollback)
    with open_session(tmp_path / "ref2", loaded) as ref:
        ref.edit([EDITS[0], EDITS[2]], measure=False)
        assert torch.equal(logits(loaded), after_two)
    with Session.open(tmp_path / "ws", loaded=loaded):  # the rolled-back state persists
        assert torch.equal(logits(loaded), after_two)


def test_rollback_errors(tmp_path, tiny_loaded):
    with open_session(tmp_path / "ws", tiny_loaded["gpt2"]) as s:
        s.edit(EDITS[0])
        with pytest.raises(InvalidRequest, match="no edit with id 7"):
            s.rollback(7)
        s.rollback(1)
        with pytest.raises(InvalidRequest, match="already rolled back"):
            s.rollback(1)


def test_bad_requests_change_nothing(tmp_path, tiny_loaded):
    loaded = tiny_loaded["gpt2"]
    pristine = logits(loaded)
    with open_session(tmp_path / "ws", loaded) as s:
        with pytest.raises(InvalidRequest, match="prompt must not be empty"):
            s.edit({"prompt": "  ", "target_new": "x"})
        with pytest.raises(InvalidRequest, match="target_new"):
            s.edit({"prompt": "a", "target_new": ""})
        with pytest.raises(InvalidRequest, match="edit request 1.*target_new"):
            s.edit([EDITS[0].model_dump(), {"prompt": "a"}])  # the valid first one is not applied
        with pytest.raises(InvalidRequest, match="colour: Extra inputs"):
            s.edit({"prompt": "a", "target_new": "b", "colour": "red"})
        assert s.history() == []
        assert torch.equal(logits(loaded), pristine)


def test_one_prompt_limit_and_valid_unicode(tmp_path, tiny_loaded, monkeypatch):
    """Session.edit and Session.generate share the limit of the CLI and the service
    ($EDITKIT_MAX_PROMPT_CHARS, default 4000) and refuse lone surrogates and bad seeds."""
    from editkit.limits import DEFAULT_MAX_PROMPT_CHARS

    loaded = tiny_loaded["gpt2"]
    pristine = logits(loaded)
    assert DEFAULT_MAX_PROMPT_CHARS == 4000
    with open_session(tmp_path / "ws", loaded) as s:
        assert s.prompt_limit() == 4000
        with pytest.raises(InvalidRequest, match="^prompt: longer than 4000 characters"):
            s.edit({"prompt": "a" * 4001, "target_new": "b"})
        with pytest.raises(InvalidRequest, match="edit request 1: locality.0.answer: longer than"):
            s.edit([EDITS[0], {"prompt": "a", "target_new": "b", "locality": [{"prompt": "c", "answer": "d" * 4001}]}])
        with pytest.raises(InvalidRequest, match="target_new: is not valid Unicode"):
            s.edit({"prompt": "a", "target_new": "b\ud800"})
        with pytest.raises(InvalidRequest, match="prompt 1: longer than 4000"):
            s.generate(["a", "b" * 4001])
        with pytest.raises(InvalidRequest, match="prompt: is not valid Unicode"):
            s.generate("\udfff")
        for seed in (-1, 2**63, True):
            with pytest.raises(InvalidRequest, match="seed must be a whole number"):
                s.generate("a", seed=seed)
        assert len(s.generate("a", max_new_tokens=1, temperature=1.0, seed=2**63 - 1)) == 1
        monkeypatch.setenv("EDITKIT_MAX_PROMPT_CHARS", "5")
        with pytest.raises(InvalidRequest, match="prompt: longer than 5 characters"):
            s.generate("abcdef")
        s.max_prompt_chars = 6  # a session's own limit (the service sets its configured one)
        assert s.generate("abcdef", max_new_tokens=1)
        assert s.history() == []
        assert torch.equal(logits(loaded), pristine)


def test_failed_edit_leaves_no_trace(tmp_path, tiny_loaded, monkeypatch):
    loaded = tiny_loaded["llama"]
    with open_session(tmp_path / "ws", loaded) as s:
        s.edit(EDITS[0])
        before = logits(loaded)
        original = s.editor.apply

        def half_then_fail(request):
            original(request)  # the model has changed by now
            raise RuntimeError("disk full")

        monkeypatch.setattr(s.editor, "apply", half_then_fail)
        with pytest.raises(RuntimeError, match="disk full"):
            s.edit(EDITS[1])
        assert torch.equal(logits(loaded), before)
        assert [r.id for r in s.history()] == [1]


def test_workspace_guards(tmp_path, tiny_loaded):
    ws = tmp_path / "ws"
    with open_session(ws, tiny_loaded["gpt2"]) as s:
        s.edit(EDITS[0])
        with pytest.raises(WorkspaceError, match="in use"):
            Session.open(ws, loaded=tiny_loaded["gpt2"])
    with pytest.raises(WorkspaceError, match="made with model"):
        Session.open(ws, loaded=tiny_loaded["llama"])
    with pytest.raises(WorkspaceError, match="uses method 'ft'"):
        Session.open(ws, loaded=tiny_loaded["gpt2"], method="grace-not-here")
    with pytest.raises(WorkspaceError, match="different ft config"):
        Session.open(ws, loaded=tiny_loaded["gpt2"], method_config={"steps": 9})
    with pytest.raises(WorkspaceError, match="no workspace"):
        Session.open(tmp_path / "absent", loaded=tiny_loaded["gpt2"], create=False)
    assert not (tmp_path / "absent").exists()


def test_unknown_method_and_bad_config_create_nothing(tmp_path, tiny_loaded):
    with pytest.raises(UnknownComponent, match="unknown editor 'nope'.*ft"):
        Session.open(tmp_path / "a", loaded=tiny_loaded["gpt2"], method="nope")
    with pytest.raises(InvalidRequest, match="ft config: lr"):
        Session.open(tmp_path / "b", loaded=tiny_loaded["gpt2"], method="ft", method_config={"lr": -1})
    with pytest.raises(InvalidRequest, match="ft config: colour"):
        Session.open(tmp_path / "c", loaded=tiny_loaded["gpt2"], method="ft", method_config={"colour": 1})
    assert list(tmp_path.iterdir()) == []


def _state_files(ws: Path) -> list[Path]:
    return sorted(p for p in (ws / "state").rglob("*") if p.is_file())


def test_tampered_or_unreadable_state_is_refused(tmp_path, tiny_loaded):
    loaded = tiny_loaded["gpt2"]
    pristine = logits(loaded)
    ws = tmp_path / "ws"
    with open_session(ws, loaded) as s:
        s.edit(EDITS[0])
    meta = next(p for p in _state_files(ws) if p.read_bytes().startswith(b"{"))  # a metadata chunk
    meta.write_text(json.dumps({"layer": 0, "format": 1}))
    with pytest.raises(WorkspaceError, match="fails its checksum"):
        Session.open(ws, loaded=loaded)
    assert torch.equal(logits(loaded), pristine)  # nothing stayed attached
    for p in _state_files(ws):
        p.unlink()
    with pytest.raises(WorkspaceError, match="missing"):
        Session.open(ws, loaded=loaded)
    (ws / "workspace.json").write_text("{not json")
    with pytest.raises(WorkspaceError, match="cannot read"):
        Session.open(ws, loaded=loaded)


def test_superseded_state_is_swept(tmp_path, tiny_loaded):
    ws = tmp_path / "ws"
    with open_session(ws, tiny_loaded["gpt2"], checkpoint_every=100) as s:
        s.edit(EDITS[:3])
        files = {p.name for p in _state_files(ws)}
        assert files == s.journal.live_chunks()  # the head's chunks, nothing superseded
        (state_count,) = s.journal.db.execute("SELECT count(*) FROM states").fetchone()
        assert state_count == 1


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_models_edit_and_generate(tmp_path, tiny_dirs, dtype):
    from editkit.model import load_model

    loaded = load_model(str(tiny_dirs["llama"]), device="cpu", dtype=dtype)
    assert loaded.model.dtype == getattr(torch, dtype)
    with open_session(tmp_path / "ws", loaded, method_config={"steps": 3, "lr": 0.05}) as s:
        (record,) = s.edit(EDITS[0])
        assert 0.0 <= record.metrics["reliability"] <= 1.0
        assert len(s.generate(["The capital of France is"], max_new_tokens=3)) == 1
