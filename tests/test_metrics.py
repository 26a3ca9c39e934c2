"""Metrics on hand-made logits and tokens with known answers, and the per-item figures on a
tiny model (unchanged model: locality 1 under both definitions)."""

from __future__ import annotations

import pytest
import torch

from editkit.evaluation.builtin_edits import BUILTIN_EDITS
from editkit.scoring import (METRICS, ItemBaseline, agreement, exact_match, greedy_token_ids,
                                        item_baseline, item_baselines, mean, measure_item, measure_items,
                                        normalise, summarise, token_hits, token_predictions)
from editkit.components import Intervention
from editkit.schemas import EditRequest, LocalityProbe
from editkit.tokens import IGNORE, encode_pair, teacher_forced_batch


def one_hot_logits(rows: list[list[int]], vocab: int = 10) -> torch.Tensor:
    """Logits whose argmax at position t is rows[b][t]."""
    logits = torch.zeros(len(rows), len(rows[0]), vocab)
    for b, row in enumerate(rows):
        for t, tok in enumerate(row):
            logits[b, t, tok] = 5.0
    return logits


def test_token_hits_uses_the_previous_position():
    # Sequence of 5; target tokens at positions 3 and 4 (labels 7, 8). Position 2 predicts 7
    # (hit), position 3 predicts 1 (miss).
    logits = one_hot_logits([[0, 0, 7, 1, 0]])
    labels = torch.tensor([[IGNORE, IGNORE, IGNORE, 7, 8]])
    assert token_hits(logits, labels) == [[True, False]]
    assert token_predictions(logits, labels) == [[7, 1]]


def test_token_hits_per_row_with_padding():
    logits = one_hot_logits([[0, 4, 5, 0], [0, 2, 0, 0]])
    labels = torch.tensor([[IGNORE, 4, 5, IGNORE], [IGNORE, IGNORE, 3, IGNORE]])
    # row 0: pos0 -> 0 vs 4 miss, pos1 -> 4 vs 5 miss; row 1: pos1 -> 2 vs 3 miss
    assert token_hits(logits, labels) == [[False, False], [False]]
    labels = torch.tensor([[IGNORE, 0, 4, IGNORE], [IGNORE, IGNORE, 2, IGNORE]])
    assert token_hits(logits, labels) == [[True, True], [True]]


def test_agreement():
    assert agreement([1, 2, 3, 4], [1, 2, 0, 4]) == 0.75
    assert agreement([5], [5]) == 1.0
    assert agreement([], []) == 0.0


@pytest.mark.parametrize("generated, target, expected", [
    ("  Paris ", "Paris", 1.0),
    ("PARIS.", "paris", 1.0),
    ("unmanned   aircraft", "Unmanned aircraft", 1.0),
    ("Walter-Sobchak", "Walter Sobchak", 1.0),
    ("Paris, France", "Paris", 0.0),
    ("Rome", "Paris", 0.0),
])
def test_exact_match_normalises(generated, target, expected):
    assert exact_match(generated, target) == expected


def test_normalise():
    assert normalise("  The  Quick,\tBrown!! fox ") == "the quick brown fox"
    assert normalise("...") == ""


def test_mean_and_summarise_skip_missing():
    assert mean([1.0, None, 0.0]) == 0.5
    assert mean([None]) is None
    rows = [{"rel_tf": 1.0, "gen_tf": None}, {"rel_tf": 0.5, "gen_tf": 0.25}]
    s = summarise(rows)
    assert s["rel_tf"] == 0.75 and s["gen_tf"] == 0.25 and s["port_em"] is None
    assert set(s) == set(METRICS)


@pytest.fixture(scope="module")
def gpt2(tiny_loaded):
    return tiny_loaded["gpt2"]


REQ = EditRequest(prompt="The capital of France is", target_new="Rome", rephrases=["France's capital is"],
                  locality=[{"prompt": "The capital of Italy is", "answer": "Rome"},
                            {"prompt": "Who wrote Hamlet?"}])


def test_greedy_token_ids_prefix_consistent(gpt2):
    prompts = ["The capital of France is", "Who wrote Hamlet? William"]
    batched = greedy_token_ids(gpt2, prompts, [2, 5])
    alone = [greedy_token_ids(gpt2, [p], [n])[0] for p, n in zip(prompts, [2, 5])]
    assert all(len(r) <= n for r, n in zip(batched, [2, 5]))
    assert batched == alone


