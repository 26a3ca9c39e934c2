"""Workspaces written before journal schema 2 kept each state as a whole directory
(state/<ref>/<component>.safetensors + .json, with SHA-256 digests in the journal). This
module reads them and migrates a workspace to content-addressed chunks in one transaction."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file

from editkit.chunks import ChunkStore, ComponentStates
from editkit.errors import WorkspaceError
from editkit.store import SCHEMA, SCHEMA_VERSION, Journal, _RefChanges


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_state_dir(folder: Path, digests: dict[str, str]) -> ComponentStates:
    """A schema-1 state directory, every file checked against its recorded digest."""
    for name, expected in digests.items():
        path = folder / name
        if not path.is_file():
            raise WorkspaceError(f"state file {path} is missing")
        try:
            actual = _sha256(path)
        except OSError as exc:
            raise WorkspaceError(f"cannot read state file {path}: {exc.strerror or exc}") from exc
        if actual != expected:
            raise WorkspaceError(f"state file {path} fails its checksum (modified or corrupt)")
    states: ComponentStates = {}
    for name in sorted({f.rsplit(".", 1)[0] for f in digests}):
        try:
            tensors = load_file(str(folder / f"{name}.safetensors"))
            meta = json.loads((folder / f"{name}.json").read_text(encoding="utf-8"))
        except (SafetensorError, OSError, ValueError) as exc:
            raise WorkspaceError(f"cannot read state of '{name}' in {folder}: {exc}") from exc
        states[name] = (tensors, meta)
    return states


def legacy_head(journal: Journal, state_root: Path) -> ComponentStates | None:
    row = journal.db.execute("SELECT state_ref, digests FROM head WHERE one = 1").fetchone()
    if not row or not row[0]:
        return None
    return read_state_dir(state_root / row[0], json.loads(row[1]))


def migrate(journal: Journal, state_root: Path, chunks: ChunkStore) -> None:
    """Rewrite a schema-1 workspace as schema 2: its head and checkpoints become chunked
    states, checkpoints are keyed by their last edit id, edits get a turn column. One
    transaction; the old directories are removed only after it commits."""
    db = journal.db
    head = db.execute("SELECT state_ref, digests FROM head WHERE one = 1").fetchone()
    checkpoints = db.execute("SELECT state_ref, digests, edit_ids FROM checkpoints").fetchall()
    active = [r[0] for r in db.execute("SELECT id FROM edits WHERE status = 'applied' ORDER BY id")]
    manifests = {}
    for ref, digests in [tuple(head[:2])] if head and head[0] else []:
        manifests[ref] = chunks.write(read_state_dir(state_root / ref, json.loads(digests)))
    kept = []
    for ref, digests, ids in checkpoints:
        ids = json.loads(ids)
        # A checkpoint must be the state of every edit active up to its last one.
        if ids and ids == [i for i in active if i <= max(ids)]:
            if ref not in manifests:
                manifests[ref] = chunks.write(read_state_dir(state_root / ref, json.loads(digests)))
            kept.append((max(ids), ref))
    with journal._transaction():
        db.execute("ALTER TABLE edits ADD COLUMN turn INTEGER")
        db.execute("DROP TABLE head")
        db.execute("DROP TABLE checkpoints")
        for statement in SCHEMA.split(";"):
            if statement.strip():
                db.execute(statement)
        refs = _RefChanges()
        state_ids = {ref: journal._add_state(m, refs) for ref, m in manifests.items()}
        if head and head[0]:
            db.execute("INSERT INTO head (one, state_id) VALUES (1, ?)", (state_ids[head[0]],))
        for upto, ref in kept:
            db.execute("INSERT INTO checkpoints (upto_id, state_id) VALUES (?, ?)", (upto, state_ids[ref]))
        journal._apply(refs, chunks)
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    journal.version = SCHEMA_VERSION
    for entry in state_root.iterdir():
        if entry.name != chunks.root.name:
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
