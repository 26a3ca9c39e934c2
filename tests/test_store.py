"""Content-addressed state (editkit.chunks) and the journal's reference counts: round trips,
writes that cost what changed, change tracking that agrees with hashing everything, and
checkpoints that thin out with age."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from editkit import chunks as chunks_module
from editkit.chunks import ChunkStore, StateChanges, manifest_chunks
from editkit.session import Session
from editkit.store import checkpoint_spacing
from editkit.testing import stand_in_host


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 256 bytes, lists in runs of 4, 4 digests per index chunk: every path of
    the layout (many blocks, many index chunks, chunked lists) on tiny states."""
    monkeypatch.setattr(chunks_module, "BLOCK_BYTES", 256)
    monkeypatch.setattr(chunks_module, "LIST_ITEMS", 4)
    monkeypatch.setattr(chunks_module, "INDEX_DIGESTS", 4)


def test_round_trip_of_every_dtype_and_shape(tmp_path, small_blocks):
    store = ChunkStore(tmp_path)
    tensors = {
        "f32": torch.randn(37, 5), "bf16": torch.randn(9, 3).bfloat16(), "f16": torch.randn(70).half(),
        "i64": torch.arange(100).reshape(4, 25), "bool": torch.rand(33) > 0.5, "u8": torch.arange(255, dtype=torch.uint8),
        "scalar": torch.tensor(3.5), "empty": torch.zeros((0, 7)), "strided": torch.randn(6, 8).t(),
    }
    meta = {"format": 1, "labels": [f"x{i}" for i in range(11)], "short": [1, 2], "nested": {"a": [1] * 9}}
    manifest = store.write({"editor": (tensors, meta)})
    (back_tensors, back_meta), = store.read(manifest).values()
    assert back_meta == meta
    for name, t in tensors.items():
        assert back_tensors[name].dtype == t.dtype and torch.equal(back_tensors[name], t), name
    assert store.write({"editor": (tensors, meta)}) == manifest  # same bytes, same names


def test_an_append_writes_only_the_new_blocks(tmp_path, small_blocks):
    store = ChunkStore(tmp_path)
    rows = torch.randn(40, 16)  # 64 bytes a row: 4 rows a block, 10 blocks, 3 index chunks
    changes = StateChanges()
    manifest = store.write({"c": ({"rows": rows}, {"labels": list("abcdefghij")})}, {}, {"c": changes})
    changes.clear()
    store.written = []
    more = torch.cat([rows, torch.randn(1, 16)])
    new = store.write({"c": ({"rows": more}, {"labels": list("abcdefghijk")})},
                      manifest["components"], {"c": changes})
    # The 11th block of rows, the 3rd run of labels, their index chunks, nothing else.
    kinds = Counter("index" if d in {x for x, k in manifest_chunks(new) if k == "index"} else "data"
                    for d in store.written)
    assert kinds == {"data": 2, "index": 2}
    assert store.read(new)["c"][0]["rows"].equal(more)
    changes.mark("rows", 5, 6)  # a change in place needs its mark ...
    changed = more.clone()
    changed[5] += 1
    store.written = []
    marked = store.write({"c": ({"rows": changed}, {"labels": list("abcdefghijk")})},
                         new["components"], {"c": changes})
    assert store.read(marked)["c"][0]["rows"].equal(changed) and len(store.written) == 2
    assert marked == store.write({"c": ({"rows": changed}, {"labels": list("abcdefghijk")})})  # == hashing all


def test_chunks_are_verified_on_read(tmp_path):
    store = ChunkStore(tmp_path)
    manifest = store.write({"c": ({"t": torch.randn(10)}, {"format": 1})})
    (path,) = [p for p in (tmp_path / "chunks").rglob("*") if p.is_file() and not p.read_bytes().startswith(b"{")
               and p.stat().st_size == 40]
    path.write_bytes(b"\0" * 40)
    from editkit.errors import WorkspaceError

    with pytest.raises(WorkspaceError, match="fails its checksum"):
        store.read(manifest)


def _recount(journal, store: ChunkStore) -> dict[str, int]:
    """Reference counts from scratch: every state row's manifest, every live index chunk."""
    counts: Counter = Counter()
    index = set()
    for (text,) in journal.db.execute("SELECT manifest FROM states"):
        import json

        for digest, kind in manifest_chunks(json.loads(text)):
            counts[digest] += 1
            if kind == "index":
                index.add(digest)
    for digest in index:
        for child in store.index_children(digest):
            counts[child] += 1
    return dict(counts)


def _check_storage(session) -> None:
    journal, store = session.journal, session.chunks
    table = dict(journal.db.execute("SELECT digest, refs FROM chunks"))
    assert table == _recount(journal, store)
    assert set(store.files()) == set(table)  # no orphan, nothing missing
    used = {r[0] for r in journal.db.execute("SELECT state_id FROM head UNION SELECT state_id FROM checkpoints")}
    assert used == {r[0] for r in journal.db.execute("SELECT id FROM states")}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64])
