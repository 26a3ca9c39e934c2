"""PH3 head pruning: mechanics on tiny models of every family (masking equals zeroing the
weight slice, bit-identical detach, state through a Session reopen, the direct-path scores
against a measured swap, the CLI), and the effect on the real default model."""

from __future__ import annotations

import json
import random
import time

import pytest
import torch
from typer.testing import CliRunner

from editkit.cli.main import build_app
from editkit.errors import InvalidRequest
from editkit.host import PluginHost, builtin_candidates
from editkit.plugins.ph3 import (HeadPruning, choose_k, evaluate_rates, locate_heads, perplexity,
                                 pruned, random_baseline, rates_with, split_items)
from editkit.plugins.ph3.items import Fact, _make_item, load_facts
from editkit.plugins.ph3.locate import (HeadScores, capture, direct_effects, direct_scores, encode_left, full_scores,
                                        logit_diff)
from editkit.session import Session
from editkit.sites import Site


FAST = {"steps": 3, "lr": 0.05, "early_stop_loss": 0.0}
HEADS = [(1, 0), (2, 3), (3, 1)]
TINY_FACTS = [Fact("The capital of France is", "Paris", "capital", context_answer="Rome"),
              Fact("The capital of Italy is", "Rome", "capital", context_answer="Berlin"),
              Fact("The capital of Germany is", "Berlin", "capital", context_answer="Paris"),
              Fact("The Eiffel Tower is located in the city of", "Paris", "city", context_answer="Rome")]


@pytest.fixture
def loaded(tiny_loaded, tiny_family):
    return tiny_loaded[tiny_family]


@torch.no_grad()
def logits(loaded, text="The capital of France is Rome. The capital of France is"):
    return loaded.model(loaded.tokenizer(text, return_tensors="pt").input_ids).logits


def tiny_items(loaded):
    rng = random.Random(0)
    items = [_make_item(loaded.tokenizer, f, [], rng) for f in TINY_FACTS]
    assert all(items)
    return items


def test_mask_equals_zeroed_weight_and_detach_is_exact(loaded):
    pristine = logits(loaded)
    weights = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    with pruned(loaded, HEADS):
        masked = logits(loaded)
    assert torch.equal(logits(loaded), pristine)
    assert all(torch.equal(v, weights[k]) for k, v in loaded.model.state_dict().items())
    with torch.no_grad():
        for layer, head in HEADS:
            loaded.adapter.weight(Site("attn.out", layer))[:, loaded.adapter.head_slice(head)] = 0
    try:
        zeroed = logits(loaded)
    finally:
        loaded.model.load_state_dict(weights)
    assert not torch.allclose(masked, pristine)
    assert torch.allclose(masked, zeroed, atol=1e-5, rtol=1e-4)
    assert torch.equal(logits(loaded), pristine)


def test_bad_heads_change_nothing(loaded):
    pruning = HeadPruning(loaded)
    pruning.attach()
    try:
        pruning.set_heads([(0, 1)])
        before = logits(loaded)
        for bad in ([(99, 0)], [(0, 99)], [(0, 1), (0, 1)]):
            with pytest.raises(InvalidRequest):
                pruning.set_heads(bad)
        with pytest.raises(InvalidRequest):
            pruning.load_state_dict({"heads": torch.zeros(3)}, {"format": 1})
        assert torch.equal(logits(loaded), before) and pruning.heads.tolist() == [[0, 1]]
    finally:
        pruning.detach()


