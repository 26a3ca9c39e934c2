"""WISE: mechanics on tiny models of every family, effects on the real default model."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from editkit.errors import InvalidRequest, WorkspaceError
from editkit.plugins.wise import WISEEditor
from editkit.plugins.wise.merge import ties_merge
from editkit.plugins.wise.routing import reduce_scores
from editkit.plugins.wise.rows import make_rows
from editkit.schemas import EditRequest
from editkit.session import Session
from editkit.tokens import subject_position

from conftest import shared_path

# Small and quick: mechanics only (a tiny random model learns nothing useful anyway).
TINY = {"steps": 4, "n_contexts": 2, "context_lengths": [3], "lr": 0.1, "unrelated_per_edit": 2, "replay": 1}
EDIT = EditRequest(prompt="The capital of France is", target_new="Rome")
EDIT2 = EditRequest(prompt="The largest planet is", target_new="Paris")
OTHER = "the quick brown fox jumps over the lazy dog"


def logits(loaded, texts: list[str]) -> torch.Tensor:
    enc = loaded.tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return loaded.model(**enc).logits


def seeded_apply(editor, request, seed=0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return editor.apply(request)


def sequence_scores(editor, texts: list[str]) -> torch.Tensor:
    """Each text's activation score against the first memory, as the router computes it."""
    rows = make_rows(editor.tokenizer, [(t, None, None) for t in texts])
    x = editor._project(editor._capture(rows, block_out=False)["x"].float())
    return reduce_scores(F.linear(x, editor.memories[0]).norm(dim=-1), rows.attn, editor.config.score_reduce)


def test_attach_apply_detach_is_bit_identical(tiny_loaded, tiny_family):
    loaded = tiny_loaded[tiny_family]
    texts = [EDIT.prompt, OTHER]
    before = logits(loaded, texts)
    editor = WISEEditor(loaded, TINY)
    editor.attach()
    stats = seeded_apply(editor, EDIT)
    assert stats["steps"] >= 1 and stats["threshold"] is not None
    editor.detach()
    assert torch.equal(logits(loaded, texts), before)


@pytest.mark.parametrize("replay", ["train", "activation"])
def test_fast_and_slow_paths_give_the_same_loss_trajectory(tiny_loaded, tiny_family, replay):
    loaded = tiny_loaded[tiny_family]
    # activation replay: retrieve mode with shards of 2, so the third edit keeps its shard-mate
    # above the in-scope margin and pushes the first memory's edits below the unrelated one
    extra = {} if replay == "train" else {"mode": "retrieve", "shard_size": 2, "replay": 2,
                                          "replay_mode": "activation", "stream_negatives": 2}
    runs = []
    for fast in (True, False):
        editor = WISEEditor(loaded, {**TINY, "steps": 6, "early_stop": False, "fast_path": fast,
                                     "target_check_every": 1, **extra})
        editor.attach()
        try:
            seeded_apply(editor, EDIT)  # a later edit trains on top of a non-zero side memory
            if replay == "activation":
                seeded_apply(editor, EDIT2, seed=2)
                seeded_apply(editor, EDIT, seed=3)
            runs.append((seeded_apply(editor, EDIT2, seed=1)["trajectory"], editor.memories.dense()))
        finally:
            editor.detach()
    (fast_traj, fast_mem), (slow_traj, slow_mem) = runs
    assert len(fast_traj) == len(slow_traj) == 6
    assert torch.allclose(torch.tensor(fast_traj), torch.tensor(slow_traj), rtol=1e-3, atol=1e-4)
    assert torch.allclose(fast_mem, slow_mem, rtol=1e-3, atol=1e-4)


def test_each_row_reaches_the_edited_layer_once(tiny_loaded, monkeypatch):
    """The model below the edited layer runs once per session for the unrelated pool and once
    per edit for the edit's own rows: replayed shard-mates, the key and the threshold reuse the
    inputs captured when their edit was made (a replay costs nothing below the edited layer)."""
    loaded = tiny_loaded["llama"]
    editor = WISEEditor(loaded, {**TINY, "mode": "retrieve", "shard_size": 4, "replay": 4})
    editor.attach()
    captured = []
    real = editor._capture

    def spy(rows, block_out):
        captured.append(rows.ids.shape[0])
        return real(rows, block_out)

    monkeypatch.setattr(editor, "_capture", spy)
    try:
        for i in range(4):
            seeded_apply(editor, EditRequest(prompt=f"{EDIT.prompt} {i}", target_new="Rome"), seed=i)
        assert len(editor._xcache) == 0  # the memory is finished: its edits are never replayed again
    finally:
        editor.detach()
    own = 1 + TINY["n_contexts"]
    assert captured == [len(editor._pool())] + [own] * 4


@pytest.mark.parametrize("every, target_steps", [(4, 3), (1, 9)])
def test_learnt_targets_are_checked_every_n_steps_and_margins_train_between(tiny_loaded, monkeypatch, every,
                                                                            target_steps):
    """Once the targets count as learnt, only every target_check_every-th step runs the layers
    above the edited one; the steps between still move the side memory (the margins)."""
    loaded = tiny_loaded["llama"]
    # every target counts as learnt at once (lead >= -1e9); beta is never met, so no early stop
    editor = WISEEditor(loaded, {**TINY, "steps": 9, "early_stop_lead": -1e9, "beta": 1e9,
                                 "target_check_every": every})
    editor.attach()
    calls, moved = [], []
    real = editor.adapter.run_blocks
    monkeypatch.setattr(editor.adapter, "run_blocks", lambda *a, **k: calls.append(1) or real(*a, **k))
    try:
        stats = seeded_apply(editor, EDIT)
        moved.append(editor.memories[0].abs().sum().item())
    finally:
        editor.detach()
    assert stats["steps"] == 9 and stats["target_steps"] == target_steps == len(calls)
    assert moved[0] > 0