def test_mostly_zero_blocks_are_stored_packed(tmp_path, dtype):
    """A side memory trained under a 20% gradient mask is ~80% zero words: its blocks are
    stored packed (named by the raw bytes' digest all the same), dense ones as they are,
    and both read back bit-exactly; a damaged packed file fails its checksum."""
    store = ChunkStore(tmp_path)
    torch.manual_seed(0)
    sparse = torch.where(torch.rand(300, 257) < 0.2, torch.randn(300, 257) * 100, 0.0).to(dtype)  # 4.7 blocks
    dense = torch.randint(2 ** 33, 2 ** 62, (70_000,)) if dtype == torch.int64 else torch.randn(70_000).to(dtype)
    manifest = store.write({"c": ({"sparse": sparse, "dense": dense}, {"format": 1})})
    (back, _), = store.read(manifest).values()
    assert torch.equal(back["sparse"], sparse) and torch.equal(back["dense"], dense)
    files = {p.name: p for p in (tmp_path / "chunks").rglob("*") if p.is_file()}
    packed = [p for p in files.values() if p.read_bytes().startswith(chunks_module.PACKED)]
    spec = manifest["components"]["c"]["tensors"]
    sparse_blocks = store._blocks(spec["sparse"]["index"])
    assert {p.name for p in packed} == set(sparse_blocks) - {sparse_blocks[-1]} or \
        {p.name for p in packed} == set(sparse_blocks)  # the short last block may be too small to pack
    on_disk = sum(files[d].stat().st_size for d in set(sparse_blocks))
    assert on_disk < 0.45 * sparse.numel() * sparse.element_size()
    assert not set(store._blocks(spec["dense"]["index"])) & {p.name for p in packed}
    assert store.write({"c": ({"sparse": sparse, "dense": dense}, {"format": 1})}) == manifest
    data = bytearray(packed[0].read_bytes())
    data[-5] ^= 1
    packed[0].write_bytes(bytes(data))
    from editkit.errors import WorkspaceError

    with pytest.raises(WorkspaceError, match="fails its checksum"):
        ChunkStore(tmp_path).read(manifest)
    packed[0].write_bytes(bytes(data[:40]))  # cut short
    with pytest.raises(WorkspaceError, match="fails its checksum"):
        ChunkStore(tmp_path).read(manifest)


def test_a_raw_chunk_that_looks_packed_is_read_as_it_is(tmp_path):
    store = ChunkStore(tmp_path)
    t = torch.frombuffer(bytearray(chunks_module.PACKED + bytes(100)), dtype=torch.uint8)
    manifest = store.write({"c": ({"t": t}, {"format": 1})})
    assert torch.equal(ChunkStore(tmp_path).read(manifest)["c"][0]["t"], t)


@pytest.mark.parametrize("method", ["append-test", "grace"])
def test_tracked_changes_write_what_hashing_everything_writes(tmp_path, tiny_loaded, small_blocks, method):
    """A component that tracks its changes must produce, edit after edit, exactly the
    manifest of its whole state hashed afresh; and the journal's counts stay exact."""
    config = {"width": 8} if method == "append-test" else {"steps": 2, "epsilon": 5.0}
    host = stand_in_host()
    prompts = ["The capital of France is", "The capital of Italy is", "The largest planet is",
               "Who wrote Hamlet?", "The capital of France is"]  # the repeat overwrites (grace)
    with Session.open(tmp_path / "ws", loaded=tiny_loaded["llama"], method=method, method_config=config,
                      host=host, checkpoint_every=3) as s:
        for i in range(14):
            s.edit({"prompt": prompts[i % 5] + " " * (i // 5), "target_new": ["Rome", "Paris"][i % 2]},
                   measure=False)
            head = s.journal.head()
            fresh = ChunkStore(tmp_path / "scratch").write(s._states(s.editor))
            assert fresh == head, f"edit {i + 1}"
            _check_storage(s)
        s.rollback(4)
        _check_storage(s)
        s.rollback(13)
        _check_storage(s)
        assert ChunkStore(tmp_path / "scratch").write(s._states(s.editor)) == s.journal.head()


def test_checkpoints_thin_out_with_age(tmp_path, tiny_loaded):
    assert [checkpoint_spacing(a, 10) for a in (0, 99, 100, 999, 1000, 12345)] == [10, 10, 100, 100, 1000, 10000]
    host = stand_in_host()
    with Session.open(tmp_path / "ws", loaded=tiny_loaded["gpt2"], method="append-test",
                      method_config={"width": 4}, host=host, checkpoint_every=2) as s:
        for i in range(300):
            s.edit({"prompt": f"fact {i}", "target_new": f"t{i}"}, measure=False)
        ids = s.journal.checkpoint_ids()
        assert ids[-1] == 300 and 15 <= len(ids) <= 40  # about ten per decade, spread over all of it
        assert ids[0] <= checkpoint_spacing(300, 2)  # the oldest edits still have one near them
        gaps = [b - a for a, b in zip(ids, ids[1:])]
        for upto, gap in zip(ids, gaps):  # never sparser than twice the spacing at that age
            assert gap <= 2 * checkpoint_spacing(300 - upto - gap, 2)
        _check_storage(s)
        s.rollback(37)
        _check_storage(s)
        rows = s.editor.state_dict()[0]["rows"]
        targets = s.editor.state_dict()[1]["targets"]
    assert len(targets) == 299 and "t36" not in targets
    with Session.open(tmp_path / "ref", loaded=tiny_loaded["gpt2"], method="append-test",
                      method_config={"width": 4}, host=host) as ref:
        ref.edit([{"prompt": f"fact {i}", "target_new": f"t{i}"} for i in range(300) if i != 36], measure=False)
        assert torch.equal(ref.editor.state_dict()[0]["rows"], rows)
