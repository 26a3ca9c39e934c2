"""Batched text generation with whatever edits are attached to the model."""

from __future__ import annotations

import torch

from editkit.model import LoadedModel


@torch.no_grad()
def generate_ids(loaded: LoadedModel, prompts: list[str], max_new_tokens: int = 32, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = None) -> torch.Tensor:
    """New token ids (B, max_new_tokens; padded after an early end) continuing `prompts`,
    greedy when temperature is 0 (see generate_from_ids)."""
    rows = [loaded.tokenizer(p).input_ids for p in prompts]
    return generate_from_ids(loaded, rows, max_new_tokens, temperature, top_p, seed)


@torch.no_grad()
def generate_from_ids(loaded: LoadedModel, rows: list[list[int]], max_new_tokens: int = 32,
                      temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None) -> torch.Tensor:
    """New token ids (B, max_new_tokens; padded after an early end) continuing each row of token
    ids. Left padding keeps every row's last token at the same position, which batched decoding
    needs; positions follow the attention mask."""
    tok = loaded.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row):] = 1
    device = loaded.device
    sample = temperature > 0
    kwargs = {"do_sample": sample, "max_new_tokens": max_new_tokens, "pad_token_id": tok.pad_token_id}
    if sample:
        kwargs.update(temperature=temperature, top_p=top_p)
    else:  # the model's generation_config may ask for sampling; greedy means greedy
        kwargs.update(temperature=None, top_p=None, top_k=None)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if seed is not None:
            torch.manual_seed(seed)
        out = loaded.model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
    return out[:, width:]


def generate(loaded: LoadedModel, prompts: list[str], max_new_tokens: int = 32, temperature: float = 0.0,
             top_p: float = 1.0, seed: int | None = None) -> list[str]:
    """Text continuations of `prompts` (see generate_ids)."""
    if not prompts:
        return []
    new = generate_ids(loaded, prompts, max_new_tokens, temperature, top_p, seed)
    return loaded.tokenizer.batch_decode(new, skip_special_tokens=True)