def test_state_round_trip_through_session(tmp_path, tiny_loaded):
    loaded = tiny_loaded["llama"]
    pristine = logits(loaded)
    with pruned(loaded, HEADS):
        expected = logits(loaded)
    ws = tmp_path / "ws"
    state = ({"heads": torch.tensor(HEADS)}, {"k": 3, "kind": "context"})
    with Session.open(ws, loaded=loaded, method="ft", method_config=FAST) as s:
        s.add_intervention("ph3", {"favour": "memory"}, state=state)
        assert torch.equal(logits(loaded), expected)
    assert torch.equal(logits(loaded), pristine)
    with Session.open(ws, loaded=loaded) as s:
        ph3 = s.interventions["ph3"]
        assert ph3.config.favour == "memory" and ph3.heads.tolist() == [list(h) for h in HEADS]
        assert ph3.state_dict()[1] == {"format": 1, "k": 3, "kind": "context"}
        assert torch.equal(logits(loaded), expected)
        s.edit({"prompt": "The capital of France is", "target_new": "Rome"}, measure=False)
        s.remove_intervention("ph3")
    with Session.open(ws, loaded=loaded) as s:
        assert s.interventions == {}


def test_direct_scores_match_a_measured_swap(loaded):
    """score(l, h) = LD(conflict) - LD(conflict with the head's direct contribution swapped for
    the reference run's): the sign convention, measured through the real final norm."""
    items = tiny_items(loaded)
    adapter = loaded.adapter
    conflict = capture(loaded, [it.conflict_prompt for it in items])
    reference = capture(loaded, [it.reference_prompt for it in items])
    scores = direct_scores(loaded, items, conflict, reference)  # (N, L, H)
    # the pruning order's ablation: the LD lost when the head's direct contribution is removed
    ablation = direct_effects(loaded, items, conflict.z[:, :, -1], conflict.final)
    base = logit_diff(conflict.logits, items)
    enc = encode_left(loaded.tokenizer, [it.conflict_prompt for it in items], loaded.device)
    norm = adapter.module(Site("final_norm"))
    for layer, head in [(0, 0), (1, 2), (adapter.num_layers - 1, 3)]:
        sl = adapter.head_slice(head)
        w_o = adapter.weight(Site("attn.out", layer)).detach()
        swap_delta = (reference.z[:, layer, -1, sl] - conflict.z[:, layer, -1, sl]) @ w_o[:, sl].T  # (N, hidden)
        ablate_delta = -conflict.z[:, layer, -1, sl] @ w_o[:, sl].T
        # removing a whole head moves the final norm's scale more than swapping it does, so the
        # linearised ablation gets a looser relative tolerance
        for expected, delta, rtol in ((scores, swap_delta, 0.05), (ablation, ablate_delta, 0.15)):
            def swap(module, args, _delta=delta):
                x = args[0].clone()
                x[:, -1] += _delta
                return (x,)

            handle = norm.register_forward_pre_hook(swap)
            try:
                with torch.no_grad():
                    swapped = loaded.model(**enc).logits[:, -1]
            finally:
                handle.remove()
            measured = base - logit_diff(swapped, items)
            got = expected[:, layer, head]
            assert torch.allclose(got, measured, rtol=rtol, atol=2e-3 * (1 + measured.abs().max())), \
                (layer, head, got, measured)
    located = locate_heads(loaded, items)
    assert torch.allclose(located.ablation, ablation.mean(0), atol=1e-6)
    assert located.clean is not None and located.clean.shape == located.scores.shape


