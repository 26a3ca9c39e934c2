"""The key-value memory and its controller: reads addressed by the edit's subject (with the
prompt's content choosing among a subject's slots) behind a deferral threshold, and the
decisions of a write (which slot, what to erase) with usage statistics."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch


CONTEXT_WEIGHT = 0.25  # how much the prompt's content counts beside the subject when choosing a slot


class Carried(NamedTuple):
    """What a row's next KV-cached call carries on from."""

    seen: torch.Tensor  # (B, N) best subject match so far
    answered: torch.Tensor  # (B, N) bool: an answer was written after the slot started
    last_id: torch.Tensor  # (B,) canonical id of the last input token (-2: none)


@dataclass
class Memory:
    keys: torch.Tensor  # (N, H) unit vectors: standardised running-mean queries at the edit's last prompt token
    subjects: torch.Tensor  # (N, H) unit vectors: the standardised state of the subject's last token
    names: torch.Tensor  # (N,) long: canonical id of the token the subject key was taken at
    leads: torch.Tensor  # (N,) long: canonical id of the token before it (-1: none needed)
    values: torch.Tensor  # (N, H) added to the written block's output where a slot is read
    ends: torch.Tensor  # (N,) long: canonical id of the answer's last token (reading stops once it is written)
    usage: torch.Tensor  # (N,) decayed write counts
    labels: list[str] = field(default_factory=list)  # normalised target of each slot
    # Backing buffers with room to grow (write_slot): the tensors above are their first N rows.
    spare: dict[str, torch.Tensor] | None = field(default=None, repr=False, compare=False)

    TENSORS = ("keys", "subjects", "names", "leads", "values", "ends", "usage")

    def subset(self, rows: torch.Tensor) -> "Memory":
        """A copy of the given slots only."""
        return Memory(*(getattr(self, name)[rows] for name in self.TENSORS), [self.labels[i] for i in rows.tolist()])

    @classmethod
    def empty(cls, hidden: int, device) -> "Memory":
        z, n = dict(dtype=torch.float32, device=device), dict(dtype=torch.long, device=device)
        return cls(torch.zeros((0, hidden), **z), torch.zeros((0, hidden), **z), torch.zeros((0,), **n),
                   torch.zeros((0,), **n), torch.zeros((0, hidden), **z), torch.zeros((0,), **n),
                   torch.zeros((0,), **z), [])

    def __len__(self) -> int:
        return len(self.labels)

    def address(self, tokens: torch.Tensor, context: torch.Tensor, ids: torch.Tensor | None, threshold: float,
                width: float, before: Carried | None = None,
                prefilter: bool = True) -> tuple[torch.Tensor, torch.Tensor, Carried]:
        """See _address. With the input's token ids known, only the slots keyed at one of its
        tokens, or already started by an earlier call of these rows, can be read: similarities
        are computed for those alone (the same result, tested), so a read costs the number of
        such slots, not the memory's size."""
        n = len(self)
        if before is None:
            before = Carried(torch.full((tokens.shape[0], n), float("-inf"), device=tokens.device),
                             torch.zeros((tokens.shape[0], n), dtype=torch.bool, device=tokens.device),
                             torch.full((tokens.shape[0],), -2, dtype=torch.long, device=tokens.device))
        if ids is None or not prefilter:
            return self._address(tokens, context, ids, threshold, width, before)
        live = torch.isin(self.names, ids) | (before.seen >= threshold).any(dim=0)
        cand = live.nonzero().squeeze(1)
        if len(cand) == n:
            return self._address(tokens, context, ids, threshold, width, before)
        if not len(cand):  # nothing can be read: the rows run unchanged
            shape = tokens.shape[:2]
            return (torch.zeros(shape, dtype=torch.long, device=tokens.device), torch.zeros(shape, device=tokens.device),
                    Carried(before.seen.clamp_min(-1.0), before.answered.clone(), ids[:, -1]))
        sub = self.subset(cand)
        part = Carried(before.seen[:, cand], before.answered[:, cand], before.last_id)
        index, gate, after = sub._address(tokens, context, ids, threshold, width, part)
        seen = before.seen.clamp_min(-1.0)  # an unnamed slot's match is -1 at every position
        seen[:, cand] = after.seen
        answered = before.answered.clone()
        answered[:, cand] = after.answered
        return cand[index], gate, Carried(seen, answered, after.last_id)

    def _address(self, tokens: torch.Tensor, context: torch.Tensor, ids: torch.Tensor | None, threshold: float,
                 width: float, before: Carried) -> tuple[torch.Tensor, torch.Tensor, Carried]:
        """Per position of (B, T, H) unit token queries, (B, T, H) unit context queries and
        (B, T) canonical input ids (None: unknown): the slot read, its gate, and what the next
        cached call of these rows carries on from (`before`).

        A token matches a slot's subject when it is the same token as the one the key was taken
        at, its state is similar to the subject key, and the token before it is the subject's
        own ("Rod|man" matches where "Hoff|man" does not: a late subword alone is shared by many
        names, and digits' states are alike: "TR7" is not "TR8"). A slot becomes
        readable at its first match (the best match so far is latched) and stays readable until
        an answer has been written: from the position whose input is the read slot's answer's
        last token on, the model runs as it would, so a generated answer is not repeated. Among
        readable slots the one whose subject matched best wins, the prompt's content deciding
        between slots of one subject (CONTEXT_WEIGHT). The gate is 0 below the threshold and
        rises linearly to 1 at threshold + width. Neighbouring prompts (same relation, another
        subject) do not match the subject, so they run unchanged."""
        subject = tokens.to(torch.float32) @ self.subjects.T  # (B, T, N)
        if ids is not None:
            previous = torch.cat([before.last_id.unsqueeze(1), ids[:, :-1]], dim=1)
            led = (previous.unsqueeze(-1) == self.leads.view(1, 1, -1)) | (self.leads < 0).view(1, 1, -1)
            named = ids.unsqueeze(-1) == self.names.view(1, 1, -1)
            subject = subject.masked_fill(~(led & named), -1.0)
        seen = torch.maximum(subject.cummax(dim=1).values, before.seen.unsqueeze(1))
        started = seen >= threshold
        answered = before.answered.unsqueeze(1).expand_as(started)
        if ids is not None:  # an answer's last token, as input after its subject (not the subject itself)
            earlier = torch.cat([(before.seen >= threshold).unsqueeze(1), started[:, :-1]], dim=1)
            written = ((ids.unsqueeze(-1) == self.ends.view(1, 1, -1)) & earlier).any(dim=-1, keepdim=True)
            # it ends the reading of every slot started by then (another fact of the same
            # subject must not take over); a subject mentioned later starts afresh
            answered = answered | ((written & started).to(torch.uint8).cummax(dim=1).values > 0)
        readable = started & ~answered
        score = seen + CONTEXT_WEIGHT * (context.to(torch.float32) @ self.keys.T)
        index = score.masked_fill(~readable, float("-inf")).argmax(dim=-1)
        best = seen.gather(-1, index.unsqueeze(-1)).squeeze(-1)
        gate = ((best - threshold) / width).clamp(0.0, 1.0) * readable.any(dim=-1)
        last_id = before.last_id if ids is None else ids[:, -1]
        return index, gate, Carried(seen[:, -1], answered[:, -1], last_id)

    def read(self, tokens: torch.Tensor, context: torch.Tensor, ids: torch.Tensor | None, threshold: float,
             width: float, before: Carried | None = None) -> tuple[torch.Tensor, Carried]:
        """What the memory adds at each position (B, T, H), zero where it defers; and the state
        the rows' next cached call carries on from."""
        index, gate, after = self.address(tokens, context, ids, threshold, width, before)
        return gate.unsqueeze(-1) * self.values[index], after