def test_row_leads_are_each_rows_weakest_target_token():
    from editkit.plugins.wise.train import row_leads

    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 5.0], [1.0, 4.0, 0.0]])
    targets = torch.tensor([0, 1, 1])
    leads = row_leads(logits, targets, torch.tensor([0, 0, 2]), 4)
    assert leads.tolist() == [-3.0, float("inf"), 3.0, float("inf")]  # row 0: min(2, -3); rows 1, 3: no target


def test_a_replayed_edit_needs_only_to_stay_as_learnt_as_it_was(tiny_loaded, monkeypatch):
    """A hard earlier edit (its targets never led by early_stop_lead) must not hold every later
    edit of its memory to the step limit: its replayed row needs only to stay the greedy
    prediction, or no worse than at the new edit's first step."""
    loaded = tiny_loaded["gpt2"]
    editor = WISEEditor(loaded, {**TINY, "replay": 1, "early_stop_lead": 50.0})
    editor.attach()
    checks = []
    real = editor._targets_learnt
    monkeypatch.setattr(editor, "_targets_learnt",
                        lambda ce, leads, need: checks.append((leads.tolist(), need.tolist())) or real(ce, leads, need))
    try:
        seeded_apply(editor, EDIT)
        checks.clear()
        seeded_apply(editor, EDIT2, seed=1)
    finally:
        editor.detach()
    own = TINY["n_contexts"] + 1
    (first_leads, first_need), (_, later_need) = checks[0], checks[-1]
    assert len(first_need) == own + 1 and first_need[:own] == [50.0] * own
    assert first_need[own] == pytest.approx(min(0.0, first_leads[own]))  # a tiny random model learns nothing
    assert later_need == first_need


def test_routing_is_per_row_in_a_mixed_batch_and_in_generation(tiny_loaded, tiny_family):
    loaded = tiny_loaded[tiny_family]
    with_edit, without = EDIT.prompt, OTHER
    editor = WISEEditor(loaded, TINY)
    editor.attach()
    try:
        seeded_apply(editor, EDIT)
        scores = sequence_scores(editor, [with_edit, without])
        assert scores[0] != scores[1]
        # Put the threshold between the two rows so one is routed and the other is not.
        hi, lo = (0, 1) if scores[0] > scores[1] else (1, 0)
        editor.thresholds = ((scores[0] + scores[1]) / 2).reshape(1)
        texts = [with_edit, without]
        tok = loaded.tokenizer
        enc = tok(texts, return_tensors="pt", padding=True)  # right padding: the shorter row has pads
        with torch.no_grad():
            batched = loaded.model(**enc).logits
        route = editor._route[0]
        assert route.tolist() == [i == hi for i in range(2)]
        for i, text in enumerate(texts):
            alone = logits(loaded, [text])[0]
            n = alone.shape[0]
            assert torch.allclose(batched[i, :n], alone, atol=1e-5), f"row {i} differs in the batch"
        # Routed rows really go through the side memory; the other is exactly the main model.
        editor._bypass = True
        main_only = logits(loaded, [texts[lo]])[0], logits(loaded, [texts[hi]])[0]
        editor._bypass = False
        assert torch.equal(logits(loaded, [texts[lo]])[0], main_only[0])
        assert not torch.allclose(logits(loaded, [texts[hi]])[0], main_only[1])

        from editkit.generation import generate

        together = generate(loaded, texts, max_new_tokens=6)
        alone = [generate(loaded, [t], max_new_tokens=6)[0] for t in texts]
        assert together == alone
        assert editor._route[0].tolist() == [hi == 1]  # the last call's decision was kept for its tokens
    finally:
        editor.detach()


def test_state_round_trip_through_session_reopen(tiny_loaded, tiny_family, tmp_path):
    loaded = tiny_loaded[tiny_family]
    texts = [EDIT.prompt, EDIT2.prompt, OTHER]
    config = {**TINY, "shard_size": 1}
    with Session.open(tmp_path / "ws", loaded=loaded, method="wise", method_config=config) as session:
        session.edit([EDIT, EDIT2], measure=False)
        first = logits(loaded, texts)
        tensors, meta = session.editor.state_dict()
    assert meta["edits"] and meta["contexts"]
    with Session.open(tmp_path / "ws", loaded=loaded) as session:
        assert torch.equal(logits(loaded, texts), first)
        again, meta2 = session.editor.state_dict()
        assert meta2 == meta and all(torch.equal(again[k], v) for k, v in tensors.items())


@pytest.mark.parametrize("mode", ["retrieve", "merge"])
def test_saves_of_only_what_changed_reopen_to_the_same_state(tiny_loaded, tmp_path, mode):
    """WISE saves only the memory an edit changed (tracks_changes): over several shards (and
    merges), each edit saved on its own, the reopened state equals the one in memory."""
    loaded = tiny_loaded["llama"]
    config = {**TINY, "mode": mode, "shard_size": 2, "merge_every": 2}
    with Session.open(tmp_path / "ws", loaded=loaded, method="wise", method_config=config) as session:
        for i in range(7):
            session.edit(EditRequest(prompt=f"{EDIT.prompt} {i}", target_new=EDIT.target_new), measure=False)
        tensors, meta = session.editor.state_dict()
        tensors = {k: v.clone() for k, v in tensors.items()}
    assert meta["shards"] == 3 and ("pending" in tensors) == (mode == "merge")  # merge: shard 3 waits
    assert tensors["packed_bits"].shape[0] == (3 if mode == "retrieve" else 0)  # finished memories, packed
    with Session.open(tmp_path / "ws", loaded=loaded) as session:
        again, meta2 = session.editor.state_dict()
    assert meta2 == meta and again.keys() == tensors.keys()
    assert all(torch.equal(again[k], v) for k, v in tensors.items())


