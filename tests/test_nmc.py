"""Neural memory controller: mechanics on tiny models of every family (empty memory is the
model, a slow write makes the target greedy and leaves unrelated prompts alone, per-row reads in
mixed batches and in cached generation, controller decisions, state, feedback files, failed
writes change nothing), and its effects on the default model (edits hold, unrelated prompts
keep their answers; a meta-trained synthetic-gradient module points along the true gradient and
absorbs edits in one step)."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from conftest import shared_path
from editkit.errors import InvalidRequest, WorkspaceError
from editkit.scoring import agreement, answer_predictions, teacher_forced_accuracy
from editkit.plugins.nmc import NMCEditor, load_feedback, save_feedback
from editkit.schemas import EditRequest
from editkit.session import Session

EDIT = EditRequest(prompt="The capital of Germany is", target_new="Paris")
EDIT2 = EditRequest(prompt="A spider has eight", target_new="capital")
UNRELATED = ["The quick brown fox jumps over the lazy dog", "She opened the window to let in fresh air."]
# Tiny random models need bigger slow steps than the default model; no fast step, so writes
# take the slow (true-gradient) path the first check is about.
TINY = {"fast_steps": 0, "slow_steps": 200, "slow_lr": 0.5, "threshold": 0.9, "gate_width": 0.05,
        "margin": 0.2}  # a random tiny model's logits are flat: the target leads by a small margin


def logits(loaded, texts: list[str]) -> torch.Tensor:
    enc = loaded.tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return loaded.model(**enc).logits


def greedy_next(loaded, prompt: str) -> int:
    return int(logits(loaded, [prompt])[0, -1].argmax())


def target_id(loaded, req: EditRequest) -> int:
    from editkit.tokens import encode_pair

    return encode_pair(loaded.tokenizer, req.prompt, req.target_new)[1][0]


def nmc(loaded, **config) -> NMCEditor:
    editor = NMCEditor(loaded, {**TINY, **config})
    editor.attach()
    return editor


def seeded(editor, req, seed=0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return editor.apply(req)


def test_empty_memory_is_the_model_and_a_slow_write_holds_locally(tiny_loaded, tiny_family):
    loaded = tiny_loaded[tiny_family]
    texts = [EDIT.prompt, *UNRELATED]
    before = logits(loaded, texts)
    editor = nmc(loaded)
    try:
        assert torch.equal(logits(loaded, texts), before)  # empty memory: identical logits
        assert greedy_next(loaded, EDIT.prompt) != target_id(loaded, EDIT)
        stats = seeded(editor, EDIT)
        assert stats["absorbed"] and stats["slow_steps"] > 0 and stats["fast_steps"] == 0, stats
        assert greedy_next(loaded, EDIT.prompt) == target_id(loaded, EDIT)
        for text in UNRELATED:  # below the deferral threshold: exactly the model
            assert torch.equal(logits(loaded, [text]), logits_without(loaded, editor, [text]))
    finally:
        editor.detach()
    assert torch.equal(logits(loaded, texts), before)  # detach is bit-identical


def logits_without(loaded, editor, texts):
    editor.detach()
    try:
        return logits(loaded, texts)
    finally:
        editor._handles = []  # re-install the hooks with the memory as it is
        editor.attached = False
        blocks = editor.adapter.blocks()
        editor._handles = [
            loaded.model.register_forward_pre_hook(editor._model_pre_hook, with_kwargs=True),
            blocks[editor.key_layer].register_forward_hook(editor._key_hook),
            blocks[editor.layer].register_forward_hook(editor._write_hook)]
        editor.attached = True


def test_reads_are_per_row_in_mixed_batches_and_cached_generation(tiny_loaded, tiny_family):
    from editkit.generation import generate

    loaded = tiny_loaded[tiny_family]
    editor = nmc(loaded)
    try:
        seeded(editor, EDIT)
        texts = [EDIT.prompt, UNRELATED[1], UNRELATED[0]]
        batched = logits(loaded, texts)  # right padding
        for i, text in enumerate(texts):
            alone = logits(loaded, [text])[0]
            assert torch.allclose(batched[i, :alone.shape[0]], alone, atol=1e-5), f"row {i} differs in the batch"
        together = generate(loaded, texts, max_new_tokens=5)  # left padding, KV cache
        assert together == [generate(loaded, [t], max_new_tokens=5)[0] for t in texts]
        assert together[0].lstrip().startswith(EDIT.target_new)
    finally:
        editor.detach()


def test_controller_rewrites_reinforces_and_evicts(tiny_loaded):
    loaded = tiny_loaded["llama"]
    editor = nmc(loaded, slots=2)
    try:
        assert seeded(editor, EDIT)["action"] == "new"
        assert seeded(editor, EDIT)["action"] == "reinforce"  # same prompt, same answer: same slot
        changed = EditRequest(prompt=EDIT.prompt, target_new="capital")
        stats = seeded(editor, changed)
        assert (stats["action"], stats["slot"]) == ("rewrite", 0)
        assert greedy_next(loaded, EDIT.prompt) == target_id(loaded, changed)
        assert seeded(editor, EDIT2)["slot"] == 1
        usage = editor.memory.usage.clone()
        third = EditRequest(prompt="Cats often sleep for more than", target_new="Paris")
        stats = seeded(editor, third)  # full: the least used slot (EDIT2's, written once) goes
        assert usage[1] < usage[0]
        assert (stats["action"], stats["slot"], stats["evicted"]) == ("evict", 1, "capital")
        assert len(editor.memory) == 2 and editor.memory.labels == ["capital", "paris"]
        assert float(editor.memory.usage[1]) == 1.0  # the new occupant starts its own count
    finally:
        editor.detach()


def test_a_failed_write_changes_nothing(tiny_loaded, monkeypatch):
    from editkit.plugins.nmc.problem import EditProblem

    loaded = tiny_loaded["gpt2"]
    editor = nmc(loaded, feedback_lr=0.1, slow_steps=20)
    try:
        seeded(editor, EDIT)
        editor.config = editor.make_config({**editor.config.model_dump(), "margin": 50.0})  # slow steps go on
        tensors, meta = editor.state_dict()
        calls = {"n": 0}
        real = EditProblem.score

        def flaky(self, values, need_graph=False):
            calls["n"] += 1
            if calls["n"] > 3:  # after two slow steps, each of which trained the feedback module
                raise RuntimeError("boom")
            return real(self, values, need_graph)
        monkeypatch.setattr(EditProblem, "score", flaky)
        with pytest.raises(RuntimeError):
            editor.apply(EDIT2)
        after, meta2 = editor.state_dict()
        assert meta2 == meta and all(torch.equal(after[k], v) for k, v in tensors.items())
    finally:
        editor.detach()


def test_slow_steps_train_the_feedback_module(tiny_loaded):
    loaded = tiny_loaded["llama"]
    frozen, learning = nmc(loaded, feedback_lr=0.0), None
    try:
        before = {k: v.clone() for k, v in frozen.feedback.state_dict().items()}
        seeded(frozen, EDIT)
        assert all(torch.equal(before[k], v) for k, v in frozen.feedback.state_dict().items())
    finally:
        frozen.detach()
    learning = nmc(loaded, feedback_lr=0.05)
    try:
        stats = seeded(learning, EDIT)
        assert stats["slow_steps"] > 0 and "feedback_cosine" in stats
        assert any(not torch.equal(before[k], v) for k, v in learning.feedback.state_dict().items())
    finally:
        learning.detach()


def test_state_round_trip_reopen_and_rollback(tiny_loaded, tiny_family, tmp_path):
    loaded = tiny_loaded[tiny_family]
    texts = [EDIT.prompt, EDIT2.prompt, UNRELATED[0]]
    with Session.open(tmp_path / "ws", loaded=loaded, method="nmc", method_config=TINY) as session:
        first, _ = session.edit([EDIT, EDIT2], measure=False)
        both = logits(loaded, texts)
        tensors, meta = session.editor.state_dict()
    with Session.open(tmp_path / "ws", loaded=loaded) as session:
        assert torch.equal(logits(loaded, texts), both)
        again, meta2 = session.editor.state_dict()
        assert meta2 == meta and all(torch.equal(again[k], v) for k, v in tensors.items())
        session.rollback(first.id)
        rolled = logits(loaded, texts)
    with Session.open(tmp_path / "only2", loaded=loaded, method="nmc", method_config=TINY) as session:
        session.edit(EDIT2, measure=False)
        assert torch.equal(logits(loaded, texts), rolled)


def test_state_that_does_not_fit_is_refused(tiny_loaded):
    editor = nmc(tiny_loaded["llama"])
    try:
        seeded(editor, EDIT)
        tensors, meta = editor.state_dict()
        bad = dict(tensors, keys=tensors["keys"][:, :3])
        with pytest.raises(WorkspaceError, match="nmc state does not fit"):
            editor.load_state_dict(bad, meta)
        with pytest.raises(WorkspaceError):
            editor.load_state_dict(tensors, {**meta, "layer": meta["layer"] + 1})
        after, _ = editor.state_dict()
        assert all(torch.equal(after[k], v) for k, v in tensors.items())
    finally:
        editor.detach()


def test_feedback_file_round_trip_and_mismatch(tiny_loaded, tmp_path):
    loaded = tiny_loaded["llama"]
    editor = nmc(loaded)
    try:
        with torch.no_grad():
            for p in editor.feedback.parameters():
                p.add_(0.01)
        path = tmp_path / "sg.safetensors"
        save_feedback(path, editor.feedback, editor.feedback_info())
        tensors, doc = load_feedback(path)
        assert doc["layer"] == editor.layer and doc["hidden"] == editor.hidden
    finally:
        editor.detach()
    other = nmc(loaded, feedback=str(path))
    try:
        assert all(torch.equal(other.feedback.state_dict()[k], v) for k, v in tensors.items())
    finally:
        other.detach()
    with pytest.raises(InvalidRequest, match="does not fit"):
        nmc(loaded, feedback=str(path), layer=-1, key_layer=-1)
    with pytest.raises(InvalidRequest, match="not found"):
        nmc(loaded, feedback=str(tmp_path / "missing.safetensors"))


@pytest.mark.parametrize("values, field", [({"threshold": 1.5}, "threshold"), ({"slots": 0}, "slots"),
                                           ({"step_sizes": []}, "step_sizes"), ({"bogus": 1}, "bogus")])
def test_config_errors_name_the_field(tiny_loaded, values, field):
    with pytest.raises(InvalidRequest, match=field):
        NMCEditor.make_config(values)


def test_every_config_field_is_described():
    from editkit.plugins.nmc import NMCConfig

    assert all(f.description for f in NMCConfig.model_fields.values())


@pytest.mark.shared
def test_pretrain_command_on_a_tiny_model(tiny_dirs, tmp_path):
    from editkit.cli.main import build_app

    data = shared_path("counterfact-train")
    held = shared_path("counterfact")
    out = tmp_path / "sg.safetensors"
    result = CliRunner().invoke(build_app(), [
        "nmc", "pretrain", "--out", str(out), "--model", str(tiny_dirs["llama"]), "--records", "6",
        "--held-out", "3", "--steps", "3", "--epochs", "2", "--data", str(data), "--held-out-data", str(held),
        "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["pretrain"]["records"] == 6 and report["held_out"]["edits"] == 3
    assert load_feedback(out)[1]["pretrain"]["records"] == 6
    result = CliRunner().invoke(build_app(), ["nmc", "pretrain", "--out", str(out), "--data",
                                              str(tmp_path / "nope.json")])
    assert result.exit_code == 1 and "not found" in result.output


# ---- the default model ---------------------------------------------------------------------
@pytest.mark.model
@pytest.mark.shared
def test_edits_hold_and_unrelated_prompts_keep_their_answers(default_model):
    records = json.loads(shared_path("zsre").read_text())[:8]
    loaded = default_model
    loc_prompts, loc_answers = [r["loc"] for r in records], [r["loc_ans"] for r in records]
    before = answer_predictions(loaded, loc_prompts, loc_answers)
    editor = NMCEditor(loaded, {})
    editor.attach()
    try:
        for i, r in enumerate(records):
            seeded(editor, EditRequest(prompt=r["src"], target_new=r["alt"]), seed=i)
        rel = teacher_forced_accuracy(loaded, [r["src"] for r in records], [r["alt"] for r in records])
        loc = [agreement(b, a) for b, a in zip(before, answer_predictions(loaded, loc_prompts, loc_answers))]
    finally:
        editor.detach()
    assert sum(rel) / len(rel) >= 0.95, rel
    assert sum(loc) / len(loc) >= 0.95, loc


@pytest.mark.model
def test_controller_on_one_fact_edited_again_and_reversed(default_model):
    """The same fact edited twice: the second answer wins, in a rephrasing too; edited back to the
    model's own answer: the slot is erased and the model is exactly itself. A neighbour (same
    relation, another subject) never changes."""
    loaded = default_model
    fact, neighbour = "The capital of Germany is", "The capital of France is"
    prompts = [fact, neighbour]
    before, neighbour_before = logits(loaded, prompts), logits(loaded, [neighbour])
    own = loaded.tokenizer.decode([int(logits(loaded, [fact])[0, -1].argmax())]).strip()
    editor = NMCEditor(loaded, {})
    editor.attach()
    try:
        first = seeded(editor, EditRequest(prompt=fact, target_new="Paris", subject="Germany"))
        second = seeded(editor, EditRequest(prompt=fact, target_new="Rome", subject="Germany"))
        assert (first["action"], second["action"], second["slot"]) == ("new", "rewrite", first["slot"])
        assert teacher_forced_accuracy(loaded, [fact, "The capital city of Germany is"], ["Rome", "Rome"]) == [1.0, 1.0]
        assert torch.equal(logits(loaded, [neighbour]), neighbour_before)
        back = seeded(editor, EditRequest(prompt=fact, target_new=own, subject="Germany"))
        assert back["action"] == "erase" and len(editor.memory) == 1
        assert torch.equal(logits(loaded, prompts), before)
    finally:
        editor.detach()


@pytest.mark.model
@pytest.mark.shared
def test_pretrained_feedback_beats_plain_sgd_on_held_out_edits(default_model):
    """A small meta-training (64 edits; the issue's > 0.5 cosine is measured by benchmarks/nmc.py
    after 512): the module must point clearly closer to the true gradient than the untrained one,
    absorb edits in one step, and need fewer steps than plain SGD."""
    from editkit.plugins.nmc.pretrain import counterfact_requests, evaluate_feedback, pretrain, sgd_rate

    train = counterfact_requests(shared_path("counterfact-train"), 64)
    held = counterfact_requests(shared_path("counterfact"), 10)
    editor = NMCEditor(default_model, {})
    editor.attach()
    try:
        pretrain(editor, train, steps=6, epochs=40)
        report = evaluate_feedback(editor, held, sgd_rate(editor, train[:16]), limit=20)
    finally:
        editor.detach()
    report.pop("rows")
    assert report["cosine_mean"] > report["cosine_untrained_mean"] + 0.1, report
    assert report["one_step_success"] >= 0.3, report
    assert report["median_steps_nmc"] < report["median_steps_sgd"], report


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_model(tiny_dirs, dtype):
    from editkit.generation import generate
    from editkit.model import load_model

    loaded = load_model(str(tiny_dirs["llama"]), device="cpu", dtype=dtype)
    editor = nmc(loaded, fast_steps=1, slow_steps=20)
    try:
        stats = seeded(editor, EDIT)
        assert stats["steps"] >= 1 and stats["loss"] == stats["loss"]  # finite, not NaN
        assert len(generate(loaded, [EDIT.prompt, UNRELATED[0]], max_new_tokens=3)) == 2
    finally:
        editor.detach()


def test_the_subject_keys_the_slot_and_a_heuristic_stands_in_without_one(tiny_loaded, tiny_family):
    from editkit.tokens import token_span

    loaded = tiny_loaded[tiny_family]
    tok, prompt = loaded.tokenizer, "The mother tongue of Danielle Darrieux is"
    first, at = token_span(tok, prompt, "Danielle Darrieux")
    ids = tok(prompt).input_ids
    assert tok.decode(ids[:at + 1]).endswith("Darrieux") and not tok.decode(ids[:at]).endswith("Darrieux")
    assert tok.decode(ids[first:at + 1]).strip() == "Danielle Darrieux"
    assert token_span(tok, prompt, "danielle darrieux") == (first, at) and token_span(tok, prompt, "Paris") is None
    assert token_span(tok, "A comparison of ideas", "Paris") is None  # whole words only
    editor = nmc(loaded)
    try:
        stats = seeded(editor, EditRequest(prompt=prompt, target_new="English", subject="Danielle Darrieux"))
        _, tokens, _ = editor._capture(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))
        assert torch.allclose(editor.memory.subjects[stats["slot"]], tokens[at], atol=1e-5)
        unnamed = EditRequest(prompt=EDIT.prompt, target_new="Paris")  # no subject: the heuristic's token
        enc = tok(unnamed.prompt).input_ids
        _, tokens, _ = editor._capture(torch.tensor([enc]), torch.ones(1, len(enc), dtype=torch.long))
        assert int(editor.memory.leads[stats["slot"]]) == int(editor.canonical(torch.tensor(ids[at - 1])))
        chosen, lead = editor.subject_position(unnamed, tokens)
        assert 0 < chosen < len(enc) and lead == chosen - 1  # never the left-out first token; led by the one before
    finally:
        editor.detach()


def unit(*shape, seed):
    return torch.nn.functional.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_reads_run_from_the_subject_to_the_answer_and_agree_across_cached_calls():
    from editkit.plugins.nmc.memory import Memory

    subjects, keys = unit(3, 16, seed=0), unit(3, 16, seed=1)
    subjects[1] = subjects[0]  # slots 0 and 1: one subject, two facts told apart by the prompt's content
    names = torch.tensor([4, 4, 4])  # each subject key was taken at token 4
    leads = torch.tensor([-1, -1, 5])  # slot 2's subject has two tokens, the one before its last is token 5
    memory = Memory(keys, subjects, names, leads, torch.randn(3, 16), torch.tensor([7, 8, 9]), torch.zeros(3),
                    ["a", "b", "c"])
    noise = unit(6, 16, seed=2)
    tokens = noise.clone()
    tokens[2] = subjects[0]  # the subject at position 2
    context = torch.nn.functional.normalize(noise + 3 * keys[1], dim=-1)  # a prompt like slot 1's
    ids = torch.tensor([1, 2, 4, 8, 6, 5])  # the subject's token 4 at position 2; slot 1's answer ends with 8
    index, gate, after = memory.address(tokens[None], context[None], ids[None], threshold=0.6, width=0.1)
    assert gate[0].tolist() == [0, 0, 1, 0, 0, 0]  # from the subject up to the written answer
    assert int(index[0, 2]) == 1  # the content picks slot 1 of the subject; once its answer is
    # written neither it nor slot 0 (the same subject) is read: the model runs as it would
    # Without the answer the slot is read to the end; another subject's prompt reads nothing.
    _, open_gate, _ = memory.address(tokens[None], context[None], torch.tensor([[1, 2, 4, 0, 0, 0]]), 0.6, 0.1)
    assert bool((open_gate[0, 2:] == 1).all()) and bool((open_gate[0, :2] == 0).all())
    _, neighbour, _ = memory.address(noise[None], context[None], None, 0.6, 0.1)
    assert not bool(neighbour.any())
    _, other_token, _ = memory.address(tokens[None], context[None], torch.tensor([[1, 2, 3, 0, 0, 0]]), 0.6, 0.1)
    assert not bool(other_token.any())  # a like state at another token: not the subject
    # Slot 2 matches only after its subject's own token before the last: "Rod|man", not "Hoff|man".
    other = noise.clone()
    other[4] = subjects[2]
    for before_it, reads in ((5, True), (6, False)):
        row = torch.tensor([[1, 2, 3, before_it, 4, 4]])
        index2, gate2, _ = memory.address(other[None], context[None], row, 0.6, 0.1)
        assert bool(gate2[0, 4] > 0) == reads and (not reads or int(index2[0, 4]) == 2)
    # The same row fed in cached calls (3 tokens, then one at a time) reads the same.
    gates, carried = [], None
    for a, b in ((0, 3), (3, 4), (4, 5), (5, 6)):
        _, g, carried = memory.address(tokens[None, a:b], context[None, a:b], ids[None, a:b], 0.6, 0.1, carried)
        gates.append(g)
    assert torch.equal(torch.cat(gates, dim=1), gate)


def test_saves_of_only_what_changed_reopen_to_the_same_state(tiny_loaded, tmp_path):
    """NMC saves only the slot an edit wrote, the usage counts and the feedback module
    (tracks_changes): over new, reinforce, rewrite and evict, each edit saved on its own, the
    reopened state equals the one in memory."""
    loaded = tiny_loaded["llama"]
    edits = [EDIT, EDIT, EditRequest(prompt=EDIT.prompt, target_new="capital"), EDIT2,
             EditRequest(prompt="Cats often sleep for more than", target_new="Paris")]
    with Session.open(tmp_path / "ws", loaded=loaded, method="nmc", method_config={**TINY, "slots": 2}) as session:
        actions = [session.edit(e, measure=False)[0].stats["action"] for e in edits]
        tensors, meta = session.editor.state_dict()
        tensors = {k: v.clone() for k, v in tensors.items()}
    assert actions == ["new", "reinforce", "rewrite", "new", "evict"]
    with Session.open(tmp_path / "ws", loaded=loaded) as session:
        again, meta2 = session.editor.state_dict()
    assert meta2 == meta and again.keys() == tensors.keys()
    assert all(torch.equal(again[k], v) for k, v in tensors.items())


def test_one_pretrained_module_serves_memories_at_several_layers(tiny_dirs, tmp_path):
    """`nmc pretrain --layers a,b` fits one module on both memories' gradients; the file loads
    for a memory at either layer and is refused at another."""
    from editkit.cli.main import build_app
    from editkit.model import load_model

    out = tmp_path / "shared.safetensors"
    result = CliRunner().invoke(build_app(), [
        "nmc", "pretrain", "--out", str(out), "--model", str(tiny_dirs["llama"]), "--records", "4",
        "--held-out", "2", "--steps", "2", "--epochs", "1", "--layers", "1,-1",
        "--data", str(shared_path("counterfact-train")), "--held-out-data", str(shared_path("counterfact")), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    depth = len(load_model(str(tiny_dirs["llama"]), device="cpu").adapter.blocks())
    assert report["pretrain"]["layers"] == [1, depth - 1] and list(report["held_out_other_layers"]) == [str(depth - 1)]
    assert report["pretrain"]["samples"] > report["pretrain"]["records"]  # both layers' gradients
    loaded = load_model(str(tiny_dirs["llama"]), device="cpu")
    for layer in (1, -1):
        editor = NMCEditor(loaded, {"layer": layer, "key_layer": 0, "feedback": str(out)})
        editor.attach()
        editor.detach()
    with pytest.raises(InvalidRequest, match="layer"):
        NMCEditor(loaded, {"layer": 2, "key_layer": 0, "feedback": str(out)}).attach()
    bad = CliRunner().invoke(build_app(), ["nmc", "pretrain", "--out", str(out), "--layers", "one,two"])
    assert bad.exit_code == 1 and "--layers" in bad.output


def test_reads_of_the_slots_named_in_the_input_equal_reads_of_the_whole_memory():
    """Memory.address computes similarities only for slots keyed at one of the input's tokens
    (or started earlier); on random memories, inputs and carried state it equals the full
    computation wherever a slot is read, and carries the same state on."""
    from editkit.plugins.nmc.memory import Memory

    gen = torch.Generator().manual_seed(0)
    h, n = 16, 40
    unit = lambda *s: torch.nn.functional.normalize(torch.randn(*s, h, generator=gen), dim=-1)  # noqa: E731
    subjects = unit(n)
    names = torch.randint(0, 30, (n,), generator=gen)  # inputs use ids below 12: most slots go unnamed
    leads = torch.where(torch.rand(n, generator=gen) < 0.3, -1, torch.randint(0, 12, (n,), generator=gen))
    memory = Memory(unit(n), subjects, names, leads, torch.randn(n, h, generator=gen), torch.randint(0, 12, (n,), generator=gen),
                    torch.rand(n, generator=gen), [str(i) for i in range(n)])
    ids = torch.randint(0, 12, (3, 7), generator=gen)
    ids[2] = 20  # a row naming no slot
    tokens = unit(3, 7)
    for row, pos, slot in ((0, 3, 5), (1, 2, 9)):  # slots matched at their own token and lead
        tokens[row, pos] = subjects[slot]
        ids[row, pos] = names[slot]
        ids[row, pos - 1] = leads[slot] if leads[slot] >= 0 else 11
    context = unit(3, 7)
    before = None
    for call in range(3):  # a prompt, then cached steps carrying state on
        assert 0 < int(torch.isin(names, ids).sum()) < n  # the prefilter leaves slots out
        a = memory.address(tokens, context, ids, 0.6, 0.15, before, prefilter=True)
        b = memory.address(tokens, context, ids, 0.6, 0.15, before, prefilter=False)
        assert torch.equal(a[1], b[1])
        assert bool((a[1][:2] > 0).any(dim=1).all()) or call > 0  # both prompts read their slots
        assert torch.equal(a[0][a[1] > 0], b[0][b[1] > 0])
        assert all(torch.equal(x, y) for x, y in zip(a[2], b[2]))
        before = a[2]
        tokens, context = unit(3, 1), unit(3, 1)
        ids = torch.randint(0, 12, (3, 1), generator=gen)
    none = torch.full((2, 4), 99)  # no slot keyed at any of these tokens, nothing carried
    a = memory.address(unit(2, 4), unit(2, 4), none, 0.6, 0.15)
    b = memory.address(unit(2, 4), unit(2, 4), none, 0.6, 0.15, prefilter=False)
    assert not bool(a[1].any()) and not bool(b[1].any())
    assert all(torch.equal(x, y) for x, y in zip(a[2], b[2]))


def test_writing_slots_in_place_equals_copying_them():
    """write_slot (the editor's: rows overwritten, buffers that grow) leaves the same memory as
    with_slot (a copy) over appends past the buffers' first size, rewrites, evictions; an older
    memory sharing the buffers does not write over the newer one's rows."""
    from editkit.plugins.nmc.memory import Entry, Memory, with_slot, write_slot

    gen = torch.Generator().manual_seed(1)
    h = 8

    def entry(i):
        return Entry(torch.randn(h, generator=gen), torch.randn(h, generator=gen), i, i + 1,
                     torch.randn(h, generator=gen), i + 2, f"label {i}")

    copied = in_place = Memory.empty(h, "cpu")
    steps = [(i, False) for i in range(70)] + [(3, False), (69, True), (0, True), (70, False)]
    for i, (slot, fresh) in enumerate(steps):
        e = entry(i)
        copied = with_slot(copied, slot, e, 0.99, new_occupant=fresh)
        in_place = write_slot(in_place, slot, e, 0.99, new_occupant=fresh)
        if i == 66:  # after the buffers grew once: it shares them with the memories after it
            older = in_place
    assert in_place.labels == copied.labels and len(in_place) == 71
    assert all(torch.equal(getattr(in_place, n), getattr(copied, n)) for n in Memory.TENSORS)
    before = in_place.keys.clone()
    write_slot(older, len(older), entry(99), 0.99)  # an older memory appends: into new buffers
    assert torch.equal(in_place.keys, before)