@dataclass
class WritePlan:
    """The controller's decision for one edit, applied only once the write is trained."""

    slot: int
    action: str  # "new" | "rewrite" | "reinforce" | "evict"
    erase: torch.Tensor  # (H,) in [0, 1]: share of the slot's old value removed before writing
    start: torch.Tensor  # (H,) the value the write starts from: (1 - erase) * old
    evicted: str | None = None


def same_fact(memory: Memory, key: torch.Tensor, subject: torch.Tensor, match_subject: float,
              match_context: float) -> int | None:
    """The slot holding the same fact (its subject and its prompt's content both match), if any."""
    if not len(memory):
        return None
    context = memory.keys @ key.to(torch.float32)
    both = (memory.subjects @ subject.to(torch.float32) >= match_subject) & (context >= match_context)
    if not bool(both.any()):
        return None
    return int(context.masked_fill(~both, float("-inf")).argmax())


def rule_controller(memory: Memory, key: torch.Tensor, subject: torch.Tensor, label: str, capacity: int,
                    match_subject: float, match_context: float) -> WritePlan:
    """The controller, a hand-written rule (not learned). The same fact again (subject and
    content match) rewrites its slot, or refines it when the target is the same; else a free
    slot, else the least used one. (The editor turns a write that needs no value into "erase"
    or "none".)"""
    hidden = key.shape[-1]
    zeros = torch.zeros(hidden, dtype=torch.float32, device=memory.keys.device)
    ones = torch.ones_like(zeros)
    j = same_fact(memory, key, subject, match_subject, match_context)
    if j is not None:
        if memory.labels[j] == label:  # same answer: keep what is there and refine it
            return WritePlan(j, "reinforce", zeros, memory.values[j].clone())
        return WritePlan(j, "rewrite", ones, zeros.clone())
    if len(memory) < capacity:
        return WritePlan(len(memory), "new", ones, zeros.clone())
    j = int(torch.argmin(memory.usage))  # ties: the oldest slot
    return WritePlan(j, "evict", ones, zeros.clone(), evicted=memory.labels[j])


