"""UltraEdit: mechanics on tiny models of every family (a turn's shift lowers the target loss;
detach is bit-exact; the state - deltas, running statistics, earlier keys' Gram matrices -
survives a safetensors round trip bit for bit, giving identical logits and an identical next
turn; a state that does not fit is refused and nothing changes; the running statistics merge
exactly; single-request turns through a Session), and one effect on the default model (100
CounterFact edits in one turn)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import shared_path
from editkit.errors import InvalidRequest, WorkspaceError
from editkit.scoring import agreement, answer_predictions, teacher_forced_accuracy
from editkit.evaluation.suites import CounterFactSuite
from editkit.host import PluginHost, builtin_candidates
from editkit.plugins.ultraedit import UltraEditEditor
from editkit.plugins.ultraedit.statistics import RunningStats
from editkit.schemas import EditRequest
from editkit.session import Session
from editkit.tokens import shifted_loss, teacher_forced_batch

TURN = [EditRequest(prompt="The capital of Italy is", target_new="Paris"),
        EditRequest(prompt="The cat sat on the", target_new="red mat"),
        EditRequest(prompt="Water boils at one hundred", target_new="degrees")]
NEXT = [EditRequest(prompt="The largest ocean is the", target_new="Atlantic"),
        EditRequest(prompt="Bees make", target_new="cheese")]
UNRELATED = ["The quick brown fox jumps over the lazy dog", "She opened the window."]
# Tiny random models have flat logits: a larger step than the default model's lr shows the effect.
TINY = {"lr": 1e-2}
CONFIGS = {"default": {}, "whitening": {"whitening": True, "warmup": False},
           "plain": {"preserve": 0.0, "null_space": False}}


def editor(loaded, **config) -> UltraEditEditor:
    ed = UltraEditEditor(loaded, {**TINY, **config})
    ed.attach()
    return ed


def logits(loaded, texts: list[str]) -> torch.Tensor:
    enc = loaded.tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return loaded.model(**enc).logits


def target_loss(loaded, requests: list[EditRequest]) -> float:
    batch = teacher_forced_batch(loaded.tokenizer, [r.prompt for r in requests], [r.target_new for r in requests])
    with torch.no_grad():
        return float(shifted_loss(loaded.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits,
                                  batch.labels))


def weights(loaded) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in loaded.model.state_dict().items()}


def through_safetensors(tmp_path, state):
    """The state as a workspace would store and read it: safetensors (CPU, contiguous) + JSON meta."""
    tensors, meta = state
    path = tmp_path / "state.safetensors"
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))
    return load_file(str(path)), dict(meta)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_a_turn_lowers_the_target_loss_and_detach_is_bit_exact(tiny_loaded, tiny_family, name):
    loaded = tiny_loaded[tiny_family]
    before, hooks = weights(loaded), [dict(m._forward_hooks) for m in loaded.model.modules()]
    loss0 = target_loss(loaded, TURN)
    ed = editor(loaded, **CONFIGS[name])
    try:
        assert target_loss(loaded, TURN) == loss0  # attached, nothing applied: the model as it was
        stats = ed.apply_turn(TURN)
        assert len(stats) == len(TURN) and all(s["turn"] == 1 and s["turn_size"] == 3 for s in stats)
        assert [s["positions"] for s in stats][0] >= 1 and all(s["loss"] > 0 for s in stats)
        assert target_loss(loaded, TURN) < loss0 - 0.05
        ed.apply_turn(NEXT)
        assert ed.turns == 2 and ed.edits == 5 and ed.delta_norm() > 0
    finally:
        ed.detach()
    after = weights(loaded)
    assert all(torch.equal(before[k], after[k]) for k in before)  # detach: bit-identical weights
    assert [dict(m._forward_hooks) for m in loaded.model.modules()] == hooks  # and no hooks left


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_state_round_trip_is_exact(tiny_loaded, tiny_family, name, tmp_path):
    """Reloading a state gives identical logits, and the next turn then gives the identical state."""
    loaded = tiny_loaded[tiny_family]
    texts = [TURN[0].prompt, *UNRELATED]
    a = editor(loaded, **CONFIGS[name])
    try:
        a.apply_turn(TURN)
        saved = through_safetensors(tmp_path, a.state_dict())
        logits1 = logits(loaded, texts)
        a.apply_turn(NEXT)
        logits2, (tensors2, meta2) = logits(loaded, texts), a.state_dict()
        tensors2 = {k: v.clone() for k, v in tensors2.items()}
    finally:
        a.detach()
    b = editor(loaded, **CONFIGS[name])
    try:
        b.load_state_dict(*saved)
        assert torch.equal(logits(loaded, texts), logits1)
        b.apply_turn(NEXT)
        assert torch.equal(logits(loaded, texts), logits2)
        tensors3, meta3 = b.state_dict()
        assert meta3 == meta2 and set(tensors3) == set(tensors2)
        assert all(torch.equal(tensors3[k], tensors2[k]) for k in tensors2)
    finally:
        b.detach()


def corruptions(tensors: dict, meta: dict):
    """(what, tensors, meta) variants that must be refused."""
    yield "format", tensors, {**meta, "format": 99}
    yield "layers", tensors, {**meta, "layers": [0]}
    yield "component", tensors, {**meta, "component": "mlp.up"}
    yield "whitening", tensors, {**meta, "whitening": not meta["whitening"]}
    yield "preserve", tensors, {**meta, "preserve": not meta["preserve"]}
    yield "turns", tensors, {**meta, "turns": -1}
    yield "missing delta", {k: v for k, v in tensors.items() if k != "delta.0"}, meta
    yield "missing stats", {k: v for k, v in tensors.items() if k != "stats.1.m2"}, meta
    yield "missing gram", {k: v for k, v in tensors.items() if k != "gram.0"}, meta
    yield "delta shape", {**tensors, "delta.0": tensors["delta.0"][:, :-1]}, meta
    yield "gram shape", {**tensors, "gram.1": tensors["gram.1"][:-1]}, meta
    yield "stats shape", {**tensors, "stats.0.mean": tensors["stats.0.mean"][:-1]}, meta
    bad = tensors["delta.1"].clone()
    bad[0, 0] = float("nan")
    yield "non-finite delta", {**tensors, "delta.1": bad}, meta
    yield "negative count", {**tensors, "stats.0.count": -tensors["stats.0.count"] - 1}, meta
    yield "integer delta", {**tensors, "delta.0": tensors["delta.0"].long()}, meta
    yield "extra tensor", {**tensors, "stats.0.scatter": torch.zeros(2, 2)}, meta


def test_a_state_that_does_not_fit_is_refused_and_nothing_changes(tiny_loaded, tiny_family):
    loaded = tiny_loaded[tiny_family]
    ed = editor(loaded)
    try:
        ed.apply_turn(TURN)
        tensors, meta = ed.state_dict()
        good = ({k: v.clone() for k, v in tensors.items()}, dict(meta))
        assert len(ed.layers) >= 2  # the corruptions name two modules
        model_before = weights(loaded)
        for what, bad_tensors, bad_meta in corruptions(*good):
            with pytest.raises(WorkspaceError, match="ultraedit state does not fit"):
                ed.load_state_dict(bad_tensors, bad_meta)
            now, now_meta = ed.state_dict()
            assert now_meta == good[1] and all(torch.equal(now[k], good[0][k]) for k in good[0]), what
            assert all(torch.equal(v, model_before[k]) for k, v in weights(loaded).items()), what
        ed.load_state_dict(*good)  # the genuine state still loads
    finally:
        ed.detach()


def test_running_statistics_merge_exactly():
    """Count-weighted merges of turns equal the statistics of all rows at once; whitening uses
    the full covariance of the value part once there are more rows than dimensions."""
    torch.manual_seed(0)
    keys, grads = torch.randn(50, 4) * 3 + 1, torch.randn(50, 3) * 0.1
    stats = RunningStats.empty(4, 3, whiten=True, device="cpu")
    for a, b in ((0, 1), (1, 7), (7, 30), (30, 50)):  # turns of 1, 6, 23 and 20 rows
        stats = stats.merged(keys[a:b], grads[a:b])
    x = torch.cat([keys, grads], dim=1).double()
    assert float(stats.count) == 50
    torch.testing.assert_close(stats.mean, x.mean(0))
    torch.testing.assert_close(stats.std(), x.std(0))
    torch.testing.assert_close(stats.scatter / 49, torch.cov(x[:, 4:].T))
    k_hat, g_hat = stats.normalise(keys, grads)
    torch.testing.assert_close(k_hat, (x[:, :4] - x[:, :4].mean(0)) / (x[:, :4].std(0) + 1.2e-7))
    # whitened with the covariance estimate scatter / (n - dim - 1), as StableEdit divides it
    torch.testing.assert_close(torch.cov(g_hat.T) * 49 / 46, torch.eye(3, dtype=torch.float64))


def test_registered_and_config_validated(tiny_loaded):
    host = PluginHost(candidates=builtin_candidates(), env={})
    assert host.editor("ultraedit") is UltraEditEditor and UltraEditEditor.edits_in_turns
    with pytest.raises(InvalidRequest, match="lr"):
        UltraEditEditor(tiny_loaded["llama"], {"lr": -1})
    with pytest.raises(InvalidRequest, match="bogus"):
        UltraEditEditor(tiny_loaded["llama"], {"bogus": 1})


def test_turns_through_a_session(tiny_loaded, tmp_path):
    """A Session.edit call is one turn, each request journaled on its own; a reopened workspace
    has the same weights; rolling one edit back solves its turn again without it, and rolling
    both back gives the model as if they had never been made."""
    loaded = tiny_loaded["llama"]
    texts = [TURN[0].prompt, *UNRELATED]
    unedited = logits(loaded, texts)
    with Session.open(tmp_path / "ws", loaded=loaded, method="ultraedit", method_config=TINY) as s:
        first, second = s.edit([TURN[0], TURN[1]])
        assert first.stats["turn"] == second.stats["turn"] == 1 and first.turn == second.turn == first.id
        edited = logits(loaded, texts)
    with Session.open(tmp_path / "alone", loaded=loaded, method="ultraedit", method_config=TINY) as s:
        s.edit([TURN[0]])
        only_first = logits(loaded, texts)
        assert not torch.equal(edited, unedited)
    assert torch.equal(logits(loaded, texts), unedited)  # closed: detached
    with Session.open(tmp_path / "ws", loaded=loaded) as s:
        assert torch.equal(logits(loaded, texts), edited)
        s.rollback(second.id)
        assert torch.equal(logits(loaded, texts), only_first)  # the turn solved again without it
        s.rollback(first.id)
        assert torch.equal(logits(loaded, texts), unedited)


@pytest.mark.model
@pytest.mark.shared
def test_one_turn_of_100_counterfact_edits_on_the_default_model(default_model):
    """100 CounterFact dev edits in one turn with the default config. Measured (CPU, 1 thread):
    Rel (TF) 0.645, Loc unchanged (TF) 0.755, from Rel 0.06 before; the issue asked for 0.9 /
    0.9, which this method does not reach on this model (docs/ultraedit.md)."""
    loaded = default_model
    requests = CounterFactSuite().load(str(shared_path("counterfact")), limit=100)
    prompts, targets = [r.prompt for r in requests], [r.target_new for r in requests]
    loc_prompts = [r.locality[0].prompt for r in requests]
    loc_answers = [r.locality[0].answer for r in requests]
    before = answer_predictions(loaded, loc_prompts, loc_answers)
    ed = UltraEditEditor(loaded, {})
    ed.attach()
    try:
        ed.apply_turn(requests)
        rel = teacher_forced_accuracy(loaded, prompts, targets)  # the runner's rel_tf / loc_tf
        loc = [agreement(b, a) for b, a in zip(before, answer_predictions(loaded, loc_prompts, loc_answers))]
    finally:
        ed.detach()
    assert sum(rel) / len(rel) >= 0.6, sum(rel) / len(rel)
    assert sum(loc) / len(loc) >= 0.7, sum(loc) / len(loc)
