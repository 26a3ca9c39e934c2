"""Workspace storage: the SQLite journal, and plugin state as safetensors + JSON.

Crash safety: state is written to a fresh directory and renamed into place, then ONE SQLite
transaction records the edit and points the workspace head at that directory. A crash before
the commit leaves an unreferenced directory (swept on open); after it, the edit is complete."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from editkit.errors import WorkspaceError

SCHEMA = """
CREATE TABLE IF NOT EXISTS edits (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    request TEXT NOT NULL,
    method TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('applied', 'rolled_back')),
    created_at REAL NOT NULL,
    rolled_back_at REAL,
    metrics TEXT NOT NULL,
    stats TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS head (
    one INTEGER PRIMARY KEY CHECK (one = 1),
    state_ref TEXT,
    digests TEXT
);
CREATE TABLE IF NOT EXISTS checkpoints (
    state_ref TEXT PRIMARY KEY,
    digests TEXT NOT NULL,
    edit_ids TEXT NOT NULL
);
"""


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class EditRecord:
    id: int
    request: dict[str, Any]
    method: str
    status: str
    created_at: float
    rolled_back_at: float | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


ComponentStates = dict[str, tuple[dict[str, torch.Tensor], dict[str, Any]]]


class StateStore:
    """Directories of component state under <workspace>/state/<ref>/."""

    def __init__(self, root: Path, readonly: bool = False):
        self.root = root
        if not readonly:
            self.root.mkdir(parents=True, exist_ok=True)

    def write(self, states: ComponentStates) -> tuple[str, dict[str, str]]:
        """Write every component's state into a new directory; return (ref, file digests)."""
        ref = uuid.uuid4().hex
        tmp = self.root / f".tmp-{ref}"
        tmp.mkdir()
        digests = {}
        for name, (tensors, meta) in states.items():
            tensor_file, meta_file = tmp / f"{name}.safetensors", tmp / f"{name}.json"
            # safetensors refuses shared or non-contiguous storage: give it plain copies.
            save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()},
                      str(tensor_file))
            meta_file.write_text(json.dumps(meta, sort_keys=True), encoding="utf-8")
            for f in (tensor_file, meta_file):
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
                digests[f.name] = sha256_file(f)
        os.replace(tmp, self.root / ref)
        return ref, digests

    def read(self, ref: str, digests: dict[str, str]) -> ComponentStates:
        folder = self.root / ref
        for fname, expected in digests.items():
            path = folder / fname
            if not path.is_file():
                raise WorkspaceError(f"state file {path} is missing")
            try:
                actual = sha256_file(path)
            except OSError as exc:
                raise WorkspaceError(f"cannot read state file {path}: {exc.strerror or exc}") from exc
            if actual != expected:
                raise WorkspaceError(f"state file {path} fails its checksum (modified or corrupt)")
        states: ComponentStates = {}
        names = sorted({f.rsplit(".", 1)[0] for f in digests})
        for name in names:
            try:
                tensors = load_file(str(folder / f"{name}.safetensors"))
                meta = json.loads((folder / f"{name}.json").read_text(encoding="utf-8"))
            except (SafetensorError, OSError, ValueError) as exc:
                raise WorkspaceError(f"cannot read state of '{name}' in {folder}: {exc}") from exc
            states[name] = (tensors, meta)
        return states

    def sweep(self, keep: set[str]) -> None:
        """Delete state directories no journal row refers to (left by a crash or superseded)."""
        for entry in self.root.iterdir():
            if entry.name not in keep:
                shutil.rmtree(entry, ignore_errors=True)


def _connect_readonly(path: Path, no_writer: bool) -> sqlite3.Connection:
    """A connection that never writes. SQLite's read-only mode still creates the -shm/-wal
    files of a WAL journal, so where no writer can be at work (`no_writer`: the caller holds
    the workspace lock shared) and no -wal file is left over, the file opens as immutable; so
    does a journal in a directory this process cannot write (nobody can be writing it there)."""
    uri = path.resolve().as_uri()

    def connect(query: str) -> sqlite3.Connection:
        db = sqlite3.connect(uri + query, uri=True, isolation_level=None, check_same_thread=False)
        try:
            db.execute("SELECT count(*) FROM edits").fetchone()
        except BaseException:
            db.close()
            raise
        return db

    wal = path.with_name(path.name + "-wal")
    if no_writer and not wal.exists():
        return connect("?immutable=1")
    try:
        return connect("?mode=ro")
    except sqlite3.OperationalError:
        if os.access(path.parent, os.W_OK):
            raise
    return connect("?immutable=1")