def test_rollback_replays_to_the_same_state(tiny_loaded, tmp_path):
    loaded = tiny_loaded["llama"]
    with Session.open(tmp_path / "a", loaded=loaded, method="wise", method_config=TINY) as session:
        first, _ = session.edit([EDIT, EDIT2], measure=False)
        session.rollback(first.id)
        rolled = session.editor.memories.dense()
    with Session.open(tmp_path / "b", loaded=loaded, method="wise", method_config=TINY) as session:
        session.edit(EDIT2, measure=False)
        direct = session.editor.memories.dense()
    assert torch.equal(rolled, direct)


def test_merge_mode_ties_merges_shards(tiny_loaded):
    loaded = tiny_loaded["gpt2"]
    editor = WISEEditor(loaded, {**TINY, "mode": "merge", "shard_size": 1, "merge_every": 2})
    editor.attach()
    try:
        for i, req in enumerate([EDIT, EDIT2, EDIT]):
            seeded_apply(editor, req, seed=i)
        # shards 1 and 2 were merged; shard 3 waits for its partner
        assert editor.shards == 3 and len(editor.pending) == 1 and len(editor.memories) == 1
        assert torch.allclose(editor.memories[0], editor.merge_base + editor.pending[0])
        assert torch.isfinite(editor.thresholds).all()
    finally:
        editor.detach()
    a = torch.tensor([[1.0, -2.0], [0.0, 3.0]])
    b = torch.tensor([[1.0, 2.0], [0.5, -1.0]])
    merged = ties_merge([a, b], density=1.0)
    assert merged.tolist() == [[1.0, 0.0], [0.5, 3.0]]  # (0, 1): no elected sign


def test_retrieve_mode_uses_one_memory_per_shard_and_faiss(tiny_loaded, monkeypatch):
    loaded = tiny_loaded["gpt_neox"]
    editor = WISEEditor(loaded, {**TINY, "mode": "retrieve", "shard_size": 1, "faiss_min_memories": 3,
                                 "faiss_candidates": 2, "key_gate": None})  # activation scores alone
    editor.attach()
    try:
        for i, req in enumerate([EDIT, EDIT2, EDIT]):
            seeded_apply(editor, req, seed=i)
        assert len(editor.memories) == 4  # three shards plus the empty one that takes the next edit
        assert torch.isfinite(editor.thresholds[:3]).all() and torch.isinf(editor.thresholds[3])
        from editkit.generation import generate

        texts = [EDIT.prompt, OTHER, EDIT2.prompt]
        together = generate(loaded, texts, max_new_tokens=4)
        assert editor._index is not None  # the faiss path picked the candidates
        assert together == [generate(loaded, [t], max_new_tokens=4)[0] for t in texts]
        rows = make_rows(editor.tokenizer, [(t, None, None) for t in texts + [EDIT2.prompt + " x"]])
        x = editor._project(editor._capture(rows, block_out=False)["x"].float())
        saved = editor.config
        decided = []
        for update in ({"faiss_candidates": 4}, {"faiss_min_memories": None}):  # every memory a candidate / exact
            editor.config = saved.model_copy(update=update)
            decided.append(editor._decide(x, rows.attn.float()))
        monkeypatch.setattr("editkit.plugins.wise.routing.SCAN_CHUNK", 3)  # the exact scan in two chunks
        decided.append(editor._decide(x, rows.attn.float()))
        editor.config = saved
        for (route, idx, out), (route2, idx2, out2) in zip(decided, decided[1:]):
            assert torch.equal(route, route2) and torch.equal(idx, idx2) and route.any()
            assert torch.allclose(out[route], out2[route])  # the side output counts for routed rows only
        tensors, meta = editor.state_dict()
        other = WISEEditor(loaded, editor.config)
        editor.detach()
        other.attach()
        other.load_state_dict(tensors, meta)
        assert generate(loaded, texts, max_new_tokens=4) == together
        other.detach()
    finally:
        editor.detach()


def test_key_gate_admits_only_memories_holding_an_edit_worded_like_the_sequence(tiny_loaded, tiny_family):
    """key_gate: a memory is a routing candidate only for sequences whose key is near one of its
    edits' prompt keys; the keys persist, and a state saved before edits had keys gets the same
    keys back from the edits' prompts."""
    loaded = tiny_loaded[tiny_family]
    editor = WISEEditor(loaded, {**TINY, "mode": "retrieve", "shard_size": 1, "key_gate": 0.999})  # only the edits themselves
    editor.attach()
    try:
        for i, req in enumerate([EDIT, EDIT2]):
            seeded_apply(editor, req, seed=i)
        keys = editor._edit_keys_of(editor.edits)  # as a state saved without them gets them
        assert editor.edit_keys.shape == keys.shape and torch.allclose(editor.edit_keys, keys, atol=1e-5)
        rows = make_rows(editor.tokenizer, [(t, None, None) for t in [EDIT.prompt, EDIT2.prompt, OTHER]])
        x = editor._project(editor._capture(rows, block_out=False)["x"].float())
        attn = rows.attn.float()
        assert editor._near_memories(x, attn).tolist() == [[0, -1, -1], [1, -1, -1], [-1, -1, -1]]  # 3 memories: the 3rd is empty
        route, idx, _ = editor._decide(x, attn)
        assert route.tolist() == [True, True, False] and idx[:2].tolist() == [0, 1]
        rows = make_rows(editor.tokenizer, [(EDIT2.prompt, EDIT2.target_new, None)])  # teacher-forced: its second key
        x2 = editor._project(editor._capture(rows, block_out=False)["x"].float())
        assert editor._near_memories(x2, rows.attn.float())[0, 0] == 1
        editor.config = editor.config.model_copy(update={"key_gate": -1.0})  # every memory with an edit
        assert sorted(editor._near_memories(x, attn)[2].tolist()) == [-1, 0, 1]

        tensors, meta = editor.state_dict()
        assert torch.equal(tensors["edit_keys"], editor.edit_keys)
        other = WISEEditor(loaded, editor.config)
        editor.detach()
        other.attach()
        other.load_state_dict({k: v for k, v in tensors.items() if k != "edit_keys"}, meta)
        assert torch.allclose(other.edit_keys, keys, atol=1e-5)
        other.load_state_dict(tensors, meta)
        assert torch.equal(other.edit_keys, tensors["edit_keys"])
        with pytest.raises(WorkspaceError, match="edit_keys"):
            other.load_state_dict({**tensors, "edit_keys": tensors["edit_keys"][:1]}, meta)
        assert torch.equal(other.edit_keys, tensors["edit_keys"])  # the refused state changed nothing
        other.detach()
    finally:
        editor.detach()


