"""Training and measuring the reweaver. The base model stays frozen; only the reweaver trains.

Cheap by construction: per episode, the memory (captured from the earlier chunks through the
same hooks serving uses) and the query's hidden states at the reweave layer do not depend on
the reweaver, so both are computed once with no grad. Each step then runs only the reweaver,
the blocks above the reweave layer (adapter.run_blocks) and the vocabulary projection at the
answer positions."""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from editkit.errors import InvalidRequest
from editkit.sites import Site

from .data import Episode
from .intervention import MemoryBuffer, MemoryReweaving


@dataclass
class Prepared:
    ids: torch.Tensor  # (T,) query + answer tokens, without the last one
    targets: torch.Tensor  # (A,) answer tokens scored
    positions: torch.Tensor  # (A,) positions whose next-token prediction is scored
    hidden: torch.Tensor  # (T, H) output of the reweave block, frozen model
    memory: torch.Tensor  # (M, key_window x H), plus H more per entry when values are paired (not 'self')
    sources: torch.Tensor  # (M,)
    # (A, H) the reweave block's output at `positions` when the earlier chunks are in the
    # context (the episode read as one input): what the reconstruction objective aims at
    teacher: torch.Tensor | None = None
    query: torch.Tensor | None = None  # (T, H) output of the query block, when it is not the reweave block


def encode(tokenizer, query: str, answer: str) -> tuple[list[int], int]:
    """Token ids of query + answer and the index of the first scored answer token (leading
    whitespace-only tokens, like a lone space before digits, count as prompt)."""
    full = tokenizer(query + answer).input_ids
    q = tokenizer(query).input_ids
    if full[:len(q)] != q:
        full = q + tokenizer(answer, add_special_tokens=False).input_ids
    start = len(q)
    while start < len(full) - 1 and not tokenizer.decode([full[start]]).strip():
        start += 1
    return full, start


@torch.no_grad()
def _forward_batch(rw: MemoryReweaving, texts: list[list[int]], layers: list[int],
                   embedded: bool = False) -> tuple[dict, torch.Tensor]:
    """Right-padded forward of token lists with no conversation (the reweaver is inert);
    returns {layer: block output (B, T, H)} (and "embed": the input embeddings, if asked)
    and the attention mask (B, T)."""
    device = rw.loaded.device
    pad = rw.tokenizer.pad_token_id if rw.tokenizer.pad_token_id is not None else 0
    n = max(len(t) for t in texts)
    ids = torch.full((len(texts), n), pad, dtype=torch.long, device=device)
    mask = torch.zeros((len(texts), n), dtype=torch.long, device=device)
    for i, t in enumerate(texts):
        ids[i, :len(t)] = torch.tensor(t, device=device)
        mask[i, :len(t)] = 1
    points = {layer: (Site("block", layer), "out") for layer in layers}
    if embedded:
        points["embed"] = (Site("embed"), "out")
    seen, _ = rw.adapter.capture({"input_ids": ids, "attention_mask": mask}, points)
    return seen, mask


