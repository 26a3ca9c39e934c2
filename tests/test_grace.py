"""GRACE mechanics on tiny models of every family: the edit holds, unrelated prompts are
untouched, detach is bit-identical, codebook rules (add / split / expand / overwrite), the faiss
path agrees with the torch path, and state survives a Session reopen."""

from __future__ import annotations

import pytest
import torch

from editkit.errors import InvalidRequest, WorkspaceError
from editkit.scoring import teacher_forced_accuracy
from editkit.host import get_host
from editkit.schemas import EditRequest
from editkit.session import Session

# Single-token targets: a tiny random model cannot carry a value at one position to a second
# target token (the real model can; see test_eval_runner's default-model run).
EDIT = EditRequest(prompt="The capital of Germany is", target_new="Paris")
OTHER = EditRequest(prompt="The quick brown fox jumps over", target_new="capital")
UNRELATED = "What is the product made by UniFirst? uniform."


def logits(loaded, text: str) -> torch.Tensor:
    ids = loaded.tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        return loaded.model(input_ids=ids).logits


def grace(loaded, **config):
    editor = get_host().editor("grace")(loaded, config)
    editor.attach()
    return editor


@pytest.fixture
def loaded(tiny_loaded, tiny_family):
    return tiny_loaded[tiny_family]


def test_edit_holds_locality_and_detach(loaded):
    before_edit, before_other = logits(loaded, EDIT.prompt + " Paris"), logits(loaded, UNRELATED)
    weights = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    editor = grace(loaded)
    try:
        stats = editor.apply(EDIT)
        assert stats["action"] == "add" and stats["codebook_size"] == 1
        assert teacher_forced_accuracy(loaded, [EDIT.prompt], [EDIT.target_new]) == [1.0]
        assert torch.equal(logits(loaded, UNRELATED), before_other)  # no key within its radius
        editor.apply(OTHER)
        assert teacher_forced_accuracy(loaded, [EDIT.prompt, OTHER.prompt], ["Paris", "capital"]) == [1.0, 1.0]
    finally:
        editor.detach()
    assert torch.equal(logits(loaded, EDIT.prompt + " Paris"), before_edit)
    assert all(torch.equal(v, weights[k]) for k, v in loaded.model.state_dict().items())


def test_codebook_rules(tiny_loaded):
    loaded = tiny_loaded["llama"]
    editor = grace(loaded, epsilon=5.0, steps=30)  # radii so wide that every key conflicts
    try:
        assert editor.apply(EDIT)["action"] == "add"
        again = editor.apply(EditRequest(prompt=EDIT.prompt, target_new="the"))
        assert again["action"] == "overwrite" and editor.labels == ["the"]
        split = editor.apply(OTHER)
        assert split["action"] == "split" and len(editor.labels) == 2
        d = float(torch.dist(editor.keys[0], editor.keys[1]))
        assert editor.radii.tolist() == pytest.approx([d / 2, d / 2], rel=1e-5)
        expand = editor.apply(EditRequest(prompt="The capital of Germany was", target_new="capital"))
        assert expand["action"] in ("expand", "split")
    finally:
        editor.detach()


def test_faiss_search_matches_torch(tiny_loaded):
    loaded = tiny_loaded["gpt2"]
    outputs = {}
    for min_keys in (10_000, 1):
        editor = grace(loaded, faiss_min_keys=min_keys, steps=20)
        try:
            editor.apply(EDIT)
            editor.apply(OTHER)
            outputs[min_keys] = (logits(loaded, EDIT.prompt + " Paris"), logits(loaded, UNRELATED))
        finally:
            editor.detach()
    assert torch.allclose(outputs[1][0], outputs[10_000][0], atol=1e-5)
    assert torch.equal(outputs[1][1], outputs[10_000][1])


def test_block_output_site(tiny_loaded):
    loaded = tiny_loaded["gpt_neox"]
    before = logits(loaded, UNRELATED)
    editor = grace(loaded, component="block.out", layer=-2)
    try:
        editor.apply(EDIT)
        assert teacher_forced_accuracy(loaded, [EDIT.prompt], ["Paris"]) == [1.0]
        assert torch.equal(logits(loaded, UNRELATED), before)
    finally:
        editor.detach()
    assert torch.equal(logits(loaded, UNRELATED), before)


def test_config_is_validated(tiny_loaded):
    with pytest.raises(InvalidRequest, match="epsilon"):
        get_host().editor("grace")(tiny_loaded["gpt2"], {"epsilon": -1})
    with pytest.raises(InvalidRequest, match="component"):
        get_host().editor("grace")(tiny_loaded["gpt2"], {"component": "attn.q"})


def test_state_round_trip_through_session(loaded, tmp_path):
    ws = tmp_path / "ws"
    with Session.open(ws, loaded=loaded, method="grace", method_config={"steps": 40}) as session:
        session.edit([EDIT, OTHER], measure=False)
        edited = logits(loaded, EDIT.prompt + " Paris")
        labels = list(session.editor.labels)
    with Session.open(ws, loaded=loaded) as session:
        assert session.editor.labels == labels
        assert torch.equal(logits(loaded, EDIT.prompt + " Paris"), edited)
        session.rollback(1)  # replaying the other edit alone
        assert session.editor.labels == ["capital"]


def test_state_that_does_not_fit_is_refused(tiny_loaded):
    editor = grace(tiny_loaded["gpt2"], steps=5)
    try:
        editor.apply(EDIT)
        tensors, meta = editor.state_dict()
        bad = dict(tensors, keys=tensors["keys"][:, :3])
        with pytest.raises(WorkspaceError):
            editor.load_state_dict(bad, meta)
        with pytest.raises(WorkspaceError):
            editor.load_state_dict(tensors, {**meta, "layer": 0})
        assert editor.keys.shape[1] == tensors["keys"].shape[1]  # unchanged by the refused loads
    finally:
        editor.detach()