@dataclass
class Entry:
    """What one slot holds."""

    key: torch.Tensor  # (H,) prompt key
    subject: torch.Tensor  # (H,) subject key
    name: int  # canonical id of the token the subject key was taken at
    lead: int  # canonical id of the token before it, -1 for none
    value: torch.Tensor  # (H,)
    end: int  # canonical id of the answer's last token
    label: str


def write_slot(memory: Memory, slot: int, entry: Entry, usage_decay: float, new_occupant: bool = False) -> Memory:
    """`memory` with `slot` holding `entry`, written in place (the editor's memory once a write
    has succeeded): a slot's rows are overwritten, a new slot goes into buffers that double when
    full, so an edit costs the same however many slots there are (with_slot copies them all).
    Usage as in with_slot."""
    n = len(memory)
    row = {"keys": entry.key, "subjects": entry.subject, "names": entry.name, "leads": entry.lead,
           "values": entry.value, "ends": entry.end}
    if slot < n:
        for name, value in row.items():
            getattr(memory, name)[slot] = torch.as_tensor(value).to(getattr(memory, name))
        memory.labels[slot] = entry.label
        memory.usage.mul_(usage_decay)
        if new_occupant:
            memory.usage[slot] = 0.0
        memory.usage[slot] += 1.0
        return memory
    buffers = memory.spare
    # reuse the buffers only if this memory is their newest user (an older memory sharing them
    # would write over a row the newer one holds)
    if (buffers is None or buffers["keys"].shape[0] <= n or int(buffers["rows"]) != n
            or buffers["keys"].data_ptr() != memory.keys.data_ptr()):
        room = max(64, 2 * (n + 1))
        buffers = {"rows": torch.tensor(n)}
        for name in Memory.TENSORS:
            t = getattr(memory, name)
            buffers[name] = torch.zeros((room, *t.shape[1:]), dtype=t.dtype, device=t.device)
            buffers[name][:n] = t
    for name, value in row.items():
        buffers[name][n] = torch.as_tensor(value).to(buffers[name])
    buffers["usage"][:n].mul_(usage_decay)
    buffers["usage"][n] = 1.0
    buffers["rows"] = torch.tensor(n + 1)
    return Memory(*(buffers[name][:n + 1] for name in Memory.TENSORS), memory.labels + [entry.label], spare=buffers)


def with_slot(memory: Memory, slot: int, entry: Entry, usage_decay: float, new_occupant: bool = False) -> Memory:
    """A new Memory with `slot` holding `entry`; usage decayed, the slot's raised (from zero
    when `new_occupant`: an evicted slot's history is not the new edit's)."""
    keys, subjects, values = memory.keys.clone(), memory.subjects.clone(), memory.values.clone()
    names, leads, ends = memory.names.clone(), memory.leads.clone(), memory.ends.clone()
    usage, labels = memory.usage * usage_decay, list(memory.labels)
    if slot == len(labels):
        keys = torch.cat([keys, entry.key[None].to(keys)])
        subjects = torch.cat([subjects, entry.subject[None].to(subjects)])
        names = torch.cat([names, names.new_tensor([entry.name])])
        leads = torch.cat([leads, leads.new_tensor([entry.lead])])
        values = torch.cat([values, entry.value[None].to(values)])
        ends = torch.cat([ends, ends.new_tensor([entry.end])])
        usage = torch.cat([usage, usage.new_zeros(1)])
        labels.append(entry.label)
    else:
        keys[slot], subjects[slot], values[slot] = entry.key.to(keys), entry.subject.to(subjects), entry.value.to(values)
        names[slot], leads[slot], ends[slot], labels[slot] = entry.name, entry.lead, entry.end, entry.label
    if new_occupant:
        usage[slot] = 0.0
    usage[slot] += 1.0
    return Memory(keys, subjects, names, leads, values, ends, usage, labels)
