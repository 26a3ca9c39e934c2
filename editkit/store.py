"""Workspace storage: the SQLite journal of edits, and which component states it keeps.

Layout (journal schema 2, `PRAGMA user_version`): `edits` holds every edit; `states` holds
state manifests (editkit.chunks), one for the head and one per rollback checkpoint; `chunks`
counts, for every chunk file, the references to it (from manifests, and from index chunks to
their blocks). An edit, a rollback or an intervention change is ONE transaction: the edit
rows, the new head, new and dropped checkpoints, and the reference counts. Chunk files are
written (and fsynced) before it and unreferenced ones deleted after it, so a crash at any
moment leaves the edit complete or absent; chunk files no row counts (left by a crash) are
swept on the next open. Journals of schema 1 (state as whole directories) migrate on open."""

from __future__ import annotations

import json
import math
import os
import sqlite3
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from editkit.chunks import ChunkStore, manifest_chunks
from editkit.errors import WorkspaceError

SCHEMA_VERSION = 2
SCHEMA = """
CREATE TABLE IF NOT EXISTS edits (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    request TEXT NOT NULL,
    method TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('applied', 'rolled_back')),
    created_at REAL NOT NULL,
    rolled_back_at REAL,
    metrics TEXT NOT NULL,
    stats TEXT NOT NULL,
    turn INTEGER
);
CREATE INDEX IF NOT EXISTS edits_by_status ON edits (status, id);
CREATE TABLE IF NOT EXISTS states (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    manifest TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS head (
    one INTEGER PRIMARY KEY CHECK (one = 1),
    state_id INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS checkpoints (
    upto_id INTEGER PRIMARY KEY,
    state_id INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS chunks (
    digest TEXT PRIMARY KEY,
    kind TEXT NOT NULL CHECK (kind IN ('data', 'index')),
    refs INTEGER NOT NULL CHECK (refs > 0)
) WITHOUT ROWID;
"""
_COLUMNS = "id, request, method, status, created_at, rolled_back_at, metrics, stats, turn"


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


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
    turn: int | None = None  # id of the first edit of the turn it was applied in

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _record(row) -> EditRecord:
    return EditRecord(row[0], json.loads(row[1]), row[2], row[3], row[4], row[5], json.loads(row[6]),
                      json.loads(row[7]), row[8] if row[8] is not None else row[0])


