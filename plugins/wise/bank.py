"""WISE's side memories (each a change from the main memory, (out, in)): the one being trained
is dense; finished ones (retrieve mode) are packed as a bitmap of their nonzero entries plus
those entries' values.

A memory trained under a mask_ratio gradient mask is mostly zero (80% at the default 0.2).
Kept dense, the 126 memories of a 1,000-edit stream on the default model took 446 MB; packed,
a memory costs 1 bit per entry plus its nonzero values (in `dtype`).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import torch

_BITS = (1, 2, 4, 8, 16, 32, 64, 128)
DENSE_CACHE = 4  # finished memories kept unpacked: a decoding step reuses the routed rows' memory


def appended(t: torch.Tensor, buf: torch.Tensor | None, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`t` with `rows` appended along dim 0, and the buffer the result is a view of. The rows
    live in a buffer with spare capacity (doubled when full; untouched pages are never
    committed), so appending costs the same however many rows came before. `buf` is the buffer
    `t` came from, or None / any other tensor when `t` is not such a view."""
    n, k = t.shape[0], rows.shape[0]
    if buf is None or buf.data_ptr() != t.data_ptr() or buf.shape[0] < n + k:
        fresh = t.new_empty((max(8, 2 * (n + k)),) + tuple(t.shape[1:]))
        fresh[:n] = t
        buf = fresh
    buf[n: n + k] = rows
    return buf[: n + k], buf


def _pack_bits(nonzero: torch.Tensor) -> torch.Tensor:
    """Flat bool (n,) -> uint8 (ceil(n / 8),), bit j of byte i = entry 8 i + j."""
    pad = (-nonzero.numel()) % 8
    flags = torch.cat([nonzero, nonzero.new_zeros(pad)]).view(-1, 8).to(torch.uint8)
    return (flags * torch.tensor(_BITS, dtype=torch.uint8, device=flags.device)).sum(1, dtype=torch.uint8)


def _unpack_bits(bits: torch.Tensor, n: int) -> torch.Tensor:
    return (bits[:, None] & torch.tensor(_BITS, dtype=torch.uint8, device=bits.device)).ne(0).view(-1)[:n]


