"""Opening a workspace never destroys what it did not create, and a read-only open writes
nothing (issue 13: a failed first open used to delete a directory's state/ and journal)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from editkit.errors import ModelLoadError, WorkspaceError
from editkit.session import Session

FAST = {"steps": 3, "lr": 0.05, "early_stop_loss": 0.0}


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under `root` with its bytes and modification time."""
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_failed_first_open_keeps_a_foreign_directory(tmp_path):
    d = tmp_path / "d"
    (d / "state").mkdir(parents=True)
    (d / "state" / "p.txt").write_text("precious")
    (d / "journal.sqlite").write_text("mine")
    before = snapshot(d)
    with pytest.raises(WorkspaceError, match="non-empty directory that is not an editkit workspace"):
        Session.open(d, model="/nonexistent/model", device="cpu")
    assert snapshot(d) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # no temporary directory left


def test_failed_first_open_of_an_empty_directory_leaves_it_empty(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    with pytest.raises(ModelLoadError):
        Session.open(d, model="/nonexistent/model", device="cpu")
    assert d.is_dir() and list(d.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_failure_after_creation_removes_only_the_new_workspace(tmp_path, tiny_loaded, monkeypatch):
    d = tmp_path / "ws"
    d.mkdir()
    from editkit import session as session_module

    def broken(*args, **kwargs):
        raise RuntimeError("attach failed")

    monkeypatch.setattr(session_module, "_open_parts", broken)
    with pytest.raises(RuntimeError, match="attach failed"):
        Session.open(d, loaded=tiny_loaded["gpt2"], method="ft", method_config=FAST)
    assert d.is_dir() and list(d.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ws"]


def test_creating_into_an_empty_directory_works(tmp_path, tiny_loaded):
    d = tmp_path / "ws"
    d.mkdir()
    with Session.open(d, loaded=tiny_loaded["gpt2"], method="ft", method_config=FAST) as s:
        s.edit({"prompt": "The capital of France is", "target_new": "Rome"}, measure=False)
    with Session.open(d, loaded=tiny_loaded["gpt2"]) as s:
        assert [r.id for r in s.history()] == [1]
    assert not [p for p in tmp_path.iterdir() if p.name != "ws"]


def test_readonly_open_writes_nothing_and_refuses_changes(tmp_path, tiny_loaded):
    loaded = tiny_loaded["llama"]
    ws = tmp_path / "ws"
    with Session.open(ws, loaded=loaded, method="ft", method_config=FAST) as s:
        s.edit({"prompt": "The capital of France is", "target_new": "Rome"}, measure=False)
        expected = s.generate("The capital of France is", max_new_tokens=4)
    before = snapshot(ws)
    with Session.open(ws, loaded=loaded, readonly=True) as s:
        assert s.generate("The capital of France is", max_new_tokens=4) == expected
        with Session.open(ws, loaded=loaded, readonly=True) as other:  # readers share the workspace
            assert other.history()[0].id == 1
        with pytest.raises(WorkspaceError, match="in use"):
            Session.open(ws, loaded=loaded)  # but a writer waits for them
        for action in (lambda: s.edit({"prompt": "a", "target_new": "b"}), lambda: s.rollback(1),
                       lambda: s.add_intervention("ph3")):
            with pytest.raises(WorkspaceError, match="open read-only"):
                action()
    assert snapshot(ws) == before
    with pytest.raises(WorkspaceError, match="no workspace"):
        Session.open(tmp_path / "absent", loaded=loaded, readonly=True)
    assert not (tmp_path / "absent").exists()


def test_readonly_journal_in_an_unwritable_directory(tmp_path, tiny_loaded, monkeypatch):
    """Root ignores permissions, so the unwritable directory is simulated: SQLite's read-only
    mode fails for want of a -shm file, and the journal opens immutable instead."""
    import sqlite3

    from editkit import store
    from editkit.store import Journal

    ws = tmp_path / "ws"
    with Session.open(ws, loaded=tiny_loaded["gpt2"], method="ft", method_config=FAST) as s:
        s.edit({"prompt": "The capital of France is", "target_new": "Rome"}, measure=False)
    real_connect, real_access = sqlite3.connect, os.access

    def connect(database, *args, **kwargs):
        if "mode=ro" in str(database):
            raise sqlite3.OperationalError("unable to open database file")
        return real_connect(database, *args, **kwargs)

    monkeypatch.setattr(store.sqlite3, "connect", connect)
    monkeypatch.setattr(store.os, "access", lambda p, m: False if Path(p) == ws else real_access(p, m))
    journal = Journal(ws / "journal.sqlite", readonly=True)
    assert [r.id for r in journal.records()] == [1]
    journal.close()
    monkeypatch.setattr(store.os, "access", real_access)
    with pytest.raises(WorkspaceError, match="cannot open journal"):  # writable: the error stands
        Journal(ws / "journal.sqlite", readonly=True)


def test_cli_edit_on_a_foreign_directory_is_a_one_line_error(tmp_path):
    from typer.testing import CliRunner

    from editkit.cli.main import build_app

    d = tmp_path / "d"
    (d / "state").mkdir(parents=True)
    (d / "state" / "p.txt").write_text("precious")
    (d / "journal.sqlite").write_text("mine")
    before = snapshot(d)
    result = CliRunner().invoke(build_app(), ["edit", "The sky is", "green", "--workspace", str(d),
                                              "--model", "/nonexistent/model", "--device", "cpu"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.stderr.strip().startswith("error: ") and "not an editkit workspace" in result.stderr
    assert snapshot(d) == before