def checkpoint_spacing(age: int, every: int) -> int:
    """How far apart checkpoints are kept `age` edits back: every `every` edits for the last
    10*every, every 10*every for the 100*every before, and so on. So a workspace keeps about
    ten checkpoints per decade of its history, and rebuilding any state from its nearest
    checkpoint replays at most a tenth of the edits between it and the head."""
    if age < 10 * every:
        return every
    return every * 10 ** int(math.log10(age / every))


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
        self.path = path
        if readonly and not path.is_file():
            raise WorkspaceError(f"no journal at {path}")
        self.db = None
        try:
            if readonly:
                self.db = _connect_readonly(path, no_writer)
            else:
                self.db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
                self.db.execute("PRAGMA journal_mode=WAL")
                self.db.execute("PRAGMA synchronous=FULL")
            self.version = self._version(readonly)
        except sqlite3.Error as exc:
            if self.db is not None:
                self.db.close()
            raise WorkspaceError(f"cannot open journal {path}: {exc}") from exc
        except BaseException:
            if self.db is not None:
                self.db.close()
            raise

    def _version(self, readonly: bool) -> int:
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        tables = {r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if version == 0 and "edits" in tables:
            return 1  # written before schema versions: state as whole directories
        if version > SCHEMA_VERSION:
            raise WorkspaceError(f"journal {self.path} has schema {version}; this editkit reads up to "
                                 f"{SCHEMA_VERSION} (upgrade editkit)")
        if version == 0 and not readonly:
            with self._transaction():
                for statement in SCHEMA.split(";"):
                    if statement.strip():
                        self.db.execute(statement)
                self.db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            return SCHEMA_VERSION
        return version

    @property
    def legacy(self) -> bool:
        """A schema-1 journal: readable, but it must migrate (see editkit.legacy) before writes."""
        return self.version == 1

    def close(self) -> None:
        self.db.close()

    # ---- reads -------------------------------------------------------------------------
    def _select(self) -> str:
        return f"SELECT {_COLUMNS if not self.legacy else _COLUMNS.replace(', turn', ', NULL')} FROM edits"

    def records(self, active_only: bool = False, *, status: str | None = None, after: int = 0,
                offset: int = 0, limit: int | None = None) -> list[EditRecord]:
        """Edits in id order: all, or those with `status` ('applied' with active_only), with
        ids above `after`, paged by offset/limit."""
        status = "applied" if active_only else status
        sql, args = self._select() + " WHERE id > ?", [after]
        if status:
            sql += " AND status = ?"
            args.append(status)
        sql += " ORDER BY id LIMIT ? OFFSET ?"
        args += [-1 if limit is None else limit, offset]
        return [_record(r) for r in self.db.execute(sql, args)]

    def count(self, status: str | None = None) -> int:
        if status:
            return self.db.execute("SELECT count(*) FROM edits WHERE status = ?", (status,)).fetchone()[0]
        return self.db.execute("SELECT count(*) FROM edits").fetchone()[0]

    def last_id(self) -> int:
        """The id of the newest edit (0 before the first)."""
        return self.db.execute("SELECT max(id) FROM edits").fetchone()[0] or 0

    def record(self, edit_id: int) -> EditRecord | None:
        row = self.db.execute(self._select() + " WHERE id = ?", (edit_id,)).fetchone()
        return _record(row) if row else None

    def head(self) -> dict | None:
        """The manifest of the workspace's current state (None before the first edit)."""
        return self.head_state()[1]

    def head_state(self) -> tuple[int, dict | None]:
        """(id of the head state, 0 before the first edit; its manifest). A new id means a new
        state: ids are never reused."""
        row = self.db.execute("SELECT h.state_id, s.manifest FROM head h JOIN states s ON s.id = h.state_id").fetchone()
        return (row[0], json.loads(row[1])) if row else (0, None)

    def checkpoint_before(self, edit_id: int) -> tuple[int, dict] | None:
        """The newest checkpoint holding only edits older than `edit_id`: (its last edit id,
        its manifest). Every checkpoint is the state of all edits active up to its id."""
        row = self.db.execute("SELECT c.upto_id, s.manifest FROM checkpoints c JOIN states s ON s.id = c.state_id "
                              "WHERE c.upto_id < ? ORDER BY c.upto_id DESC LIMIT 1", (edit_id,)).fetchone()
        return (row[0], json.loads(row[1])) if row else None

    def checkpoint_ids(self) -> list[int]:
        return [r[0] for r in self.db.execute("SELECT upto_id FROM checkpoints ORDER BY upto_id")]

    def live_chunks(self) -> set[str]:
        return {r[0] for r in self.db.execute("SELECT digest FROM chunks")}

    def unreferenced(self, digests: list[str]) -> list[str]:
        """Those of `digests` no state references (e.g. written for a checkpoint that a
        rollback took and dropped again in one transaction)."""
        live = set()
        for i in range(0, len(digests), 500):
            part = digests[i: i + 500]
            live.update(r[0] for r in self.db.execute(
                f"SELECT digest FROM chunks WHERE digest IN ({','.join('?' * len(part))})", part))
        return [d for d in digests if d not in live]

    # ---- writes (each one transaction) -------------------------------------------------
    def commit_turn(self, entries: list[tuple[dict, str, dict, dict]], manifest: dict, chunks: ChunkStore,
                    checkpoint_every: int) -> tuple[list[EditRecord], list[str]]:
        """Record a turn of edits (request, method, metrics, stats each) whose state is
        `manifest`; returns the records and the chunks no longer referenced (to delete)."""
        self._writable()
        now = time.time()
        records = []
        with self._transaction():
            for request, method, metrics, stats in entries:
                cur = self.db.execute(
                    "INSERT INTO edits (request, method, status, created_at, metrics, stats, turn) "
                    "VALUES (?, ?, 'applied', ?, ?, ?, ?)",
                    (json.dumps(request), method, now, json.dumps(metrics), json.dumps(stats),
                     records[0].id if records else None))
                records.append(EditRecord(cur.lastrowid, request, method, "applied", now, None, metrics, stats,
                                          records[0].id if records else cur.lastrowid))
            first = records[0].id
            self.db.execute("UPDATE edits SET turn = ? WHERE id = ?", (first, first))
            refs = _RefChanges()
            state = self._set_head(manifest, refs)
            last = self.db.execute("SELECT max(upto_id) FROM checkpoints").fetchone()[0] or 0
            if records[-1].id - last >= checkpoint_every:
                self.db.execute("INSERT INTO checkpoints (upto_id, state_id) VALUES (?, ?)", (records[-1].id, state))
                self._thin_checkpoints(records[-1].id, checkpoint_every, refs)
            dead = self._apply(refs, chunks)
        return records, dead

    def commit_head(self, manifest: dict, chunks: ChunkStore) -> list[str]:
        """Point the workspace at a new state without an edit (an intervention changed)."""
        self._writable()
        with self._transaction():
            refs = _RefChanges()
            self._set_head(manifest, refs)
            return self._apply(refs, chunks)

    def commit_rollback(self, edit_id: int, manifest: dict, rebuilt: list[tuple[int, dict]],
                        chunks: ChunkStore, checkpoint_every: int) -> list[str]:
        """Mark `edit_id` rolled back with `manifest` as the new head. Checkpoints that hold
        the edit go; `rebuilt` are checkpoints (last edit id, manifest) taken while replaying."""
        self._writable()
        with self._transaction():
            self.db.execute("UPDATE edits SET status = 'rolled_back', rolled_back_at = ? WHERE id = ?",
                            (time.time(), edit_id))
            refs = _RefChanges()
            gone = [r[0] for r in self.db.execute("SELECT state_id FROM checkpoints WHERE upto_id >= ?", (edit_id,))]
            self.db.execute("DELETE FROM checkpoints WHERE upto_id >= ?", (edit_id,))
            for upto, m in rebuilt:
                self.db.execute("INSERT INTO checkpoints (upto_id, state_id) VALUES (?, ?)",
                                (upto, self._add_state(m, refs)))
            self._set_head(manifest, refs)
            for state in gone:
                self._drop_if_unused(state, refs)
            self._thin_checkpoints(self.last_id(), checkpoint_every, refs)
            return self._apply(refs, chunks)

    # ---- states and reference counts ---------------------------------------------------
    def _add_state(self, manifest: dict, refs: "_RefChanges") -> int:
        cur = self.db.execute("INSERT INTO states (manifest) VALUES (?)", (json.dumps(manifest, sort_keys=True),))
        refs.add(manifest, +1)
        return cur.lastrowid

    def _set_head(self, manifest: dict, refs: "_RefChanges") -> int:
        row = self.db.execute("SELECT state_id FROM head WHERE one = 1").fetchone()
        state = self._add_state(manifest, refs)
        self.db.execute("INSERT INTO head (one, state_id) VALUES (1, ?) "
                        "ON CONFLICT(one) DO UPDATE SET state_id = excluded.state_id", (state,))
        if row:
            self._drop_if_unused(row[0], refs)
        return state

    def _drop_if_unused(self, state: int, refs: "_RefChanges") -> None:
        used = self.db.execute("SELECT 1 FROM head WHERE state_id = ? UNION ALL "
                               "SELECT 1 FROM checkpoints WHERE state_id = ? LIMIT 1", (state, state)).fetchone()
        if used:
            return
        row = self.db.execute("SELECT manifest FROM states WHERE id = ?", (state,)).fetchone()
        if row:
            self.db.execute("DELETE FROM states WHERE id = ?", (state,))
            refs.add(json.loads(row[0]), -1)

    def _thin_checkpoints(self, newest: int, every: int, refs: "_RefChanges") -> None:
        """Keep checkpoints sparser with age: of those whose age gives spacing s
        (checkpoint_spacing), the newest in each run of s edit ids. A kept checkpoint stays kept
        until its run merges into a longer one, so about ten survive per decade of history and
        any edit has one within about one spacing before it."""
        seen = set()
        for upto, state in self.db.execute("SELECT upto_id, state_id FROM checkpoints ORDER BY upto_id DESC").fetchall():
            spacing = checkpoint_spacing(newest - upto, every)
            if (spacing, upto // spacing) not in seen:
                seen.add((spacing, upto // spacing))
                continue
            self.db.execute("DELETE FROM checkpoints WHERE upto_id = ?", (upto,))
            self._drop_if_unused(state, refs)

    def _apply(self, refs: "_RefChanges", chunks: ChunkStore) -> list[str]:
        """Apply reference count changes level by level: an index chunk that gains its first
        reference adds one to each block it lists, one that loses its last takes it away."""
        dead: list[str] = []
        level, kinds = refs.net(), dict(refs.kinds)
        while level:
            current = {}
            items = list(level)
            for i in range(0, len(items), 500):
                part = items[i: i + 500]
                marks = ",".join("?" * len(part))
                current.update(self.db.execute(f"SELECT digest, refs FROM chunks WHERE digest IN ({marks})", part))
            below = Counter()
            for digest, change in level.items():
                old = current.get(digest, 0)
                new = old + change
                if new < 0:
                    raise WorkspaceError(f"journal {self.path}: reference count of chunk {digest} below zero")
                if new == 0:
                    self.db.execute("DELETE FROM chunks WHERE digest = ?", (digest,))
                    dead.append(digest)
                elif old == 0:
                    self.db.execute("INSERT INTO chunks (digest, kind, refs) VALUES (?, ?, ?)",
                                    (digest, kinds[digest], new))
                else:
                    self.db.execute("UPDATE chunks SET refs = ? WHERE digest = ?", (new, digest))
                if kinds.get(digest) == "index" and (old == 0) != (new == 0):
                    for child in chunks.index_children(digest):
                        below[child] += 1 if new else -1
            level = {d: n for d, n in below.items() if n}
            kinds = {d: "data" for d in level}
        return dead

    # ---- plumbing ----------------------------------------------------------------------
    def _writable(self) -> None:
        if self.legacy:
            raise WorkspaceError(f"journal {self.path} has schema 1; open the workspace for writing to migrate it")

    def _transaction(self):
        db = self.db

        class _Tx:
            def __enter__(self):
                db.execute("BEGIN IMMEDIATE")

            def __exit__(self, exc_type, *_):
                db.execute("ROLLBACK" if exc_type else "COMMIT")
                return False

        return _Tx()


class _RefChanges:
    """Reference count changes of a transaction's manifests' direct chunks, netted."""

    def __init__(self) -> None:
        self.counts: Counter = Counter()
        self.kinds: dict[str, str] = {}

    def add(self, manifest: dict, sign: int) -> None:
        for digest, kind in manifest_chunks(manifest):
            self.counts[digest] += sign
            self.kinds[digest] = kind

    def net(self) -> dict[str, int]:
        return {d: n for d, n in self.counts.items() if n}
