"""The learned NMC controller: its candidates, that training on simulated streams teaches it the
decisions the rule gets wrong (a fact edited again through a rephrase whose prompt key is far
from the first prompt's), with true and with synthetic (decoupled) gradients, and that the
editor uses a saved controller and refuses a missing or foreign file; `editkit nmc
train-controller` on a tiny model."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from editkit.errors import InvalidRequest
from editkit.plugins.nmc import NMCEditor
from editkit.plugins.nmc.control_train import Fact, Keys, Settings, evaluate_controllers, train_controller
from editkit.plugins.nmc.controller import ControllerNet, candidates, load_controller, save_controller
from editkit.plugins.nmc.memory import Entry, Memory, with_slot
from editkit.schemas import EditRequest

H = 32
SETTINGS = Settings(threshold=0.6, width=0.15, usage_decay=0.99, match_threshold=0.9, match_context=0.8)


def unit(*shape, gen):
    return F.normalize(torch.randn(*shape, generator=gen), dim=-1)


def toward(a: torch.Tensor, cos: float, gen) -> torch.Tensor:
    """A unit vector at cosine `cos` from unit `a`."""
    noise = torch.randn(a.shape, generator=gen)
    noise = F.normalize(noise - (noise @ a) * a, dim=-1)
    return cos * a + (1 - cos**2) ** 0.5 * noise


def synthetic_facts(n: int, seed: int) -> list[Fact]:
    """Facts as the memory sees them: a subject key and token per subject (two facts per subject,
    other relations: prompt keys at cosine ~0.3), and a rephrase with the same subject whose
    prompt key is at cosine 0.6 from the prompt's (below the rule's 0.8)."""
    gen = torch.Generator().manual_seed(seed)
    facts = []
    for s in range(n // 2):
        subject = unit(H, gen=gen)
        relation = unit(H, gen=gen)
        for r in range(2):
            key = relation if r == 0 else toward(relation, 0.3, gen)
            variants = [Keys(key, subject, 1000 + s, 7), Keys(toward(key, 0.6, gen), subject, 1000 + s, 7)]
            facts.append(Fact(variants, f"own{s}-{r}", f"new{s}-{r}", f"subject {s}"))
    return facts


def test_candidates_are_same_token_slots_and_one_fresh_slot():
    gen = torch.Generator().manual_seed(0)
    m = Memory.empty(H, "cpu")
    keys = [unit(H, gen=gen) for _ in range(3)]
    for i, (name, lead) in enumerate([(5, 4), (5, 9), (6, -1)]):
        m = with_slot(m, i, Entry(keys[i], keys[i], name, lead, torch.zeros(H), 0, f"l{i}"), 0.99)
    c = candidates(m, keys[0], keys[0], 5, 4, "l0", capacity=10, read=(0, 0.7))
    assert c.slots == [0, 3] and c.fresh == [False, True]  # slot 1 has another lead, slot 2 another token
    row = dict(zip(["subject", "same_token", "context", "same_label", "usage", "read", "fullness", "fresh"],
                   c.features[0].tolist()))
    assert row["subject"] == pytest.approx(1.0) and row["same_label"] == 1.0 and row["read"] == pytest.approx(0.7)
    assert c.features[1, -1] == 1.0 and c.features[1, -2] == pytest.approx(0.3)
    full = candidates(m, keys[2], keys[2], 6, 1, "x", capacity=3, read=None)
    assert full.slots == [2, int(torch.argmin(m.usage))] and full.fresh == [False, True]


@pytest.mark.parametrize("mode", ["true", "synthetic"])
def test_training_learns_to_rewrite_a_fact_edited_again_through_a_rephrase(mode):
    train, held_out = synthetic_facts(120, seed=1), synthetic_facts(60, seed=2)
    net, _ = train_controller(train, SETTINGS, mode=mode, streams=300, length=24, seed=0)
    scores = evaluate_controllers(held_out, SETTINGS, {"rule": None, "learned": net}, streams=20, length=24)
    rule, learned = scores["rule"], scores["learned"]
    assert rule["again"] < 0.9  # the rule misses rephrased re-edits (prompt keys at 0.6 < 0.8)
    assert learned["again"] >= rule["again"] + 0.1
    assert learned["new"] >= 0.9  # and keeps facts of one subject apart


def test_editor_uses_a_saved_controller_and_refuses_bad_files(tiny_loaded, tmp_path):
    loaded = tiny_loaded["llama"]
    with pytest.raises(InvalidRequest, match="controller_file"):
        NMCEditor.make_config({"controller": "learned"})
    net, _ = train_controller(synthetic_facts(40, seed=3), SETTINGS, mode="true", streams=30, length=16)
    path = tmp_path / "controller.safetensors"
    save_controller(path, net, {"note": "test"})
    assert torch.equal(load_controller(path, "cpu")(torch.ones(2, 8)), net(torch.ones(2, 8)))
    editor = NMCEditor(loaded, {"fast_steps": 0, "slow_steps": 200, "slow_lr": 0.5, "threshold": 0.9,
                                "gate_width": 0.05, "margin": 0.2, "controller": "learned",
                                "controller_file": str(path)})
    editor.attach()
    try:
        calls = []
        original = editor.controller.forward
        editor.controller.forward = lambda x: calls.append(x.shape) or original(x)
        torch.manual_seed(0)
        first = editor.apply(EditRequest(prompt="The capital of Germany is", target_new="Paris", subject="Germany"))
        assert first["action"] == "new" and calls == [(1, 8)]  # an empty memory: one fresh candidate
    finally:
        editor.detach()
    for bad in (tmp_path / "missing.safetensors",):
        with pytest.raises(InvalidRequest, match="not found"):
            NMCEditor(loaded, {"controller": "learned", "controller_file": str(bad)}).attach()
    from editkit.tensorfile import save_tensor_file

    foreign = tmp_path / "foreign.safetensors"
    save_tensor_file(foreign, ControllerNet(16).state_dict(), "editkit.nmc.controller",
                     {"format": 1, "features": ["other"], "top": 4, "width": 16})
    with pytest.raises(InvalidRequest, match="does not fit"):
        load_controller(foreign, "cpu")


def test_train_controller_command_on_a_tiny_model(tiny_dirs, tmp_path):
    from typer.testing import CliRunner

    from conftest import shared_path
    from editkit.cli.main import build_app

    out = tmp_path / "controller.safetensors"
    args = ["nmc", "train-controller", "--out", str(out), "--model", str(tiny_dirs["llama"]), "--records", "8",
            "--held-out", "4", "--streams", "3", "--length", "6", "--data", str(shared_path("counterfact-train")),
            "--held-out-data", str(shared_path("counterfact")), "--json"]
    result = CliRunner().invoke(build_app(), args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["train"]["streams"] == 3 and report["train"]["mode"] == "synthetic"
    assert set(report["held_out"]) == {"rule", "learned"} and report["held_out_facts"] > 4
    assert load_controller(out, "cpu").describe()["features"][0] == "subject"
    tables = CliRunner().invoke(build_app(), args[:-1])  # the readable report
    assert tables.exit_code == 0, tables.output
    assert "held out" in tables.output and "learned" in tables.output and "revert" in tables.output
    result = CliRunner().invoke(build_app(), args[:-1] + ["--mode", "sometimes"])
    assert result.exit_code == 1 and "--mode" in result.output
