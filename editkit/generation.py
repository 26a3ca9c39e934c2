"""Batched text generation with whatever edits are attached to the model.

One decoding loop serves the library (Session.generate, metrics, WISE's context prefixes) and
the service's scheduler: left-padded prompts, a KV cache, and per row its own number of new
tokens, temperature, top-p, stop strings and random stream. Rows that finish stay in the
batch (padded) until the last one does, because components keep per-row state by batch
index (WISE's routing decision, NMC's running query) for the cached steps.

Sampling matches transformers' generate: temperature, then top-k (the model's generation
config, 50 by default), then top-p, then one multinomial draw. Rows that share a random
stream (one `seed` for a whole call) draw together in row order, as generate does with the
global generator; a row with a stream of its own draws alone, so a request with a seed gets
the same text alone or batched with others."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import lru_cache

import torch

from editkit.errors import InvalidRequest
from editkit.model import LoadedModel


def check_fits(loaded: LoadedModel, items: Iterable[tuple[str, str, int]]) -> None:
    """InvalidRequest for the first (field, text, extra tokens) whose tokens plus the extra
    ones (tokens to generate, or room a method needs) are over the model's context length:
    past it a model with learned positions (GPT-2) fails, and others lose the thread."""
    limit = loaded.context_length
    if not limit:
        return
    for field_name, text, extra in items:
        n = len(loaded.tokenizer(text).input_ids)
        if n + extra > limit:
            raise InvalidRequest(f"{field_name}: {n} tokens + {extra} is over the model's context of {limit} tokens")


@dataclass
class Row:
    """One prompt to continue and how."""

    prompt: str  # or "" with prompt_ids
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    stream: int | None = None  # rows with the same stream id share one random generator
    seed: int | None = None  # the stream's seed (None: drawn from torch's global generator)
    stop: tuple[str, ...] = ()  # the row ends before the first of these in its text
    prompt_ids: list[int] | None = None  # the prompt as token ids (then `prompt` is not tokenized)


@dataclass
class Decoded:
    ids: list[int] = field(default_factory=list)  # new tokens, up to the end (no end token)
    text: str = ""
    finish: str = "length"  # "length", "stop" (a stop string), "end" (the end-of-text token), "cancelled"


TokenCallback = Callable[[int, int, str], None]  # (row, token id, text so far of that row)


def _end_tokens(loaded: LoadedModel) -> set[int]:
    eos = getattr(loaded.model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = loaded.tokenizer.eos_token_id
    return set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])


def _warp(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float) -> torch.Tensor:
    """transformers' sampling warpers, in its order: temperature, top-k, top-p."""
    scores = logits / temperature
    if top_k:
        k = min(top_k, scores.shape[-1])
        kth = torch.topk(scores, k).values[..., -1, None]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= (1 - top_p)
        remove[..., -1:] = False
        scores = scores.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    return scores


@lru_cache(maxsize=None)
def _keeps_last_logits(model_class: type) -> bool:
    """Whether the model can return the last position's logits only (`logits_to_keep`): the
    prompt's other positions would cost a vocabulary-wide projection each (measured on the
    default model: 15% of a batch of 8 prompts' 16-token decode)."""
    return "logits_to_keep" in inspect.signature(model_class.forward).parameters


def _generators(rows: list[Row], device: torch.device) -> dict[int, torch.Generator]:
    out = {}
    for row in rows:
        if row.stream is not None and row.stream not in out and row.temperature > 0:
            seed = row.seed if row.seed is not None else int(torch.randint(0, 2**62, (1,)))
            out[row.stream] = torch.Generator(device=device).manual_seed(seed)
    return out


