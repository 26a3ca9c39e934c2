"""A workspace written by the release before content-addressed state (workspace format 1,
journal schema 1: each state a whole directory) opens read-only as it is and migrates on
the first writing open, keeping its edits, checkpoints and state bit for bit.

tests/data/workspace-v1 was written by editkit at commit a82a373 with the tiny GPT-2 of
editkit.testing (seed 0): ft, 5 edits with checkpoint_every=2, then edit 4 rolled back."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from editkit.host import get_host
from editkit.legacy import read_state_dir
from editkit.schemas import EditRequest
from editkit.session import Session, turn_seed
from editkit.store import Journal

FIXTURE = Path(__file__).parent / "data" / "workspace-v1"
FAST = {"steps": 4, "lr": 0.05, "early_stop_loss": 0.0}


@pytest.fixture
def old_workspace(tmp_path, tiny_dirs, tiny_loaded) -> Path:
    ws = tmp_path / "ws"
    shutil.copytree(FIXTURE, ws)
    settings = json.loads((ws / "workspace.json").read_text())
    # The same tiny model, built again here: only its path differs from where it was written.
    assert settings["fingerprint"] == tiny_loaded["gpt2"].fingerprint
    settings["model"] = str(tiny_dirs["gpt2"].resolve())
    (ws / "workspace.json").write_text(json.dumps(settings))
    return ws


def old_states(ws: Path):
    """The head's and each checkpoint's editor state as the old release stored them."""
    journal = Journal(ws / "journal.sqlite", readonly=True)
    try:
        head = journal.db.execute("SELECT state_ref, digests FROM head").fetchone()
        checkpoints = journal.db.execute("SELECT state_ref, digests, edit_ids FROM checkpoints").fetchall()
    finally:
        journal.close()
    read = lambda ref, digests: read_state_dir(ws / "state" / ref, json.loads(digests))["editor"]  # noqa: E731
    return read(*head), {max(json.loads(ids)): read(ref, d) for ref, d, ids in checkpoints}


def same(a, b) -> bool:
    return a[1] == b[1] and a[0].keys() == b[0].keys() and all(torch.equal(a[0][k], b[0][k]) for k in a[0])


def test_old_workspace_migrates_bit_exactly(old_workspace, tiny_loaded):
    loaded = tiny_loaded["gpt2"]
    head, checkpoints = old_states(old_workspace)
    with Session.open(old_workspace, loaded=loaded) as s:
        assert [(r.id, r.status, r.turn) for r in s.history()] == [
            (1, "applied", 1), (2, "applied", 2), (3, "applied", 3), (4, "rolled_back", 4), (5, "applied", 5)]
        assert s.journal.version == 2 and s.journal.checkpoint_ids() == [2]
        assert same(s.editor.state_dict(), head)
        upto, manifest = s.journal.checkpoint_before(3)
        assert upto == 2 and same(s.chunks.read(manifest)["editor"], checkpoints[2])
        # Rolling back edit 3 replays edit 5 on the migrated checkpoint (seeded as the session does).
        s.rollback(3)
        rolled = s.editor.state_dict()
    assert json.loads((old_workspace / "workspace.json").read_text())["format"] == 2
    assert sorted(p.name for p in (old_workspace / "state").iterdir()) == ["chunks"]
    editor = get_host().editor("ft")(loaded, FAST)
    editor.attach()
    try:
        editor.load_state_dict(*checkpoints[2])
        fifth = EditRequest(prompt="The Eiffel Tower is located in the city of", target_new="Rome")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(turn_seed([fifth]))
            editor.apply(fifth)
        assert same(editor.state_dict(), rolled)
    finally:
        editor.detach()
    with Session.open(old_workspace, loaded=loaded) as s:  # and it reopens as any workspace does
        assert same(s.editor.state_dict(), rolled)
        assert [r.id for r in s.history(active_only=True)] == [1, 2, 5]


def test_old_workspace_opens_read_only_unchanged(old_workspace, tiny_loaded):
    loaded = tiny_loaded["gpt2"]
    (tensors, _), _ = old_states(old_workspace)
    before = {p: p.read_bytes() for p in old_workspace.rglob("*") if p.is_file()}
    with Session.open(old_workspace, loaded=loaded, readonly=True) as s:
        assert torch.equal(s.editor.state_dict()[0]["delta"], tensors["delta"])
        assert len(s.history()) == 5
        s.generate("The capital of France is", max_new_tokens=3)
    assert {p: p.read_bytes() for p in old_workspace.rglob("*") if p.is_file()} == before


def test_a_crash_during_migration_leaves_the_old_workspace(old_workspace, tiny_loaded, monkeypatch):
    from editkit import legacy

    loaded = tiny_loaded["gpt2"]
    before = {p: p.read_bytes() for p in old_workspace.rglob("*") if p.is_file()}

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(legacy.Journal, "_apply", fail)  # inside the migration's transaction
    with pytest.raises(OSError, match="disk full"):
        Session.open(old_workspace, loaded=loaded)
    monkeypatch.undo()
    old_files = {p: b for p, b in before.items() if "chunks" not in p.parts}
    assert {p: p.read_bytes() for p in old_workspace.rglob("*") if p.is_file() and "chunks" not in p.parts
            and p.name != ".lock"} == old_files
    with Session.open(old_workspace, loaded=loaded) as s:  # and the next open migrates it
        assert s.journal.version == 2 and len(s.history()) == 5