def test_pruning_order():
    """Heads are pruned by gain = s * ablation - max(0, clean), among those the patching score
    puts in the kind; a head whose patching score and own contribution disagree (an answer head
    the patching score calls a context head) is never pruned; old files fall back to `scores`."""
    scores = torch.tensor([[-0.9, -0.5, 2.0], [-0.3, 0.4, 0.0]])
    ablation = torch.tensor([[0.1, -0.5, 1.0], [-0.4, 0.6, -0.2]])
    clean = torch.tensor([[1.0, 0.0, -0.1], [0.3, 0.7, 0.0]])
    hs = HeadScores(scores, "direct", 3, ablation=ablation, clean=clean)
    assert [h[:2] for h in hs.ranked("context")] == [(0, 0), (0, 1), (1, 0)]
    order = hs.prune_ranked("context")  # (0, 0) pushes memory in the conflict run: excluded
    assert [h[:2] for h in order] == [(0, 1), (1, 0)]
    assert [h[2] for h in order] == pytest.approx([0.5, 0.1])  # (1, 0): 0.4 - 0.3
    assert hs.top("context", 3) == [(0, 1), (1, 0)]
    assert [h[:2] for h in hs.prune_ranked("memory")] == [(0, 2)]  # (1, 1): 0.6 - 0.7 < 0
    back = HeadScores.from_dict(json.loads(json.dumps(hs.to_dict())))
    assert [h[:2] for h in back.prune_ranked("context")] == [h[:2] for h in order]
    assert [h[2] for h in back.prune_ranked("context")] == pytest.approx([h[2] for h in order])
    old = HeadScores.from_dict({"scores": scores.tolist()})
    assert old.top("context", 2) == [(0, 0), (0, 1)]
    with pytest.raises(InvalidRequest):
        HeadScores.from_dict({"scores": scores.tolist(), "ablation": [[1.0]]})
    paper = HeadScores.from_dict({**hs.to_dict(), "order": "paper"})  # PH3's own order: the patching score
    assert paper.top("context", 3) == [(0, 0), (0, 1), (1, 0)] and paper.to_dict()["order"] == "paper"
    assert HeadScores.from_dict({"scores": scores.tolist(), "mode": "full"}).mode == "activation"  # old name
    with pytest.raises(InvalidRequest, match="order"):
        HeadScores.from_dict({"scores": scores.tolist(), "order": "sometimes"})


def test_activation_patching(loaded):
    """Patching from a run identical to the conflict run changes nothing; in GPT-NeoX's parallel
    blocks a last-layer head reaches the logits only directly, so there activation patching and
    the direct-path score agree (up to the norm's linearisation)."""
    items = tiny_items(loaded)
    conflict = capture(loaded, [it.conflict_prompt for it in items], positions=8)
    same = full_scores(loaded, items, conflict, conflict)
    assert same.abs().max() < 1e-4
    direct = locate_heads(loaded, items)
    full = locate_heads(loaded, items, mode="activation")
    assert full.mode == "activation" and direct.mode == "direct" and full.scores.shape == direct.scores.shape
    assert all(s > 0 for *_, s in direct.ranked("memory")) and all(s < 0 for *_, s in direct.ranked("context"))
    if loaded.adapter.name == "gpt_neox":
        last = loaded.adapter.num_layers - 1
        a, b = direct.per_item[:, last], full.per_item[:, last]
        assert torch.allclose(a, b, rtol=0.05, atol=2e-3 * (1 + b.abs().max())), (a, b)


def test_splits_do_not_overlap(tiny_loaded):
    items = tiny_items(tiny_loaded["gpt2"]) * 5
    items = [type(it)(**{**it.to_dict(), "prompt": f"{i} {it.prompt}"}) for i, it in enumerate(items)]
    parts = split_items(items, seed=3)
    prompts = [{it.prompt for it in part} for part in parts.values()]
    assert sum(map(len, prompts)) == len(items) and not (prompts[0] & prompts[1] or prompts[1] & prompts[2])
    assert split_items(items, seed=3) == parts and split_items(items, seed=4) != parts
    assert len(load_facts("builtin")) >= 30