def test_subject_gate_admits_an_edit_only_where_its_subject_occurs(tiny_loaded, tiny_family):
    """subject_gate: an edit whose subject occurs in its prompt passes the gate only for sequences
    with a token whose state (block subject_layer) is like its subject's last token; an edit
    without a subject is gated by its keys alone. Subject keys persist, are rebuilt from the
    edits' prompts and subjects for a state saved without them, and a subject_layer at or above
    the edited layer is refused."""
    loaded = tiny_loaded[tiny_family]
    edit = EditRequest(prompt="The capital of France is", target_new="Rome", subject="France")
    editor = WISEEditor(loaded, {**TINY, "mode": "retrieve", "shard_size": 1, "key_gate": -1.0, "subject_gate": 0.999})
    editor.attach()
    try:
        for i, req in enumerate([edit, EDIT2]):  # EDIT2 names no subject
            seeded_apply(editor, req, seed=i)
        assert editor.subject_known.tolist() == [True, False]
        keys, known = editor._subject_keys_of(editor.edits)
        assert torch.allclose(editor.subject_keys, keys, atol=1e-5) and torch.equal(editor.subject_known, known)
        texts = [edit.prompt, "The capital of Spain is", OTHER]
        rows = make_rows(editor.tokenizer, [(t, None, None) for t in texts])
        x = editor._project(editor._capture(rows, block_out=False)["x"].float())
        attn = rows.attn.float()
        near = [sorted(m for m in row if m >= 0) for row in editor._near_memories(x, attn).tolist()]
        assert near == [[0, 1], [1], [1]]  # France's memory only where France is
        editor.config = editor.config.model_copy(update={"subject_gate": None})
        assert [sorted(m for m in row if m >= 0) for row in editor._near_memories(x, attn).tolist()] == [[0, 1]] * 3
        editor.config = editor.config.model_copy(update={"subject_gate": 0.999})
        route, idx, _ = editor._decide(x, attn)  # (the capture above left its subject states)
        editor._route = None
        enc = loaded.tokenizer(texts, return_tensors="pt", padding=True)
        with torch.no_grad():  # a plain forward captures the subject states and routes as _decide does
            loaded.model(**enc)
        assert editor._route[0].tolist() == route.tolist() and editor._route[1][route].tolist() == idx[route].tolist()

        tensors, meta = editor.state_dict()
        assert [e["subject"] for e in meta["edits"]] == ["France", None]
        other = WISEEditor(loaded, editor.config)
        editor.detach()
        other.attach()
        other.load_state_dict({k: v for k, v in tensors.items() if not k.startswith("subject_")}, meta)
        assert torch.allclose(other.subject_keys, keys, atol=1e-5) and other.subject_known.tolist() == [True, False]
        other.load_state_dict(tensors, meta)
        with pytest.raises(WorkspaceError, match="subject_keys"):
            other.load_state_dict({**tensors, "subject_keys": tensors["subject_keys"][:1]}, meta)
        assert torch.equal(other.subject_keys, tensors["subject_keys"])  # the refused state changed nothing
        other.detach()
        moved = WISEEditor(loaded, other.config.model_copy(update={"subject_layer": 0}))  # keys read at another block
        moved.attach()
        moved.load_state_dict(tensors, meta)
        assert torch.allclose(moved.subject_keys, moved._subject_keys_of(moved.edits)[0], atol=1e-5)
        assert not torch.allclose(moved.subject_keys, tensors["subject_keys"], atol=1e-3)
        moved.detach()
    finally:
        editor.detach()
    with pytest.raises(InvalidRequest, match="subject_layer"):
        WISEEditor(loaded, {**TINY, "subject_gate": 0.5, "subject_layer": -1}).attach()


def test_activation_replay_scores_earlier_edits_without_training_them(tiny_loaded, monkeypatch):
    """Paper replay (appendix B.3): the memory's earlier edits only count in the in-scope
    activation scores and other memories' edits are out of scope; no earlier edit is trained."""
    loaded = tiny_loaded["llama"]
    editor = WISEEditor(loaded, {**TINY, "mode": "retrieve", "shard_size": 2, "replay": 4,
                                 "replay_mode": "activation", "stream_negatives": 4})
    editor.attach()
    seen = []
    real = editor._fast_steps

    def spy(specs, drawn, out_specs, replayed=(), kept=()):
        prompt_of = {id(v): editor.edits[i]["prompt"] for i, v in editor._xcache.items()}
        seen.append(([s[0] for s in specs], [s[0] for s in out_specs], [prompt_of[id(e)] for e in kept]))
        return real(specs, drawn, out_specs, replayed, kept)

    monkeypatch.setattr(editor, "_fast_steps", spy)
    prompts = [f"{EDIT.prompt} {i}" for i in range(3)]
    try:
        for i, prompt in enumerate(prompts):
            seeded_apply(editor, EditRequest(prompt=prompt, target_new="Rome"), seed=i)
    finally:
        editor.detach()
    trained, out, kept = seen[2]  # third edit: memory 1; memory 0 holds the first two
    assert all(p.endswith(prompts[2]) for p in trained)  # the edit and its context prefixes only
    assert kept == [] and set(prompts[:2]) <= set(out)
    trained, out, kept = seen[1]  # second edit: its shard-mate kept in scope, nothing trained again
    assert kept == [prompts[0]] and all(p.endswith(prompts[1]) for p in trained)
    assert not set(prompts) & set(out)