def test_measure_item_on_unchanged_model(gpt2):
    base = item_baseline(gpt2, REQ)
    assert base.answers[0] == "Rome" and base.has_answer == [True, False]
    assert base.answers[1]  # the pre-edit continuation stands in for the missing answer
    scores = measure_item(gpt2, REQ, base)
    assert set(scores) == set(METRICS)
    assert scores["loc_tf"] == 1.0 and scores["loc_em"] == 1.0  # nothing changed
    for key in ("rel_tf", "rel_em", "gen_tf", "gen_em", "loc_acc_tf", "loc_acc_em"):
        assert 0.0 <= scores[key] <= 1.0
    assert scores["port_tf"] is None and scores["port_em"] is None
    # The baseline round-trips through JSON; portability probes are scored where given.
    assert measure_item(gpt2, REQ, ItemBaseline.from_dict(base.to_dict())) == scores
    ported = measure_item(gpt2, REQ, base, [LocalityProbe(prompt="Rome is the capital of", answer="France")])
    assert 0.0 <= ported["port_tf"] <= 1.0 and ported["port_em"] in (0.0, 1.0)


def test_measure_item_detects_a_changed_prediction(gpt2):
    base = item_baseline(gpt2, REQ)
    forged = ItemBaseline(base.answers, base.has_answer,
                          [[t + 1 for t in row] for row in base.tf_predictions],
                          [[t + 1 for t in row] for row in base.generations])
    scores = measure_item(gpt2, REQ, forged)
    assert scores["loc_tf"] == 0.0 and scores["loc_em"] == 0.0


# ---- batched measurement against the plain item-by-item definition --------------------------
def reference_rows(loaded, prompts, targets):
    """Teacher-forced hits / argmaxes from the full logits and greedy generations from generate(),
    one probe group in one batch: the plain definition the batched path must reproduce."""
    if not prompts:
        return [], [], []
    batch = teacher_forced_batch(loaded.tokenizer, prompts, targets)
    with torch.no_grad():
        logits = loaded.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    hits, preds = token_hits(logits, batch.labels), token_predictions(logits, batch.labels)
    return hits, preds, greedy_token_ids(loaded, prompts, [len(h) for h in hits])


def reference_measure(loaded, request, baseline):
    probes = ([("rel", request.prompt, request.target_new)]
              + [("gen", r, request.target_new) for r in request.rephrases]
              + [("loc", p.prompt, a) for p, a in zip(request.locality, baseline.answers)])
    hits, preds, gens = reference_rows(loaded, [p for _, p, _ in probes], [t for _, _, t in probes])
    out, loc = {}, 0
    for (kind, _, target), h, pred, gen in zip(probes, hits, preds, gens):
        if kind == "loc":
            out.setdefault("loc_tf", []).append(agreement(baseline.tf_predictions[loc], pred))
            out.setdefault("loc_em", []).append(float(gen == baseline.generations[loc]))
            loc += 1
        else:
            out.setdefault(f"{kind}_tf", []).append(sum(h) / len(h))
            out.setdefault(f"{kind}_em", []).append(
                exact_match(loaded.tokenizer.decode(gen, skip_special_tokens=True), target))
    return {k: mean(v) for k, v in out.items()}


MIXED = [EditRequest.model_validate(e) for e in BUILTIN_EDITS] + [
    EditRequest(prompt="A cat is", target_new="big", rephrases=["The cat is really very"],
                locality=[{"prompt": "Dogs are"}]),
    EditRequest(prompt="Paris is the capital city of the country", target_new="Spain",
                locality=[{"prompt": "Hi"}, {"prompt": "The sky is", "answer": "blue sky"}]),
    EditRequest(prompt="Q", target_new="one two three", rephrases=["Question: Q", "q"]),
]


def test_batched_measurement_matches_item_by_item(tiny_loaded, tiny_family):
    """Many items' probes in one teacher-forced pass and one generate call (right padding under
    the mask, left padding for generation) give the same TF hits and EM decisions as each item
    alone through full logits and generate()."""
    loaded = tiny_loaded[tiny_family]
    requests = MIXED * 2
    baselines = item_baselines(loaded, requests, batch_size=5)
    for request, base in zip(requests, baselines):
        _, preds, gens = reference_rows(loaded, [p.prompt for p in request.locality], base.answers)
        assert base.tf_predictions == preds and base.generations == gens
    batched = measure_items(loaded, requests, baselines, batch_size=5)
    for request, base, row in zip(requests, baselines, batched):
        assert row == measure_item(loaded, request, base)
        ref = reference_measure(loaded, request, base)
        assert {k: row[k] for k in ref} == ref
    # Editing-like changes (a different baseline) are detected the same way batched.
    assert [r["loc_tf"] for r in batched if r["loc_tf"] is not None] == [1.0] * sum(bool(r.locality) for r in requests)