class Journal:
    """The SQLite journal of edits, the workspace head and rollback checkpoints."""

    def __init__(self, path: Path, readonly: bool = False, no_writer: bool = False):
        """`readonly` opens an existing journal for reading only (history, a server's GET
        handlers): it never takes a write lock, so it can read while an edit is running.
        `no_writer`: the caller guarantees no other process writes meanwhile (it holds the
        workspace lock), so nothing at all is written, not even SQLite's shared-memory file."""
        path = Path(path)
        if readonly and not path.is_file():
            raise WorkspaceError(f"no journal at {path}")
        try:
            if readonly:
                self.db = _connect_readonly(path, no_writer)
                return
            self.db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.executescript(SCHEMA)
        except sqlite3.Error as exc:
            if getattr(self, "db", None) is not None:
                self.db.close()
            raise WorkspaceError(f"cannot open journal {path}: {exc}") from exc

    def close(self) -> None:
        self.db.close()

    # ---- reads -------------------------------------------------------------------------
    def records(self, active_only: bool = False) -> list[EditRecord]:
        sql = "SELECT id, request, method, status, created_at, rolled_back_at, metrics, stats FROM edits"
        if active_only:
            sql += " WHERE status = 'applied'"
        rows = self.db.execute(sql + " ORDER BY id").fetchall()
        return [EditRecord(r[0], json.loads(r[1]), r[2], r[3], r[4], r[5], json.loads(r[6]), json.loads(r[7]))
                for r in rows]

    def record(self, edit_id: int) -> EditRecord | None:
        return next((r for r in self.records() if r.id == edit_id), None)

    def head(self) -> tuple[str | None, dict[str, str]]:
        row = self.db.execute("SELECT state_ref, digests FROM head WHERE one = 1").fetchone()
        return (row[0], json.loads(row[1])) if row else (None, {})

    def checkpoints(self) -> list[tuple[str, dict[str, str], list[int]]]:
        rows = self.db.execute("SELECT state_ref, digests, edit_ids FROM checkpoints").fetchall()
        return [(r[0], json.loads(r[1]), json.loads(r[2])) for r in rows]

    def referenced_states(self) -> set[str]:
        ref, _ = self.head()
        return {c[0] for c in self.checkpoints()} | ({ref} if ref else set())

    # ---- writes (each one transaction) -------------------------------------------------
    def _set_head(self, ref: str, digests: dict[str, str]) -> None:
        self.db.execute("INSERT INTO head (one, state_ref, digests) VALUES (1, ?, ?) "
                        "ON CONFLICT(one) DO UPDATE SET state_ref = excluded.state_ref, digests = excluded.digests",
                        (ref, json.dumps(digests)))

    def commit_edit(self, request: dict, method: str, metrics: dict, stats: dict, ref: str,
                    digests: dict[str, str], checkpoint: bool) -> EditRecord:
        now = time.time()
        with self._transaction():
            cur = self.db.execute(
                "INSERT INTO edits (request, method, status, created_at, metrics, stats) VALUES (?, ?, 'applied', ?, ?, ?)",
                (json.dumps(request), method, now, json.dumps(metrics), json.dumps(stats)))
            edit_id = cur.lastrowid
            self._set_head(ref, digests)
            if checkpoint:
                ids = [r[0] for r in self.db.execute("SELECT id FROM edits WHERE status = 'applied' ORDER BY id")]
                self.db.execute("INSERT INTO checkpoints (state_ref, digests, edit_ids) VALUES (?, ?, ?)",
                                (ref, json.dumps(digests), json.dumps(ids)))
        return EditRecord(edit_id, request, method, "applied", now, None, metrics, stats)

    def commit_head(self, ref: str, digests: dict[str, str]) -> None:
        """Point the workspace at new state without an edit (e.g. an intervention changed)."""
        with self._transaction():
            self._set_head(ref, digests)

    def commit_rollback(self, edit_id: int, ref: str, digests: dict[str, str]) -> None:
        with self._transaction():
            self.db.execute("UPDATE edits SET status = 'rolled_back', rolled_back_at = ? WHERE id = ?",
                            (time.time(), edit_id))
            self._set_head(ref, digests)
            # Checkpoints that contain the rolled-back edit no longer describe any reachable state.
            for state_ref, _, ids in self.checkpoints():
                if edit_id in ids:
                    self.db.execute("DELETE FROM checkpoints WHERE state_ref = ?", (state_ref,))

    def _transaction(self):
        db = self.db

        class _Tx:
            def __enter__(self):
                db.execute("BEGIN IMMEDIATE")

            def __exit__(self, exc_type, *_):
                db.execute("ROLLBACK" if exc_type else "COMMIT")
                return False

        return _Tx()