@torch.no_grad()
def prepare(rw: MemoryReweaving, items: list[Episode], batch_size: int = 16,
            progress: Callable[[int, int], None] | None = None, teacher: bool = False) -> list[Prepared]:
    """Capture each episode's memory and its query's frozen states at the reweave layer, batched.
    Capture uses the serving selection (MemoryReweaving.select on each chunk alone, then
    MemoryBuffer.add), so training sees what serving would store. `teacher`: also the reweave
    layer's states at the answer positions with the whole episode in the context."""
    out: list[Prepared] = []
    device, tok, cfg = rw.loaded.device, rw.tokenizer, rw.config
    previous = rw.current
    rw.set_conversation(None)
    try:
        for lo in range(0, len(items), batch_size):
            group = items[lo:lo + batch_size]
            buffers = [MemoryBuffer() for _ in group]
            for j in range(max(len(ep.chunks) for ep in group)):
                rows = [i for i, ep in enumerate(group) if j < len(ep.chunks)]
                seen, mask = _forward_batch(rw, [tok(group[i].chunks[j]).input_ids for i in rows], rw.capture_ids,
                                            embedded=rw.values_are_embeddings)
                for r, i in enumerate(rows):
                    embeds = seen["embed"][r:r + 1] if "embed" in seen else None
                    for layer in rw.capture_ids:
                        states, scores = rw.select(seen[layer][r:r + 1], mask[r:r + 1], embeds)
                        buffers[i].add(layer, states, scores, cfg.capacity, cfg.eviction)
            encoded = [encode(tok, ep.query, ep.answer) for ep in group]
            seen, _ = _forward_batch(rw, [full[:-1] for full, _ in encoded], sorted({rw.reweave_id, rw.query_id}))
            taught = [None] * len(group)
            if teacher:
                before = [[t for chunk in ep.chunks for t in tok(chunk).input_ids] for ep in group]
                whole, _ = _forward_batch(rw, [b + full[:-1] for b, (full, _) in zip(before, encoded)], [rw.reweave_id])
                taught = [whole[rw.reweave_id][r, len(b) + start - 1:len(b) + len(full) - 1].clone()
                          for r, (b, (full, start)) in enumerate(zip(before, encoded))]
            for r, ((full, start), buf) in enumerate(zip(encoded, buffers)):
                found = buf.memory(rw.capture_ids)
                if found is None:
                    width = rw.adapter.hidden_size * (rw.config.key_window + (1 if rw.module.paired else 0))
                    found = (torch.zeros(0, width, device=device),
                             torch.zeros(0, dtype=torch.long, device=device))
                out.append(Prepared(torch.tensor(full[:-1], device=device), torch.tensor(full[start:], device=device),
                                    torch.arange(start - 1, len(full) - 1, device=device),
                                    seen[rw.reweave_id][r, :len(full) - 1].clone(), found[0], found[1], taught[r],
                                    None if rw.query_id == rw.reweave_id else seen[rw.query_id][r, :len(full) - 1].clone()))
            if progress:
                progress(len(out), len(items))
    finally:
        rw.set_conversation(previous)
    return out