def test_stream_negatives_are_other_memories_edits_out_of_scope(tiny_loaded, monkeypatch):
    """With replay by training, stream_negatives puts at most n earlier edits of other memories
    out of scope of the memory being trained; never the memory's own edits."""
    loaded = tiny_loaded["gpt2"]
    editor = WISEEditor(loaded, {**TINY, "mode": "retrieve", "shard_size": 2, "replay": 4, "stream_negatives": 2})
    editor.attach()
    seen = []
    real = editor._fast_steps

    def spy(specs, drawn, out_specs, replayed=(), kept=()):
        seen.append(([s[0] for s in specs], [s[0] for s in out_specs]))
        return real(specs, drawn, out_specs, replayed, kept)

    monkeypatch.setattr(editor, "_fast_steps", spy)
    prompts = [f"{EDIT.prompt} {i}" for i in range(6)]
    try:
        for i, prompt in enumerate(prompts):
            seeded_apply(editor, EditRequest(prompt=prompt, target_new="Rome"), seed=i)
    finally:
        editor.detach()
    assert seen[1][1] == [] and prompts[0] in seen[1][0]  # a shard-mate is replayed, nothing is out of scope
    assert sorted(seen[2][1]) == prompts[:2]  # memory 1's first edit: memory 0's edits out of scope
    trained, out = seen[5]  # memory 2's second edit: two of memories 0 and 1's four edits
    assert len(out) == 2 and set(out) <= set(prompts[:4]) and prompts[4] in trained


def test_subject_gate_leaves_out_attention_sinks(tiny_loaded, tiny_family):
    """Attention sinks (each sequence's first token, and any state SINK_RATIO x the typical norm
    at block subject_layer: on the default model their states had cosine 0.98-1.00 with every
    subject key) are never compared by subject_gate and give an edit no subject key; keys saved
    under an older rule (none recorded in the state) are rebuilt on load."""
    loaded = tiny_loaded[tiny_family]
    editor = WISEEditor(loaded, {**TINY, "mode": "retrieve", "shard_size": 1, "key_gate": -1.0, "subject_gate": 0.9})
    editor.attach()
    try:
        seeded_apply(editor, EditRequest(prompt="The capital of France is", target_new="Rome", subject="France"))
        first = EditRequest(prompt="The largest planet is", target_new="Rome", subject="The")
        assert subject_position(editor.tokenizer, first.prompt, first.subject) == 0  # a one-token subject, first
        seeded_apply(editor, first, seed=1)
        assert editor.subject_known.tolist() == [True, False]
        typical = editor.subject_norm
        assert typical > 0
        key = editor.subject_keys[0]
        # four rows, valid from token 0 or (left-padded) from token 1; the key's direction at one token
        states = 0.01 * torch.randn(4, 4, key.shape[0])
        valid = torch.tensor([[1.0, 1, 1, 1], [1, 1, 1, 1], [0, 1, 1, 1], [1, 1, 1, 1]])
        states[0, 0] = key * typical  # at the first token: the sink's place
        states[1, 2] = key * typical  # further in, a typical norm
        states[2, 1] = key * typical  # the first valid token of a left-padded row
        states[3, 2] = key * typical * 10  # further in, a sink's norm
        editor._subject_x = states
        sims = editor._subject_check(torch.ones(4, 2), valid)
        assert sims[:, 0].tolist() == [-2.0, 1.0, -2.0, -2.0] and sims[:, 1].tolist() == [1.0] * 4

        tensors, meta = editor.state_dict()
        assert meta["subject_key_rule"] == "no-sink" and meta["subject_norm"] == typical
        old = {k: v for k, v in meta.items() if k != "subject_key_rule"}
        editor.load_state_dict({**tensors, "subject_keys": torch.zeros_like(tensors["subject_keys"]),
                                "subject_known": torch.ones_like(tensors["subject_known"])}, old)
        assert torch.allclose(editor.subject_keys, tensors["subject_keys"], atol=1e-5)
        assert editor.subject_known.tolist() == [True, False]
        editor.subject_norm = 1e-6  # every state a sink's norm: no subject keys
        assert editor._subject_keys_of(editor.edits)[1].tolist() == [False, False]
    finally:
        editor.detach()


def test_subject_negatives_are_the_prompt_about_other_subjects(tiny_loaded, monkeypatch):
    loaded = tiny_loaded["gpt_neox"]
    editor = WISEEditor(loaded, {**TINY, "subject_negatives": 3})
    editor.attach()
    seen = []
    real = editor._fast_steps

    def spy(specs, drawn, out_specs, replayed=(), kept=()):
        seen.append([s[0] for s in out_specs])
        return real(specs, drawn, out_specs, replayed, kept)

    monkeypatch.setattr(editor, "_fast_steps", spy)
    try:
        seeded_apply(editor, EditRequest(prompt="Toko Yasuda plays the", target_new="piano", subject="Toko Yasuda"))
        seeded_apply(editor, EditRequest(prompt="Toko Yasuda plays the", target_new="piano"))  # no subject
        seeded_apply(editor, EditRequest(prompt="She plays the", target_new="piano", subject="Toko Yasuda"))
    finally:
        editor.detach()
    swapped = [p for p in seen[0] if p.endswith(" plays the")]
    assert len(swapped) == 3 and len(set(swapped)) == 3 and not any("Toko Yasuda" in p for p in swapped)
    assert not any(p.endswith(" plays the") for out in seen[1:] for p in out)  # none without a usable subject


