"""Content-addressed component state: what a workspace head or checkpoint holds.

Every tensor of a component's state is cut, as raw bytes, into blocks of BLOCK_BYTES, and
every long top-level list of its JSON metadata into runs of LIST_ITEMS items. Each block is
a file under chunks/ named by its SHA-256, written once and shared by every state that holds
the same bytes. A tensor's or list's block digests are kept in index chunks (INDEX_DIGESTS
digests each), and a state's manifest (small JSON, stored in the journal) names, per
component, its metadata chunk and the index chunks of each tensor and list.

So writing a state costs what changed: blocks whose bytes the component says did not change
(see `StateChanges`) are not even read, unchanged index chunks are reused, and a block that
already exists is not written again. Every chunk is checked against its digest (of its raw
bytes) when read. A block that is mostly zero 4-byte words is stored packed: its nonzero words
and a bitmap of where they go.
Files are written to a temporary name, fsynced and renamed into place; which chunks are live
is the journal's business (reference counts committed with the state, see store.Journal)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from editkit.errors import WorkspaceError

BLOCK_BYTES = 1 << 16  # tensor bytes per block
LIST_ITEMS = 256  # items per block of a long metadata list
INDEX_DIGESTS = 128  # block digests per index chunk (4 KiB)
INDEX_SALT = b"editkit-index\0"  # index chunks hash apart from data blocks of equal bytes
MANIFEST_FORMAT = 3  # 3: chunk files may hold a block zero-word-packed (_pack); 2 is read as well
READS_FORMATS = (2, 3)
PACKED = b"\x00EKZW1\x00"  # a packed chunk file starts with this (then its raw length, bitmap, words)
PACK_MIN_BYTES = 4096  # smaller blocks are stored as they are


def _pack(data) -> bytes | None:
    """A block as [PACKED, raw length (8 bytes LE), bitmap of its nonzero 4-byte words, those
    words, the trailing len % 4 bytes], or None where that saves less than a quarter. Side
    memories trained under a sparse gradient mask (WISE: 20% of entries) are mostly zero words."""
    n = len(data)
    if n < PACK_MIN_BYTES:
        return None
    words = np.frombuffer(data, dtype="<u4", count=n // 4)
    nonzero = words != 0
    if 4 * int(nonzero.sum()) + n // 32 + 32 > 0.75 * n:
        return None
    return b"".join([PACKED, n.to_bytes(8, "little"), np.packbits(nonzero, bitorder="little").tobytes(),
                     words[nonzero].tobytes(), bytes(data[4 * (n // 4):])])


def _unpack(data: bytes) -> bytes:
    """The block a packed chunk file holds (ValueError where it is not one)."""
    head = len(PACKED)
    if not data.startswith(PACKED) or len(data) < head + 8:
        raise ValueError("not a packed chunk")
    n = int.from_bytes(data[head: head + 8], "little")
    count = n // 4
    bitmap_end = head + 8 + (count + 7) // 8
    if len(data) < bitmap_end:
        raise ValueError("packed chunk is cut short")
    nonzero = np.unpackbits(np.frombuffer(data, np.uint8, bitmap_end - head - 8, head + 8),
                            count=count, bitorder="little").astype(bool)
    nnz = int(nonzero.sum())
    if len(data) != bitmap_end + 4 * nnz + n % 4:
        raise ValueError("packed chunk has the wrong length")
    words = np.zeros(count, dtype="<u4")
    words[nonzero] = np.frombuffer(data, "<u4", nnz, bitmap_end)
    return words.tobytes() + data[bitmap_end + 4 * nnz:]

ComponentStates = dict[str, tuple[dict[str, torch.Tensor], dict[str, Any]]]


def crash_point(name: str) -> None:
    """A named step of a state write. Does nothing; crash tests replace it to kill the
    process exactly there (after a chunk's temporary file, after its rename...)."""


class StateChanges:
    """What changed in a component's state since the session last saved or loaded it.

    Components that set `tracks_changes = True` record here, as they change their state, the
    dim-0 rows of each tensor (or items of each long top-level metadata list) that changed;
    the session clears it after each save and load. Rows added at the end of a tensor or
    list need no mark, nor does a change of shape (both are seen). Untracked components are
    read and hashed whole at every save (correct, but the cost grows with the state)."""

    def __init__(self) -> None:
        self.everything = True
        self.rows: dict[str, list[tuple[int, int | None]]] = {}

    def mark(self, name: str, start: int = 0, stop: int | None = None) -> None:
        """Rows [start, stop) of tensor or list `name` changed (stop None: to the end)."""
        self.rows.setdefault(name, []).append((start, stop))

    def mark_all(self) -> None:
        self.everything = True

    def clear(self) -> None:
        self.everything = False
        self.rows = {}


@dataclass
class _Plan:
    """The blocks to recompute for one tensor or list, given its previous version."""

    base: list[bytes] | None  # previous block digests, or None: recompute all
    dirty: set[int] = field(default_factory=set)


def _hex(digest: bytes) -> str:
    return digest.hex()


def _digest(data: bytes, salt: bytes) -> str:
    h = hashlib.sha256(salt)
    h.update(data)
    return h.hexdigest()


class ChunkStore:
    """Chunk files under <workspace>/state/chunks/<first two hex digits>/<digest>."""

    def __init__(self, root: Path, readonly: bool = False):
        self.root = root / "chunks"
        self.readonly = readonly
        self.written: list[str] = []  # chunks created by the current write (removed if it fails)
        self.fetched = 0  # chunk files read by the last read()
        self._index_cache: dict[str, list[bytes]] = {}
        self._recent: dict[str, bytes] = {}  # the last read's blocks (with reuse=True)
        if not readonly:
            self.root.mkdir(parents=True, exist_ok=True)

    # ---- files -------------------------------------------------------------------------
    def path(self, digest: str) -> Path:
        return self.root / digest[:2] / digest

    def _put(self, data, salt: bytes = b"") -> bytes:
        h = hashlib.sha256(salt)
        h.update(data)
        digest = h.digest()
        path = self.path(_hex(digest))
        if not path.exists():
            path.parent.mkdir(exist_ok=True)
            tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
            with open(tmp, "wb") as fh:
                fh.write(_pack(data) or data)  # named by the digest of the raw bytes either way
                fh.flush()
                os.fsync(fh.fileno())
            crash_point("chunk-written")
            os.replace(tmp, path)
            crash_point("chunk-renamed")
            self.written.append(_hex(digest))
        return digest

    def load(self, digest: str, salt: bytes = b"") -> bytes:
        path = self.path(digest)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise WorkspaceError(f"state chunk {path} is missing") from None
        except OSError as exc:
            raise WorkspaceError(f"cannot read state chunk {path}: {exc.strerror or exc}") from None
        if _digest(data, salt) != digest and data.startswith(PACKED):
            try:
                data = _unpack(data)
            except ValueError:
                pass  # fails the checksum below
        if _digest(data, salt) != digest:
            raise WorkspaceError(f"state chunk {path} fails its checksum (modified or corrupt)")
        return data

    def index_children(self, digest: str) -> list[str]:
        """Block digests listed by index chunk `digest`."""
        return [_hex(d) for d in self._index(digest)]

    def _index(self, digest: str) -> list[bytes]:
        blocks = self._index_cache.get(digest)
        if blocks is None:
            data = self.load(digest, INDEX_SALT)
            blocks = [data[i: i + 32] for i in range(0, len(data), 32)]
            self._index_cache[digest] = blocks
        return blocks

    def remove(self, digests) -> None:
        for digest in digests:
            self.path(digest).unlink(missing_ok=True)
            self._index_cache.pop(digest, None)

    def files(self) -> list[str]:
        """Every chunk file present (a crash can leave some that no state references)."""
        if not self.root.is_dir():
            return []
        out = []
        for folder in self.root.iterdir():
            if folder.is_dir():
                out += [p.name for p in folder.iterdir() if not p.name.startswith(".")]
        return out

    def remove_temporaries(self) -> None:
        if self.root.is_dir():
            for tmp in self.root.glob("*/.*.tmp"):
                tmp.unlink(missing_ok=True)

    # ---- writing a state ---------------------------------------------------------------
    def write(self, states: ComponentStates, bases: dict[str, dict] | None = None,
              changes: dict[str, StateChanges | None] | None = None) -> dict:
        """Chunks for every component's (tensors, meta); returns the state's manifest.
        `bases` holds each component's manifest entry of the state it last saved or loaded,
        `changes` what changed since (None: unknown, so everything is recomputed)."""
        bases, changes = bases or {}, changes or {}
        components = {}
        for name, (tensors, meta) in states.items():
            components[name] = self._component(tensors, meta, bases.get(name), changes.get(name))
        return {"format": MANIFEST_FORMAT, "components": components}

    def _component(self, tensors, meta, base: dict | None, changes: StateChanges | None) -> dict:
        if not isinstance(meta, dict):
            raise TypeError("state metadata must be a JSON object")
        clash = set(tensors) & set(meta)
        if clash:
            raise ValueError(f"state names used for both a tensor and metadata: {sorted(clash)}")
        known = changes is not None and not changes.everything and base is not None
        lists = {k: v for k, v in meta.items() if isinstance(v, list) and len(v) > LIST_ITEMS}
        rest = {k: v for k, v in meta.items() if k not in lists}
        entry: dict[str, Any] = {"meta": _hex(self._put(json.dumps(rest, sort_keys=True).encode()))}
        entry["tensors"] = {}
        for key, tensor in tensors.items():
            prev = (base or {}).get("tensors", {}).get(key)
            entry["tensors"][key] = self._tensor(tensor, prev, changes.rows.get(key) if known else None, known)
        entry["lists"] = {}
        for key, items in lists.items():
            prev = (base or {}).get("lists", {}).get(key)
            entry["lists"][key] = self._list(items, prev, changes.rows.get(key) if known else None, known)
        return entry

    def _plan(self, prev: dict | None, same_layout: bool, known: bool, marks, row_units: int,
              unit_per_block: float, old_units: int, new_units: int) -> _Plan:
        """Which blocks to recompute: all without a usable previous version; else the blocks
        holding marked rows and every block from the first one whose extent changed."""
        if prev is None or not same_layout or not known:
            return _Plan(None)
        base = [d for idx in prev["index"] for d in self._index(idx)]
        dirty: set[int] = set()
        first_changed = min(old_units, new_units)
        for start, stop in marks or []:
            stop = new_units // row_units if stop is None else stop
            a, b = start * row_units, min(stop * row_units, new_units)
            if b > a:
                dirty.update(range(int(a // unit_per_block), int(math.ceil(b / unit_per_block))))
        if old_units != new_units:
            dirty.update(range(int(first_changed // unit_per_block), len(base)))
        return _Plan(base, dirty)

    def _tensor(self, tensor: torch.Tensor, prev: dict | None, marks, known: bool) -> dict:
        t = tensor.detach()
        if not t.is_contiguous():
            t = t.contiguous()
        flat = t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
        nbytes = flat.numel()
        shape = list(t.shape)
        dtype = str(t.dtype).removeprefix("torch.")
        row_bytes = nbytes // shape[0] if shape and shape[0] else max(nbytes, 1)
        same = prev is not None and prev["dtype"] == dtype and prev["shape"][1:] == shape[1:] and len(
            prev["shape"]) == len(shape) and len(shape) > 0
        old_bytes = (math.prod(prev["shape"]) * t.element_size()) if same else 0
        plan = self._plan(prev, same, known, marks, row_bytes, BLOCK_BYTES, old_bytes, nbytes)
        digests = []
        for k in range(math.ceil(nbytes / BLOCK_BYTES)):
            if plan.base is not None and k < len(plan.base) and k not in plan.dirty:
                digests.append(plan.base[k])
                continue
            block = flat[k * BLOCK_BYTES: (k + 1) * BLOCK_BYTES].cpu().numpy()
            digests.append(self._put(memoryview(block)))
        return {"dtype": dtype, "shape": shape, "index": self._put_index(digests, prev)}

    def _list(self, items: list, prev: dict | None, marks, known: bool) -> dict:
        old = prev["items"] if prev is not None else 0
        plan = self._plan(prev, True, known, marks, 1, LIST_ITEMS, old, len(items))
        digests = []
        for k in range(math.ceil(len(items) / LIST_ITEMS)):
            if plan.base is not None and k < len(plan.base) and k not in plan.dirty:
                digests.append(plan.base[k])
                continue
            run = items[k * LIST_ITEMS: (k + 1) * LIST_ITEMS]
            digests.append(self._put(json.dumps(run, sort_keys=True).encode()))
        return {"items": len(items), "index": self._put_index(digests, prev)}

    def _put_index(self, digests: list[bytes], prev: dict | None) -> list[str]:
        previous = (prev or {}).get("index", [])
        out = []
        for i in range(0, max(len(digests), 1), INDEX_DIGESTS):
            group = digests[i: i + INDEX_DIGESTS]
            j = i // INDEX_DIGESTS
            if j < len(previous) and self._index_cache.get(previous[j]) == group:
                out.append(previous[j])  # unchanged: no hashing, no write
                continue
            digest = _hex(self._put(b"".join(group), INDEX_SALT))
            self._index_cache[digest] = list(group)
            out.append(digest)
        return out

    # ---- reading a state ---------------------------------------------------------------
    def read(self, manifest: dict, reuse: bool = False) -> ComponentStates:
        """Every component's (tensors, meta) of a state. With `reuse`, blocks the previous read
        with reuse already read (and checked) are taken from memory: a reader that follows
        a workspace reads only the chunks a new head changed."""
        if manifest.get("format") not in READS_FORMATS:
            raise WorkspaceError(f"state manifest has format {manifest.get('format')}; "
                                 f"this editkit reads {' and '.join(map(str, READS_FORMATS))}")
        self.fetched = 0
        used: dict[str, bytes] = {}

        def get(digest: str) -> bytes:
            data = self._recent.get(digest) if reuse else None
            if data is None:
                data = self.load(digest)
                self.fetched += 1
            used[digest] = data
            return data

        states: ComponentStates = {}
        for name, entry in manifest["components"].items():
            try:
                meta = json.loads(get(entry["meta"]))
                for key, spec in entry["lists"].items():
                    items = []
                    for d in self._blocks(spec["index"]):
                        items += json.loads(get(d))
                    if len(items) != spec["items"]:
                        raise WorkspaceError(f"state list '{key}' of '{name}' has {len(items)} items, "
                                             f"manifest says {spec['items']}")
                    meta[key] = items
                tensors = {key: self._read_tensor(spec, get) for key, spec in entry["tensors"].items()}
            except (ValueError, KeyError, TypeError) as exc:
                raise WorkspaceError(f"cannot read state of '{name}': {exc}") from None
            states[name] = (tensors, dict(sorted(meta.items())))
        if reuse:
            self._recent = used
        return states

    def _blocks(self, index: list[str]) -> list[str]:
        return [_hex(d) for idx in index for d in self._index(idx)]

    def _read_tensor(self, spec: dict, get) -> torch.Tensor:
        dtype = getattr(torch, spec["dtype"], None)
        if not isinstance(dtype, torch.dtype):
            raise WorkspaceError(f"unknown tensor dtype '{spec['dtype']}' in a state manifest")
        buf = bytearray()
        for d in self._blocks(spec["index"]):
            buf += get(d)
        shape = [int(s) for s in spec["shape"]]
        expected = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        if len(buf) != expected:
            raise WorkspaceError(f"a state tensor has {len(buf)} bytes, its shape {shape} needs {expected}")
        if not buf:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(buf, dtype=torch.uint8).view(dtype).reshape(shape)


def manifest_chunks(manifest: dict) -> list[tuple[str, str]]:
    """The chunks a manifest names directly, as (digest, kind): kind 'data' or 'index'."""
    out = []
    for entry in manifest["components"].values():
        out.append((entry["meta"], "data"))
        for spec in [*entry["tensors"].values(), *entry["lists"].values()]:
            out += [(d, "index") for d in spec["index"]]
    return out