class MemoryBank:
    """Memories 0 .. len - 1; the last is `current` (dense, float32, trained in place), the
    others are packed and read back unpacked (float32) by index."""

    def __init__(self, shape: tuple[int, int], device, dtype: torch.dtype, mark: Callable[..., None]):
        self.shape, self.device, self.dtype = shape, device, dtype
        self._mark = mark  # StateChanges.mark of the owning editor
        self.current = torch.zeros(shape, dtype=torch.float32, device=device)
        n = shape[0] * shape[1]
        self.bits = torch.zeros((0, (n + 7) // 8), dtype=torch.uint8, device=device)  # one row per finished memory
        self.values = torch.zeros((0,), dtype=dtype, device=device)  # their nonzero entries, in order
        self.offsets = [0]  # memory i's values are values[offsets[i]: offsets[i + 1]]
        self._bufs: dict[str, torch.Tensor | None] = {"bits": None, "values": None}
        self._cache: OrderedDict[int, torch.Tensor] = OrderedDict()

    def __len__(self) -> int:
        return self.bits.shape[0] + 1

    def __getitem__(self, m: int) -> torch.Tensor:
        """Memory m (negative counts from the end) as a dense float32 (out, in) tensor; the
        current one is the live tensor itself."""
        m = range(len(self))[m]
        if m == len(self) - 1:
            return self.current
        dense = self._cache.get(m)
        if dense is None:
            nonzero = _unpack_bits(self.bits[m], self.shape[0] * self.shape[1])
            dense = torch.zeros(nonzero.shape, dtype=torch.float32, device=self.device)
            dense.masked_scatter_(nonzero, self.values[self.offsets[m]: self.offsets[m + 1]].to(torch.float32))
            dense = dense.view(self.shape)
            self._cache[m] = dense
            while len(self._cache) > DENSE_CACHE:
                self._cache.popitem(last=False)
        self._cache.move_to_end(m)
        return dense

    def dense(self) -> torch.Tensor:
        """Every memory as one dense (len, out, in) stack: len times a dense memory's bytes, for
        tests and offline analysis, never the serving path."""
        return torch.stack([self[m].clone() for m in range(len(self))])

    def chunks(self, size: int):
        """Every memory, `size` at a time, as stacked dense (k, out, in) tensors."""
        for lo in range(0, len(self), size):
            yield torch.stack([self[m] for m in range(lo, min(lo + size, len(self)))])

    def set_current(self, delta: torch.Tensor) -> None:
        self.current.copy_(delta)
        self._mark("memory")

    def finish(self) -> None:
        """Pack the current memory as the last finished one; the next edit trains a fresh one."""
        self._append_packed(self.current)
        self.current.zero_()
        self._mark("memory")

    def replace_last(self, k: int, merged: torch.Tensor) -> None:
        """Replace the last k finished memories by one (a retrieve merge)."""
        lo = self.bits.shape[0] - k
        if k < 1 or lo < 0:
            raise ValueError(f"cannot replace the last {k} of {self.bits.shape[0]} finished memories")
        self.bits, self.values = self.bits[:lo], self.values[: self.offsets[lo]]
        del self.offsets[lo + 1:]
        self._cache.clear()
        self._append_packed(merged)
        self._mark("packed_bits", lo)
        self._mark("packed_values", self.offsets[lo])
        self._mark("packed_offsets", lo)

    def _append_packed(self, dense: torch.Tensor) -> None:
        flat = dense.reshape(-1)
        nonzero = flat != 0
        self.bits, self._bufs["bits"] = appended(self.bits, self._bufs["bits"], _pack_bits(nonzero)[None])
        self.values, self._bufs["values"] = appended(self.values, self._bufs["values"], flat[nonzero].to(self.dtype))
        self.offsets.append(self.values.shape[0])

    def nbytes(self) -> int:
        """Bytes the memories take (the spare capacity of the growing buffers is not committed)."""
        return sum(t.numel() * t.element_size() for t in (self.current, self.bits, self.values))

    # ---- state ---------------------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        return {"memory": self.current, "packed_bits": self.bits, "packed_values": self.values,
                "packed_offsets": torch.tensor(self.offsets, dtype=torch.int64)}

    def problems(self, tensors: dict[str, torch.Tensor]) -> list[str]:
        """What in `tensors` does not fit this bank (empty: load() will take it)."""
        out_f, in_f = self.shape
        found = []
        cur, bits, values, offsets = (tensors.get(k) for k in ("memory", "packed_bits", "packed_values", "packed_offsets"))
        if cur is None or tuple(cur.shape) != (out_f, in_f):
            found.append("memory shape")
        if bits is None or bits.dim() != 2 or bits.shape[1] != self.bits.shape[1] or bits.dtype != torch.uint8:
            return found + ["packed_bits shape"]
        if values is None or values.dim() != 1 or offsets is None or offsets.dim() != 1 \
                or offsets.shape[0] != bits.shape[0] + 1:
            return found + ["packed_values / packed_offsets shape"]
        off = offsets.tolist()
        counts = [int(_unpack_bits(b, out_f * in_f).sum()) for b in bits]
        if off[0] != 0 or off[-1] != values.shape[0] or any(off[i + 1] - off[i] != c for i, c in enumerate(counts)):
            found.append("packed_offsets do not match the bitmaps")
        return found

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        """Take a state that problems() accepted."""
        self.current = tensors["memory"].to(self.device, torch.float32).clone()
        self.bits = tensors["packed_bits"].to(self.device).clone()
        self.values = tensors["packed_values"].to(self.device, self.dtype).clone()
        self.offsets = [int(v) for v in tensors["packed_offsets"]]
        self._bufs = {"bits": None, "values": None}
        self._cache.clear()

    def load_dense(self, memories: torch.Tensor) -> None:
        """Take a (G, out, in) stack of dense memories (state format 1): the last is current."""
        self.load({"memory": memories[-1], "packed_bits": self.bits[:0], "packed_values": self.values[:0],
                   "packed_offsets": torch.zeros(1, dtype=torch.int64)})
        for m in memories[:-1]:
            self._append_packed(m.to(self.device, torch.float32))