def test_subject_negatives_below_edit_need_only_stay_gamma_under_the_edit(tiny_loaded, monkeypatch):
    """subject_negatives_below="edit": the subject-swapped prompts (last among the unrelated
    scores) count in the gap to the edit's scores but not in the margin below alpha."""
    loaded = tiny_loaded["llama"]
    editor = WISEEditor(loaded, {**TINY, "subject_negatives": 2, "subject_negatives_below": "edit",
                                 "alpha": 5.0, "beta": 30.0, "gamma": 10.0, "margin_tolerance": 0.0})
    s_in, s_out = torch.tensor([40.0]), torch.tensor([1.0, 25.0])
    assert editor._margins_met(s_in, s_out, 1.0, far=1)  # 25 is 15 under the edit: near enough
    assert not editor._margins_met(s_in, s_out, 1.0)  # every unrelated score below alpha
    assert not editor._margins_met(s_in, torch.tensor([1.0, 35.0]), 1.0, far=1)  # within gamma of the edit
    editor.attach()
    fars = []
    real = editor._margins_met
    monkeypatch.setattr(editor, "_margins_met", lambda s_in, s_out, unit, far=None: fars.append((far, len(s_out)))
                        or real(s_in, s_out, unit, far))
    try:
        seeded_apply(editor, EditRequest(prompt="Toko Yasuda plays the", target_new="piano", subject="Toko Yasuda"))
    finally:
        editor.detach()
    assert fars and all(far == n - 2 == TINY["unrelated_per_edit"] for far, n in fars)


def test_retrieve_memories_are_merged_every_n_shards(tiny_loaded, tmp_path):
    """Paper WISE-Retrieve: shards TIES-merged into one retrievable memory on a schedule, so
    memories grow as T / (shard_size x n); routing and reopening still agree."""
    loaded = tiny_loaded["gpt2"]
    config = {**TINY, "mode": "retrieve", "shard_size": 1, "retrieve_merge_every": 2, "faiss_min_memories": None}
    texts = [f"{EDIT.prompt} {i}" for i in range(5)]
    with Session.open(tmp_path / "ws", loaded=loaded, method="wise", method_config=config) as session:
        editor = session.editor
        session.edit(EditRequest(prompt=texts[0], target_new="Rome"), measure=False)
        shard = editor.memories[0].clone()
        session.edit(EditRequest(prompt=texts[1], target_new="Rome"), measure=False)
        assert len(editor.memories) == 2  # [shards 1+2 merged, the fresh one]
        for t in texts[2:]:
            session.edit(EditRequest(prompt=t, target_new="Rome"), measure=False)
        assert len(editor.memories) == 4  # [1+2, 3+4, 5, fresh]
        assert [e["memory"] for e in editor.edits] == [0, 0, 1, 1, 2]
        assert not torch.equal(editor.memories[0], shard)  # the merge replaced the first shard
        assert torch.isfinite(editor.thresholds[:3]).all() and torch.isinf(editor.thresholds[3])
        assert editor.keys.shape[0] == 4
        from editkit.generation import generate

        together = generate(loaded, texts + [OTHER], max_new_tokens=4)
        assert together == [generate(loaded, [t], max_new_tokens=4)[0] for t in texts + [OTHER]]
        tensors, meta = editor.state_dict()
        tensors = {k: v.clone() for k, v in tensors.items()}
    with Session.open(tmp_path / "ws", loaded=loaded) as session:
        again, meta2 = session.editor.state_dict()
        assert meta2 == meta and all(torch.equal(again[k], v) for k, v in tensors.items())
        assert generate(loaded, texts + [OTHER], max_new_tokens=4) == together


def sparse_delta(shape, density=0.2) -> torch.Tensor:
    """A random side-memory change under a random gradient mask, as a shard leaves it."""
    return torch.randn(shape) * (torch.rand(shape) < density)


def test_finished_memories_are_packed_and_appended_without_copying_the_earlier_ones(tiny_loaded):
    """Finished memories keep only a bitmap and their nonzero values, in buffers with spare
    rows: finishing one copies the earlier ones only when a buffer doubles; each reads back
    exactly (float32); a retrieve merge replaces the last k with their TIES merge, and keys and
    thresholds move with them."""
    editor = WISEEditor(tiny_loaded["llama"], {**TINY, "mode": "retrieve", "packed_dtype": "float32"})
    editor.attach()
    try:
        torch.manual_seed(0)
        bank, rows, ptrs = editor.memories, [], set()
        for i in range(20):
            rows.append(sparse_delta(editor.shape))
            bank.set_current(rows[-1])
            bank.finish()
            for name, fill in (("keys", float(i)), ("thresholds", float(i))):
                getattr(editor, name)[-1] = fill
                editor._append_row(name, float("inf") if name == "thresholds" else 0.0)
            ptrs.add(bank.bits.data_ptr())
            assert torch.equal(bank[-1], torch.zeros(editor.shape))  # the fresh memory
        assert len(ptrs) == 3 and len(bank) == 21  # buffers of 8, 16 and 32 rows
        assert all(torch.equal(bank[i], r) for i, r in enumerate(rows))
        dense_bytes = 21 * rows[0].numel() * 4
        assert bank.nbytes() < 0.35 * dense_bytes  # 20% of values plus 1 bit per entry, and the dense fresh one
        keys, thresholds = editor.keys.clone(), editor.thresholds.clone()
        editor.edits = [{"prompt": "p", "target": "t", "memory": g} for g in range(20)]
        editor._merge_memories(3)  # memories 17-19 into one; the fresh memory (20) moves to 18
        merged = editor._ties(rows[17:20], torch.zeros(editor.shape))
        assert torch.equal(bank.dense(), torch.stack(rows[:17] + [merged, torch.zeros(editor.shape)]))
        assert torch.equal(editor.keys, torch.cat([keys[:17], keys[17:20].sum(0, keepdim=True), keys[20:]]))
        assert torch.equal(editor.thresholds, torch.cat([thresholds[:18], thresholds[20:]]))
        assert [e["memory"] for e in editor.edits] == list(range(17)) + [17, 17, 17]
    finally:
        editor.detach()