@torch.no_grad()
def decode(loaded: LoadedModel, rows: list[Row], on_token: TokenCallback | None = None,
           cancelled: Callable[[int], bool] | None = None) -> list[Decoded]:
    """Continue every row's prompt in one batch (see the module doc). `on_token(row, id, text)`
    hears each new token; a row for which `cancelled(row)` turns true stops there (its client
    went away) and the batch ends once no live row is left."""
    if not rows:
        return []
    tok, model, device = loaded.tokenizer, loaded.model, loaded.device
    top_k = getattr(model.generation_config, "top_k", None)
    top_k = 50 if top_k is None else top_k  # transformers' default where the model sets none
    ends = _end_tokens(loaded)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (min(ends) if ends else 0)
    prompts = [_prompt_ids(loaded, r) for r in rows]
    width = max(len(p) for p in prompts)  # left padding: every row's last prompt token lines up
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    generators = _generators(rows, device)
    out = [Decoded() for _ in rows]
    live = [r.max_new_tokens > 0 for r in rows]
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    step_ids, cache = ids, None
    last_only = {"logits_to_keep": 1} if _keeps_last_logits(type(model)) else {}
    for _ in range(max((r.max_new_tokens for r in rows), default=0)):
        if not any(live):
            break
        result = model(input_ids=step_ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                       **last_only)
        cache = result.cache
        logits = result.logits[:, -1].float()
        chosen = logits.argmax(dim=-1)
        for stream, generator in generators.items():  # rows of one stream draw together, in order
            members = [i for i, r in enumerate(rows) if r.stream == stream and r.temperature > 0]
            r0 = rows[members[0]]
            probs = _warp(logits[members], r0.temperature, top_k, r0.top_p).softmax(dim=-1)
            chosen[members] = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        for i in (i for i, r in enumerate(rows) if r.temperature > 0 and r.stream is None):
            probs = _warp(logits[i: i + 1], rows[i].temperature, top_k, rows[i].top_p).softmax(dim=-1)
            chosen[i] = torch.multinomial(probs, 1).squeeze()
        tokens = chosen.tolist()
        for i, (row, token) in enumerate(zip(rows, tokens)):
            if live[i] and cancelled is not None and cancelled(i):
                live[i], out[i].finish = False, "cancelled"
            if not live[i]:
                tokens[i] = pad
                continue
            if token in ends:
                live[i], out[i].finish, tokens[i] = False, "end", pad
                continue
            out[i].ids.append(token)
            if row.stop or on_token:  # the text so far is needed now; otherwise once at the end
                out[i].text = tok.decode(out[i].ids, skip_special_tokens=True)
                hit = min((out[i].text.find(s) for s in row.stop if s and s in out[i].text), default=-1)
                if hit >= 0:
                    out[i].text, out[i].finish, live[i] = out[i].text[:hit], "stop", False
            if live[i] and len(out[i].ids) >= row.max_new_tokens:
                live[i] = False
            if on_token:
                on_token(i, token, out[i].text)
        step_ids = torch.tensor(tokens, device=device)[:, None]
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
        positions = positions[:, -1:] + 1
    for row, decoded in zip(rows, out):
        if not (row.stop or on_token):
            decoded.text = tok.decode(decoded.ids, skip_special_tokens=True)
    return out


def _prompt_ids(loaded: LoadedModel, row: Row) -> list[int]:
    return list(row.prompt_ids) if row.prompt_ids is not None else list(loaded.tokenizer(row.prompt).input_ids)


@torch.no_grad()
def read_ahead(loaded: LoadedModel, rows: list[Row], size: int) -> list[Row]:
    """Rows whose prompt is longer than `size` tokens, read chunk by chunk: every chunk but
    the last is one forward pass of its own (a component with runtime memory, such as memory
    reweaving, keeps what it needs of it), and the row continues from its last `size` tokens.
    Call it inside the conversation whose memory should receive the chunks. A tokenizer's
    leading special token (BOS) starts every chunk, as it starts every short prompt."""
    bos = _leading_special(loaded)
    out = []
    for row in rows:
        ids = _prompt_ids(loaded, row)
        body = ids[1:] if bos is not None and ids[:1] == [bos] else ids
        if len(body) <= size:
            out.append(row)
            continue
        head, tail = body[:-size], body[-size:]
        lead = [] if bos is None else [bos]
        for lo in range(0, len(head), size):
            chunk = torch.tensor([lead + head[lo:lo + size]], device=loaded.device)
            loaded.model(input_ids=chunk, attention_mask=torch.ones_like(chunk), use_cache=False)
        out.append(Row(**{**row.__dict__, "prompt_ids": lead + tail}))
    return out


def _leading_special(loaded: LoadedModel) -> int | None:
    """The special token the tokenizer puts before every text (BOS), if it does."""
    tok = loaded.tokenizer
    first = tok("a").input_ids[:1]
    return first[0] if first and first[0] in set(tok.all_special_ids) else None


def generate_ids(loaded: LoadedModel, prompts: list[str], max_new_tokens: int = 32, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = None) -> list[list[int]]:
    """New token ids continuing each prompt (up to the end token), greedy when temperature is 0;
    with sampling, one random stream from `seed` for the whole call."""
    rows = [Row(p, max_new_tokens, temperature, top_p, stream=0, seed=seed) for p in prompts]
    return [d.ids for d in decode(loaded, rows)]


def generate_from_ids(loaded: LoadedModel, rows: list[list[int]], max_new_tokens: int = 32,
                      temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None) -> list[list[int]]:
    """generate_ids for prompts given as token ids (e.g. a prompt with part of a target)."""
    batch = [Row("", max_new_tokens, temperature, top_p, stream=0, seed=seed, prompt_ids=list(r)) for r in rows]
    return [d.ids for d in decode(loaded, batch)]


def generate(loaded: LoadedModel, prompts: list[str], max_new_tokens: int = 32, temperature: float = 0.0,
             top_p: float = 1.0, seed: int | None = None) -> list[str]:
    """Text continuations of `prompts` (see generate_ids)."""
    rows = [Row(p, max_new_tokens, temperature, top_p, stream=0, seed=seed) for p in prompts]
    return [d.text for d in decode(loaded, rows)]