def test_cli_intervention_add_list_remove(tmp_path, tiny_dirs, tiny_loaded):
    host = PluginHost([c for c in builtin_candidates() if c.name in {"adapters", "ft", "grace", "wise", "ph3"}], env={})
    app, runner = build_app(host), CliRunner()
    loaded = tiny_loaded["gpt2"]
    scores = torch.linspace(-1, 1, 16).reshape(4, 4).tolist()
    heads = {"format": 1, "method": "ph3", "model": str(tiny_dirs["gpt2"]), "fingerprint": loaded.fingerprint,
             "scores": scores, "mode": "direct", "n_items": 4, "choice": {"memory": {"k": 2}}}
    path = tmp_path / "heads.json"
    path.write_text(json.dumps(heads))
    ws, model = str(tmp_path / "ws"), ["--model", str(tiny_dirs["gpt2"]), "--device", "cpu"]
    add = ["intervention", "add", "ph3", "--from", str(path)]
    result = runner.invoke(app, [*add, "--config", "favour=memory", "-w", ws, *model])
    assert result.exit_code == 0, result.output
    assert "attached ph3" in result.output and "'kind': 'context'" in result.output and "'k': 2" in result.output
    with Session.open(ws, loaded=loaded) as s:
        assert s.interventions["ph3"].heads.tolist() == [[0, 0], [0, 1]]
    result = runner.invoke(app, ["intervention", "list", "-w", ws, "--json"])
    assert result.exit_code == 0 and json.loads(result.output)["ph3"]["favour"] == "memory"
    result = runner.invoke(app, [*add, "--config", "favour=context", "--config", "k=1", "-w", ws, *model])
    assert result.exit_code == 1 and "already attached" in result.output
    result = runner.invoke(app, [*add, "--config", "favour=context", "-w", str(tmp_path / "ws2"), *model])
    assert result.exit_code == 1 and "no chosen k for favouring context" in result.output
    result = runner.invoke(app, [*add, "-w", str(tmp_path / "ws3"), *model])
    assert result.exit_code == 1 and "favour=memory" in result.output
    result = runner.invoke(app, ["intervention", "add", "nope", "-w", ws, *model])
    assert result.exit_code == 1 and "unknown intervention 'nope'" in result.output
    result = runner.invoke(app, ["intervention", "remove", "ph3", "-w", ws])
    assert result.exit_code == 0 and "removed ph3" in result.output
    result = runner.invoke(app, ["intervention", "remove", "ph3", "-w", ws])
    assert result.exit_code == 1 and "not attached" in result.output
    result = runner.invoke(app, ["ph3", "locate", "--items", str(tmp_path / "nope.json"), "--out",
                                 str(tmp_path / "h.json"), *model])
    assert result.exit_code == 1 and "--items must be one of" in result.output
    result = runner.invoke(app, ["ph3", "locate", "--order", "sometimes", "--out", str(tmp_path / "h.json"), *model])
    assert result.exit_code == 1 and "--order one of effect, paper" in result.output


@pytest.mark.model
@pytest.mark.shared
def test_default_model_heads_beat_random(default_model, located_ph3):
    """Held-out items from the known-facts file: pruning the located heads moves the favoured
    rate more than pruning as many random heads (mean of 5 draws), with guardrails. The heads
    are located once per run (conftest.located_ph3: 120 items, splits 48 / 36 / 36)."""
    loaded, started = default_model, time.perf_counter()
    parts, scores, base_val = located_ph3["parts"], located_ph3["scores"], located_ph3["base_validation"]
    before = {**evaluate_rates(loaded, parts["test"]), "perplexity": perplexity(loaded)}
    rows = {"before": before}
    for favour, kind in (("memory", "context"), ("context", "memory")):
        k = choose_k(loaded, scores, favour, parts["validation"], ks=(1, 2, 4), baseline=base_val)["k"]
        assert k >= 1, f"validation found no usable k to favour {favour}"
        after = rates_with(loaded, parts["test"], scores.top(kind, k), with_perplexity=True)
        rand = random_baseline(loaded, parts["test"], k, draws=5, clean=False)["mean"]
        rows[favour] = {"k": k, **after, "random": rand}
        rate = f"{favour}_rate"
        assert after[rate] - before[rate] > rand[rate] - before[rate], (favour, rows)
        assert after["clean_accuracy"] >= before["clean_accuracy"] - 0.25, rows
        assert after["perplexity"] < 1.5 * before["perplexity"], rows
    print(json.dumps(rows, indent=1), f"{time.perf_counter() - started:.0f} s")
