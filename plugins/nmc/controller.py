"""The learned controller: a small network that decides where an edit is written.

Per edit the candidates are the TOP slots keyed at the edit's subject token (same canonical
token and lead) whose subject keys are most like the edit's, and one fresh slot: a new one,
or when the memory is full the least used one (its fact is then evicted). Each candidate is
described by scale-free features of the write key against the slot and of the memory (FEATURES:
subject and prompt-key similarity, same subject token, same target, usage, whether the edit's
prompt reads the slot now and how strongly, how full the memory is, fresh or not); the
network scores every candidate and the edit goes to the best. Writing into a slot that is
there is a rewrite (a reinforce when the target is the same); the value then starts from
zero or from the old value, as with the rule controller.

Trained (control_train.py) on streams of CounterFact training facts in which facts are edited,
edited again through a rephrase, and reverted, by the loss of the memory's reads at the end
of each stream; either by backpropagating that loss into every decision, or decoupled,
through a synthetic-gradient module that predicts each decision's gradient at the moment it
is made and learns from the true gradients once the stream's reads are scored."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from editkit.errors import InvalidRequest
from editkit.tensorfile import load_tensor_file, save_tensor_file

from .memory import Memory, WritePlan

FEATURES = ("subject", "same_token", "context", "same_label", "usage", "read", "fullness", "fresh")
TOP = 4
FILE_KEY = "editkit.nmc.controller"
FORMAT = 1


@dataclass
class Candidates:
    slots: list[int]  # the slot each candidate writes (len(memory): a new slot)
    fresh: list[bool]  # a new or evicted slot, not a rewrite of the fact that is there
    features: torch.Tensor  # (K, len(FEATURES))


def candidates(memory: Memory, key: torch.Tensor, subject: torch.Tensor, name: int, lead: int, label: str,
               capacity: int, read: tuple[int, float] | None) -> Candidates:
    """The write candidates of an edit (see the module doc). `read`: the slot the edit's prompt
    reads now and its gate (None: none)."""
    n = len(memory)
    fullness = n / capacity
    slots, fresh, rows = [], [], []
    if n:
        subj = memory.subjects @ subject.to(torch.float32)
        ctx = memory.keys @ key.to(torch.float32)
        same = (memory.names == name) & ((memory.leads == lead) | (memory.leads < 0))
        umax = float(memory.usage.max()) + 1e-6

        def row(j: int, is_fresh: bool) -> list[float]:
            gate = read[1] if read is not None and read[0] == j else 0.0
            return [float(subj[j]), float(same[j]), float(ctx[j]), float(memory.labels[j] == label),
                    float(memory.usage[j]) / umax, gate, fullness, float(is_fresh)]

        for j in torch.argsort(subj.masked_fill(~same, -2.0), descending=True)[:TOP].tolist():
            if bool(same[j]):
                slots.append(j), fresh.append(False), rows.append(row(j, False))
    if n < capacity:
        slots.append(n), fresh.append(True), rows.append([0.0] * 6 + [fullness, 1.0])
    else:
        j = int(torch.argmin(memory.usage))
        slots.append(j), fresh.append(True), rows.append(row(j, True))
    return Candidates(slots, fresh, torch.tensor(rows, dtype=torch.float32, device=memory.keys.device))


class ControllerNet(nn.Module):
    """Scores each candidate from its features: (K, F) -> (K,) logits."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.width = width
        self.mlp = nn.Sequential(nn.Linear(len(FEATURES), width), nn.GELU(), nn.Linear(width, width), nn.GELU(),
                                 nn.Linear(width, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.mlp(features).squeeze(-1)

    def describe(self) -> dict[str, Any]:
        return {"format": FORMAT, "features": list(FEATURES), "top": TOP, "width": self.width}


def plan_from(cands: Candidates, choice: int, memory: Memory, label: str) -> WritePlan:
    """The WritePlan of writing candidate `choice`."""
    device = memory.keys.device
    hidden = memory.keys.shape[1] if memory.keys.dim() == 2 else 0
    zeros = torch.zeros(hidden, dtype=torch.float32, device=device)
    slot = cands.slots[choice]
    if cands.fresh[choice]:
        if slot == len(memory):
            return WritePlan(slot, "new", torch.ones_like(zeros), zeros)
        return WritePlan(slot, "evict", torch.ones_like(zeros), zeros, evicted=memory.labels[slot])
    if memory.labels[slot] == label:
        return WritePlan(slot, "reinforce", zeros, memory.values[slot].clone())
    return WritePlan(slot, "rewrite", torch.ones_like(zeros), zeros)


@torch.no_grad()
def learned_controller(net: ControllerNet, memory: Memory, key: torch.Tensor, subject: torch.Tensor, name: int,
                       lead: int, label: str, capacity: int, read: tuple[int, float] | None) -> WritePlan:
    """The learned controller's decision (the best-scored candidate)."""
    cands = candidates(memory, key, subject, name, lead, label, capacity, read)
    return plan_from(cands, int(net(cands.features).argmax()), memory, label)


def save_controller(path: str | Path, net: ControllerNet, info: dict[str, Any]) -> None:
    save_tensor_file(path, net.state_dict(), FILE_KEY, {**net.describe(), **info})


def load_controller(path: str | Path, device) -> ControllerNet:
    """A controller saved by `editkit nmc train-controller`; a file for other features is refused."""
    tensors, doc = load_tensor_file(path, FILE_KEY, "learned-controller file")
    net = ControllerNet(int(doc.get("width", 0)) or 32)
    want = {k: v for k, v in net.describe().items() if k != "width"}
    bad = {k: (doc.get(k), v) for k, v in want.items() if doc.get(k) != v}
    own = net.state_dict()
    if bad or set(tensors) != set(own) or any(tensors[k].shape != own[k].shape for k in own):
        raise InvalidRequest(f"learned-controller file {path} does not fit this version of the controller ({bad or 'shapes'})")
    net.load_state_dict({k: v.to(torch.float32) for k, v in tensors.items()})
    return net.to(device).eval()