def woven_forward(rw: MemoryReweaving, batch: list[Prepared],
                  attention: list | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The training path's forward of a batch: the reweave block's states with the reweaver
    applied (B, T, H) and the final-normed states above it (B, T, H); `attention` receives the
    reweaver's attention weights (Reweaver.attend)."""
    hidden, attn = _pad([p.hidden for p in batch])
    memory, mmask = _pad([p.memory for p in batch])
    sources, _ = _pad([p.sources for p in batch])
    queries = None if batch[0].query is None else _pad([p.query for p in batch])[0]
    woven = rw.module(hidden, memory, sources, mmask, queries, attention)
    return woven, rw.adapter.run_blocks(woven, rw.reweave_id + 1, attention_mask=attn.long())


def _pad(tensors: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad (n_i, ...) tensors to (B, max n, ...); mask (B, max n)."""
    n = max(1, max(t.shape[0] for t in tensors))
    out = tensors[0].new_zeros((len(tensors), n, *tensors[0].shape[1:]))
    mask = torch.zeros(len(tensors), n, dtype=torch.bool, device=tensors[0].device)
    for i, t in enumerate(tensors):
        out[i, :t.shape[0]] = t
        mask[i, :t.shape[0]] = True
    return out, mask


def batch_loss(rw: MemoryReweaving, batch: list[Prepared], reconstruction: float = 0.0,
               binding: float = 0.0) -> torch.Tensor:
    """Mean answer-token cross-entropy with the reweaver applied (grad flows to it only), plus
    `reconstruction` x the mean squared error, relative to the target's RMS, between the woven
    states and the teacher's (prepare(teacher=True)) at the answer positions, plus `binding` x
    binding_loss."""
    attention: list = []
    woven, top = woven_forward(rw, batch, attention if binding else None)
    rows = torch.cat([torch.full_like(p.positions, i) for i, p in enumerate(batch)])
    cols = torch.cat([p.positions for p in batch])
    logits = rw.adapter.unembed(top[rows, cols]).float()
    loss = torch.nn.functional.cross_entropy(logits, torch.cat([p.targets for p in batch]))
    if reconstruction:
        target = torch.cat([p.teacher for p in batch]).float()
        rms = target.pow(2).mean(-1, keepdim=True).sqrt()
        loss = loss + reconstruction * ((woven[rows, cols].float() - target) / rms).pow(2).mean()
    if binding:
        loss = loss + binding * binding_loss(rw, batch, attention[0])
    return loss


def binding_loss(rw: MemoryReweaving, batch: list[Prepared], attention: torch.Tensor) -> torch.Tensor:
    """Mean over heads and answer positions of -log(the attention mass on the memory entries
    whose stored value is the token the position must predict). With values from the next
    token's embedding those are the entries right before that token in earlier chunks: the
    answer's cross-entropy reaches the attention only through the blocks above the reweave
    point and teaches it to copy a token, this teaches it which entry holds the right one.
    Positions whose token no entry holds are skipped (0 when none has one). `attention`: (B,
    heads, T, 1 + M) from woven_forward."""
    embed = rw.model.get_input_embeddings().weight
    width = rw.adapter.hidden_size * rw.config.key_window
    terms = []
    for i, p in enumerate(batch):
        held = p.memory[:, width:]  # (M, H) each entry's value: a token's input embedding
        wanted = embed[p.targets].to(held.device, held.dtype)  # (A, H)
        match = (held[None] == wanted[:, None]).all(-1)  # (A, M)
        keep = match.any(-1)
        if keep.any():
            probs = attention[i][:, p.positions[keep], 1:1 + held.shape[0]]  # heads, A', M
            mass = (probs * match[keep].to(probs.dtype)).sum(-1)
            terms.append(-(mass + 1e-6).log().mean())
    return torch.stack(terms).mean() if terms else attention.new_zeros(())


def check_binding(rw: MemoryReweaving, binding: float) -> None:
    """Refuse the binding objective where stored values are not token embeddings (it finds the
    entries holding the answer by their value); callers check before the costly capture."""
    if binding and not rw.values_are_embeddings:
        raise InvalidRequest("the binding objective (on by default) needs values that are token embeddings "
                             "(value_from 'next_token' or 'token'); train with binding=0 (--binding 0) for other values")


def train(rw: MemoryReweaving, prepared: list[Prepared], *, steps: int, lr: float = 3e-3, batch_size: int = 16,
          seed: int = 0, clip: float = 1.0, warmup: int = 10, reconstruction: float = 0.0, binding: float = 1.0,
          progress: Callable[[int, int, float], None] | None = None) -> dict:
    """Adam on the reweaver's parameters; the base model is frozen (its grads are never needed).
    The learning rate warms up linearly over `warmup` steps and decays along a cosine to 0; the
    gradient norm is clipped to `clip`. Runs under torch's deterministic algorithms: with
    several CPU threads the attention backward otherwise sums in a varying order, and this
    training amplifies that noise into runs that differ by tens of recall points (warn_only: on
    CUDA, cuBLAS is deterministic only with CUBLAS_WORKSPACE_CONFIG set; it warns, not fails).
    The loss is batch_loss: the answer cross-entropy plus `binding` x binding_loss (on by default:
    without it a distractor's code is copied as often as the named one) plus `reconstruction` x
    the reconstruction term (off: it measured worse)."""
    check_binding(rw, binding)
    model_params = [p for p in rw.model.parameters() if p.requires_grad]
    for p in model_params:
        p.requires_grad_(False)
    rw.module.requires_grad_(True)
    rng = random.Random(seed)
    opt = torch.optim.Adam(rw.module.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: _rate(i, steps, warmup))
    params = list(rw.module.parameters())
    deterministic = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    losses = []
    started = time.perf_counter()
    try:
        torch.use_deterministic_algorithms(True, warn_only=True)
        rw.module.train()
        for step in range(1, steps + 1):
            batch = rng.sample(prepared, min(batch_size, len(prepared)))
            loss = batch_loss(rw, batch, reconstruction, binding)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, clip)
            opt.step()
            schedule.step()
            losses.append(loss.item())
            if progress:
                progress(step, steps, losses[-1])
    finally:
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
        rw.module.eval()
        rw.module.requires_grad_(False)
        for p in model_params:
            p.requires_grad_(True)
    stats = {"steps": steps, "lr": lr, "batch_size": batch_size, "seed": seed, "examples": len(prepared),
             "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
             "last5_loss": sum(losses[-5:]) / max(1, len(losses[-5:])), "seconds": time.perf_counter() - started,
             "gate": float(torch.tanh(rw.module.gate))}
    rw.meta = {**rw.meta, "trained_steps": int(rw.meta.get("trained_steps", 0)) + steps,
               "last_loss": stats["last_loss"]}
    return stats


def _rate(i: int, steps: int, warmup: int) -> float:
    """Multiplier of the learning rate after i steps: linear warm-up, then cosine to 0."""
    if i < warmup:
        return (i + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (i - warmup) / max(1, steps - warmup))))


@torch.no_grad()
def evaluate(rw: MemoryReweaving, items: list[Episode], use_memory: bool = True) -> dict:
    """Teacher-forced recall through the serving path: feed the earlier chunks in a fresh
    conversation, then score the answer after the query. use_memory=False: the frozen baseline
    (no conversation selected, so the plugin is inert)."""
    tok, device = rw.tokenizer, rw.loaded.device
    exact = tokens = correct = 0
    logprob = 0.0
    previous = rw.current
    try:
        for i, ep in enumerate(items):
            conv = f"__eval__{i}"
            full, start = encode(tok, ep.query, ep.answer)
            ids = torch.tensor([full[:-1]], device=device)
            if use_memory:
                rw.clear(conv)
                rw.set_conversation(conv)
                for chunk in ep.chunks:
                    rw.model(tok(chunk, return_tensors="pt").input_ids.to(device))
            else:
                rw.set_conversation(None)
            logits = rw.model(ids).logits[0, start - 1:].float()
            rw.set_conversation(None)
            rw.clear(conv)
            targets = torch.tensor(full[start:], device=device)
            hits = logits.argmax(-1) == targets
            exact += int(hits.all())
            correct += int(hits.sum())
            tokens += len(targets)
            logprob += float(torch.log_softmax(logits, -1).gather(1, targets[:, None]).mean())
    finally:
        rw.set_conversation(previous)
    n = max(1, len(items))
    return {"items": len(items), "exact": exact / n, "token_accuracy": correct / max(1, tokens),
            "answer_logprob": logprob / n}


@torch.no_grad()
def score(rw: MemoryReweaving, prepared: list[Prepared], use_memory: bool = True, batch_size: int = 16) -> dict:
    """`evaluate`'s numbers from prepared episodes, batched through the training path (which a
    test checks against serving). use_memory=False gives the memory nothing to offer: the
    frozen model's own prediction."""
    exact = tokens = correct = 0
    logprob = 0.0
    for lo in range(0, len(prepared), batch_size):
        batch = prepared[lo:lo + batch_size]
        if not use_memory:
            batch = [dataclasses.replace(p, memory=p.memory[:0], sources=p.sources[:0]) for p in batch]
        _, top = woven_forward(rw, batch)
        for i, p in enumerate(batch):
            logits = rw.adapter.unembed(top[i, p.positions]).float()
            hits = logits.argmax(-1) == p.targets
            exact += int(hits.all())
            correct += int(hits.sum())
            tokens += len(p.targets)
            logprob += float(torch.log_softmax(logits, -1).gather(1, p.targets[:, None]).mean())
    n = max(1, len(prepared))
    return {"items": len(prepared), "exact": exact / n, "token_accuracy": correct / max(1, tokens),
            "answer_logprob": logprob / n}
