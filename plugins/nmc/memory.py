"""The key-value memory and its controller: content-addressed reads with a deferral threshold,
and the decisions of a write (which slot, what to erase) with usage statistics."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Memory:
    keys: torch.Tensor  # (N, H) unit vectors: standardised running-mean queries at the edit's last prompt token
    values: torch.Tensor  # (N, H) added to the written block's output where a key is read
    usage: torch.Tensor  # (N,) decayed write counts
    labels: list[str] = field(default_factory=list)  # normalised target of each slot

    @classmethod
    def empty(cls, hidden: int, device) -> "Memory":
        z = dict(dtype=torch.float32, device=device)
        return cls(torch.zeros((0, hidden), **z), torch.zeros((0, hidden), **z), torch.zeros((0,), **z), [])

    def __len__(self) -> int:
        return len(self.labels)

    def address(self, query: torch.Tensor, threshold: float, width: float,
                best_before: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per query position of (B, T, H) queries: the nearest slot, the read gate, and each
        row's best similarity so far (to carry into the next cached call).

        The gate is 0 below the threshold and rises linearly to 1 at threshold + width; and a
        position reads only while the match is the best yet in its sequence (similarity at
        least that of every earlier position, `best_before` covering earlier calls). So the
        value is added up to the end of the matching prompt, where similarity peaks, and not
        again on the tokens that follow: the generated answer does not keep re-reading it
        (which made the default model repeat an edited answer)."""
        sims = query.to(torch.float32) @ self.keys.T
        best, index = sims.max(dim=-1)
        if best_before is None:
            best_before = torch.full(best.shape[:-1], float("-inf"), device=best.device)
        running = torch.maximum(best.cummax(dim=-1).values, best_before.unsqueeze(-1))
        earlier = torch.cat([best_before.unsqueeze(-1), running[..., :-1]], dim=-1)
        gate = ((best - threshold) / width).clamp(0.0, 1.0) * (best >= earlier)
        return index, gate, running[..., -1]

    def read(self, query: torch.Tensor, threshold: float, width: float,
             best_before: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """What the memory adds at each position (B, T, H), zero where it defers; and the
        rows' best similarity so far."""
        index, gate, best = self.address(query, threshold, width, best_before)
        return gate.unsqueeze(-1) * self.values[index], best


@dataclass
class WritePlan:
    """The controller's decision for one edit, applied only once the write is trained."""

    slot: int
    action: str  # "new" | "rewrite" | "reinforce" | "evict"
    erase: torch.Tensor  # (H,) in [0, 1]: share of the slot's old value removed before writing
    start: torch.Tensor  # (H,) the value the write starts from: (1 - erase) * old
    evicted: str | None = None


def plan_write(memory: Memory, key: torch.Tensor, label: str, capacity: int, match_threshold: float) -> WritePlan:
    """Content match first (the same prompt again: its slot is rewritten, kept if the target is
    the same), else a free slot, else the least used one."""
    hidden = key.shape[-1]
    zeros = torch.zeros(hidden, dtype=torch.float32, device=memory.keys.device)
    ones = torch.ones_like(zeros)
    if len(memory):
        sims = memory.keys @ key.to(torch.float32)
        best, j = sims.max(dim=0)
        if float(best) >= match_threshold:
            j = int(j)
            if memory.labels[j] == label:  # same answer: keep what is there and refine it
                return WritePlan(j, "reinforce", zeros, memory.values[j].clone())
            return WritePlan(j, "rewrite", ones, zeros.clone())
    if len(memory) < capacity:
        return WritePlan(len(memory), "new", ones, zeros.clone())
    j = int(torch.argmin(memory.usage))  # ties: the oldest slot
    return WritePlan(j, "evict", ones, zeros.clone(), evicted=memory.labels[j])


def with_slot(memory: Memory, slot: int, key: torch.Tensor, value: torch.Tensor, label: str,
              usage_decay: float, new_occupant: bool = False) -> Memory:
    """A new Memory with `slot` holding (key, value, label); usage decayed, the slot's raised
    (from zero when `new_occupant`: an evicted slot's history is not the new edit's)."""
    keys, values, usage, labels = memory.keys.clone(), memory.values.clone(), memory.usage * usage_decay, list(memory.labels)
    if slot == len(labels):
        keys = torch.cat([keys, key[None].to(keys)])
        values = torch.cat([values, value[None].to(values)])
        usage = torch.cat([usage, usage.new_zeros(1)])
        labels.append(label)
    else:
        keys[slot], values[slot], labels[slot] = key.to(keys), value.to(values), label
    if new_occupant:
        usage[slot] = 0.0
    usage[slot] += 1.0
    return Memory(keys, values, usage, labels)