class _Lookahead(Intervention):
    """Pushes token `token` at every position of a forward pass whose input holds it anywhere: a
    teacher-forced pass over prompt + target sees the target's token, decoding from the prompt
    does not. (One probe per batch here: the push is for the whole pass.)"""

    name = "lookahead-test"
    token = 0

    def attach(self) -> None:
        self.hook(self.model, self._ids, pre=True, with_kwargs=True)
        self.hook(self.model.get_output_embeddings(), self._push)
        self.attached = True

    def _ids(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self._holds = bool((ids == self.token).any())

    def _push(self, module, inputs, output):
        if not self._holds:
            return None
        return output + 100.0 * torch.nn.functional.one_hot(torch.tensor(self.token), output.shape[-1]).to(output)


@pytest.mark.parametrize("reads_whole_input", [True, False])
def test_exact_match_is_decoded_for_real_while_a_component_reads_the_whole_input(gpt2, reads_whole_input):
    """EM read off the teacher-forced pass equals greedy decoding only for a causal model; with
    a component that looks ahead (WISE's routing) attached, scoring decodes from the prompt."""
    req = EditRequest(prompt="The capital of France is", target_new="Rome")
    target = encode_pair(gpt2.tokenizer, req.prompt, req.target_new)[1]
    req = EditRequest(prompt=req.prompt, target_new=gpt2.tokenizer.decode(target[:1]))  # one token
    assert encode_pair(gpt2.tokenizer, req.prompt, req.target_new)[1] == target[:1]
    base = item_baseline(gpt2, req)
    probe = type("Probe", (_Lookahead,), {"token": target[0], "reads_whole_input": reads_whole_input})(gpt2)
    probe.attach()
    try:
        assert bool(gpt2.whole_input_readers) == reads_whole_input
        scores = measure_item(gpt2, req, base)
    finally:
        probe.detach()
    assert not gpt2.whole_input_readers
    assert scores["rel_tf"] == 1.0  # the teacher-forced pass holds the target: it is pushed
    # decoded from the prompt, nothing is pushed and EM fails; read off the teacher-forced pass
    # (right for a causal model only) it would count the pushed token as generated
    assert scores["rel_em"] == (0.0 if reads_whole_input else 1.0)


# Editors that change the model at run time by hooks (not by their weights) and claim to be
# causal, so scoring keeps reading exact match off the teacher-forced pass while they are
# attached. GRACE replaces a position's state by what that position alone matches; NMC reads
# running means up to each position. Tiny-model settings as in their own tests.
CAUSAL_EDITORS = {"grace": {}, "nmc": {"fast_steps": 0, "slow_steps": 200, "slow_lr": 0.5, "threshold": 0.9,
                                       "gate_width": 0.05, "margin": 0.2}}


@pytest.mark.parametrize("method", sorted(CAUSAL_EDITORS))
def test_exact_match_read_off_the_teacher_forced_pass_equals_decoding_for_hooked_editors(tiny_loaded, tiny_family,
                                                                                        method):
    from editkit.host import get_host
    from editkit.scoring import greedy_generations, teacher_forced_predictions

    loaded = tiny_loaded[tiny_family]
    edit = EditRequest(prompt="The capital of Germany is", target_new="Paris")
    # three-token targets that the rows leave early, so the shortcut's decoding from a
    # teacher-forced prefix and plain decoding from the prompt both do real work
    probes = [(edit.prompt, " Paris and Rome"), ("Yesterday I read that the capital of Germany is", " Paris and Rome"),
              ("The quick brown fox jumps over", " the lazy dog"), (edit.prompt, " Berlin in spring")]
    assert not loaded.whole_input_readers
    editor = get_host().editor(method)(loaded, CAUSAL_EDITORS[method])
    editor.attach()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            editor.apply(edit)
        assert not loaded.whole_input_readers  # it declares itself causal
        for prompt, target in probes:  # one row per call: no padding between the two ways
            ids, gold = encode_pair(loaded.tokenizer, prompt, target)
            preds = teacher_forced_predictions(loaded, [prompt], [target])
            read_off = greedy_generations(loaded, [ids], [gold], preds)
            loaded.whole_input_readers.add(-1)  # as if a look-ahead component were attached
            try:
                decoded = greedy_generations(loaded, [ids], [gold], preds)
            finally:
                loaded.whole_input_readers.discard(-1)
            assert read_off == decoded, (prompt, target)
        paris = encode_pair(loaded.tokenizer, edit.prompt, edit.target_new)[1]
        assert teacher_forced_predictions(loaded, [edit.prompt], [edit.target_new]) == [paris]  # the edit is in force
    finally:
        editor.detach()
