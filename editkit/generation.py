"""Batched text generation with whatever edits are attached to the model."""

from __future__ import annotations

from collections.abc import Iterable

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
    for field, text, extra in items:
        n = len(loaded.tokenizer(text).input_ids)
        if n + extra > limit:
            raise InvalidRequest(f"{field}: {n} tokens + {extra} is over the model's context of {limit} tokens")


@torch.no_grad()
def generate_ids(loaded: LoadedModel, prompts: list[str], max_new_tokens: int = 32, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = None) -> torch.Tensor:
    """New token ids (B, max_new_tokens; padded after an early end) continuing `prompts`,
    greedy when temperature is 0. Left padding keeps every row's last prompt token at the
    same position, which batched decoding needs."""
    tok = loaded.tokenizer
    side = tok.padding_side
    tok.padding_side = "left"
    try:
        enc = tok(list(prompts), return_tensors="pt", padding=True).to(loaded.device)
    finally:
        tok.padding_side = side
    sample = temperature > 0
    kwargs = {"do_sample": sample, "max_new_tokens": max_new_tokens, "pad_token_id": tok.pad_token_id}
    if sample:
        kwargs.update(temperature=temperature, top_p=top_p)
    else:  # the model's generation_config may ask for sampling; greedy means greedy
        kwargs.update(temperature=None, top_p=None, top_k=None)
    device = loaded.device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if seed is not None:
            torch.manual_seed(seed)
        out = loaded.model.generate(**enc, **kwargs)
    return out[:, enc.input_ids.shape[1]:]


def generate(loaded: LoadedModel, prompts: list[str], max_new_tokens: int = 32, temperature: float = 0.0,
             top_p: float = 1.0, seed: int | None = None) -> list[str]:
    """Text continuations of `prompts` (see generate_ids)."""
    if not prompts:
        return []
    new = generate_ids(loaded, prompts, max_new_tokens, temperature, top_p, seed)
    return loaded.tokenizer.batch_decode(new, skip_special_tokens=True)