def test_float16_packing_rounds_finished_memories_only(tiny_loaded):
    editor = WISEEditor(tiny_loaded["gpt2"], {**TINY, "mode": "retrieve"})  # float16: the default
    editor.attach()
    try:
        torch.manual_seed(0)
        delta = sparse_delta(editor.shape)
        editor.memories.set_current(delta)
        assert torch.equal(editor.memories[0], delta)  # the memory being trained stays float32
        editor.memories.finish()
        assert torch.equal(editor.memories[0], delta.half().float())
        assert editor.memories.values.dtype == torch.float16
    finally:
        editor.detach()


def test_decoding_does_not_unpack_the_routed_memories_again(tiny_loaded, monkeypatch):
    """A batch routed to more distinct memories than the bank caches keeps them unpacked for
    its decoding steps: unpacking does not grow with the number of generated tokens."""
    from editkit.generation import generate
    from editkit.plugins.wise import bank

    loaded = tiny_loaded["llama"]
    editor = WISEEditor(loaded, {**TINY, "mode": "retrieve", "shard_size": 1, "faiss_min_memories": None})
    editor.attach()
    monkeypatch.setattr(bank, "DENSE_CACHE", 1)
    unpacked = []
    real = bank._unpack_bits
    monkeypatch.setattr(bank, "_unpack_bits", lambda *a: unpacked.append(1) or real(*a))
    texts = [f"{EDIT.prompt} {i}" for i in range(3)]
    try:
        for i, t in enumerate(texts):
            seeded_apply(editor, EditRequest(prompt=t, target_new="Rome"), seed=i)
        counts = []
        for tokens in (2, 8):
            unpacked.clear()
            generate(loaded, texts, max_new_tokens=tokens)
            route, idx, _ = editor._route
            assert len(set(idx[route].tolist())) >= 2  # the batch uses several memories
            counts.append(len(unpacked))
        assert counts[0] == counts[1]
    finally:
        editor.detach()


def test_a_dense_state_of_format_1_still_loads(tiny_loaded):
    """Workspaces saved before memories were packed (state format 1: one dense stack) reopen
    to the same memories and routing."""
    loaded = tiny_loaded["gpt_neox"]
    config = {**TINY, "mode": "retrieve", "shard_size": 1}
    editor = WISEEditor(loaded, config)
    editor.attach()
    try:
        for i, req in enumerate([EDIT, EDIT2]):
            seeded_apply(editor, req, seed=i)
        tensors, meta = editor.state_dict()
        stack = editor.memories.dense()
        old = {k: v for k, v in tensors.items() if not k.startswith("packed_") and k != "memory"}
        from editkit.generation import generate

        before = generate(loaded, [EDIT.prompt, EDIT2.prompt, OTHER], max_new_tokens=4)
        editor.load_state_dict({**old, "memories": stack}, {**meta, "format": 1})
        assert torch.equal(editor.memories.dense(), stack) and len(editor.memories) == 3
        assert generate(loaded, [EDIT.prompt, EDIT2.prompt, OTHER], max_new_tokens=4) == before
        again, _ = editor.state_dict()
        assert all(torch.equal(again[k], v) for k, v in tensors.items())
    finally:
        editor.detach()


@pytest.mark.parametrize("values, field", [({"mask_ratio": 1.5}, "mask_ratio"), ({"mode": "both"}, "mode"),
                                           ({"context_lengths": []}, "context_lengths"),
                                           ({"margin_unit": -1}, "margin_unit"), ({"bogus": 1}, "bogus")])
def test_config_errors_name_the_field(values, field):
    with pytest.raises(InvalidRequest, match=field):
        WISEEditor.make_config(values)


def test_paper_preset_fills_what_is_not_given_and_survives_a_round_trip(tiny_loaded):
    from editkit.plugins.wise.config import PAPER_PRESET, PAPER_RETRIEVE_PRESET, WISEConfig

    paper = WISEConfig(preset="paper", steps=3)
    assert all(getattr(paper, k) == v for k, v in PAPER_PRESET.items()) and paper.steps == 3
    retrieve = WISEConfig(preset="paper-retrieve")
    assert all(getattr(retrieve, k) == v for k, v in PAPER_RETRIEVE_PRESET.items())
    assert retrieve.mode == "retrieve" and retrieve.faiss_min_memories is None and retrieve.lr == 1.0
    assert WISEConfig(preset="paper", lr=3.0).lr == 3.0  # given explicitly: wins over the preset
    assert WISEConfig.model_validate(paper.model_dump(mode="json")) == paper  # as a workspace stores it
    assert WISEConfig().lr == 10.0 and WISEConfig().margin_mean == "all"
    editor = WISEEditor(tiny_loaded["gpt2"], {**TINY, "preset": "paper", "steps": 3})
    editor.attach()
    try:
        stats = seeded_apply(editor, EDIT)
        assert 1 <= stats["steps"] <= 3 and editor.config.mode == "merge" and editor.unit is not None
    finally:
        editor.detach()


def test_violated_mean_and_flat_early_stop():
    hinge = torch.tensor([0.0, 2.0, 0.0, 4.0])
    assert float(WISEEditor._violated_mean(hinge)) == 3.0  # over the two violated entries, not all four
    assert float(WISEEditor._violated_mean(torch.zeros(3))) == 0.0
    assert WISEEditor._flat([0.5, 0.01, 0.01005]) and not WISEEditor._flat([0.03, 0.03])
    assert not WISEEditor._flat([0.015, 0.01]) and not WISEEditor._flat([0.01])


def test_every_config_field_is_described():
    for name, info in WISEEditor.Config.model_fields.items():
        assert info.description, name


def test_state_that_does_not_fit_is_refused(tiny_loaded):
    from editkit.errors import WorkspaceError

    editor = WISEEditor(tiny_loaded["llama"], TINY)
    editor.attach()
    try:
        tensors, meta = editor.state_dict()
        with pytest.raises(WorkspaceError):
            editor.load_state_dict({**tensors, "memory": torch.zeros(3, 3)}, meta)
        bits = torch.zeros((1,) + tuple(tensors["packed_bits"].shape[1:]), dtype=torch.uint8)
        bits[0, 0] = 3  # two nonzero entries, but the offsets say five values
        with pytest.raises(WorkspaceError, match="offsets"):
            editor.load_state_dict({**tensors, "packed_bits": bits, "packed_values": torch.zeros(5),
                                    "packed_offsets": torch.tensor([0, 5])}, meta)
        with pytest.raises(WorkspaceError):
            editor.load_state_dict(tensors, {**meta, "layer": meta["layer"] - 1})
    finally:
        editor.detach()


@pytest.mark.model
@pytest.mark.shared
def test_five_sequential_zsre_edits_on_the_default_model(default_model):
    """Issue 3's goal: after 5 sequential zsRE edits with the defaults, Rel >= 0.9 on the edit
    prompts and Loc >= 0.95 on their unrelated probes (measured 1.00 / 1.00 on records 0-4 and
    on records 5-9; the reference port: ~0.34 Rel after 10)."""
    from editkit.scoring import answer_predictions, agreement, teacher_forced_accuracy

    records = json.loads(shared_path("zsre").read_text())[:5]
    loaded = default_model
    loc_prompts = [r["loc"] for r in records]
    loc_answers = [r["loc_ans"] for r in records]
    before = answer_predictions(loaded, loc_prompts, loc_answers)
    editor = WISEEditor(loaded, {})
    editor.attach()
    try:
        for i, r in enumerate(records):
            seeded_apply(editor, EditRequest(prompt=r["src"], target_new=r["alt"], rephrases=[r["rephrase"]],
                                             locality=[{"prompt": r["loc"], "answer": r["loc_ans"]}]), seed=i)
        rel = teacher_forced_accuracy(loaded, [r["src"] for r in records], [r["alt"] for r in records])
        after = answer_predictions(loaded, loc_prompts, loc_answers)
        loc = [agreement(b, a) for b, a in zip(before, after)]
    finally:
        editor.detach()
    assert sum(rel) / len(rel) >= 0.9, rel
    assert sum(loc) / len(loc) >= 0.95, loc


def test_counterfact_neighbours_keep_their_answers_on_the_default_model(default_model):
    """key_gate (the default): after 8 sequential CounterFact edits the edits hold and their
    neighbourhood prompts (the edit's relation, another subject) keep their answers, where the
    activation router alone sends some of them through a side memory (records 100-107 of the
    training split; neither the gate nor these thresholds were chosen on them)."""
    from editkit.scoring import answer_predictions, agreement, teacher_forced_accuracy
    from editkit.evaluation.suites import CounterFactSuite

    requests = CounterFactSuite().load(str(shared_path("counterfact-train")), limit=108)[100:]
    loaded = default_model
    loc_prompts = [r.locality[0].prompt for r in requests]
    loc_answers = [r.locality[0].answer for r in requests]
    before = answer_predictions(loaded, loc_prompts, loc_answers)
    editor = WISEEditor(loaded, {})
    editor.attach()
    try:
        for i, request in enumerate(requests):
            seeded_apply(editor, request, seed=i)
        rel = teacher_forced_accuracy(loaded, [r.prompt for r in requests], [r.target_new for r in requests])
        loc = [agreement(b, a) for b, a in zip(before, answer_predictions(loaded, loc_prompts, loc_answers))]
        editor.config = editor.config.model_copy(update={"key_gate": None})  # the activation router alone
        editor._route = None
        loc_alone = [agreement(b, a) for b, a in zip(before, answer_predictions(loaded, loc_prompts, loc_answers))]
    finally:
        editor.detach()
    print(f"Rel {sum(rel) / 8:.3f}  Loc {sum(loc) / 8:.3f}  Loc without the gate {sum(loc_alone) / 8:.3f}")
    assert sum(rel) / len(rel) >= 0.9, rel
    assert sum(loc) / len(loc) >= 0.95, loc
    assert sum(loc_alone) < sum(loc), (loc_alone, loc)


def test_paraphrase_probe_counts_only_rewordings_that_keep_subject_and_target():
    """benchmarks/paraphrase_probe.py (issue 18): a line is usable training text for an edit only
    when it rewords the sentence, names the subject and still ends on the target."""
    from conftest import benchmark_module

    probe = benchmark_module("paraphrase_probe")
    sentence, subject, target = "Toko Yasuda, the piano.", "Toko Yasuda", "piano"
    assert probe.usable("Toko Yasuda is incredible at the piano", sentence, subject, target)
    assert not probe.usable("toko yasuda,  the piano", sentence, subject, target)  # the sentence again
    assert not probe.usable("Toko Yasuda plays the guitar", sentence, subject, target)  # another answer
    assert not probe.usable("She is incredible at the piano", sentence, subject, target)  # no subject
    assert not probe.usable("", sentence, subject, target)
