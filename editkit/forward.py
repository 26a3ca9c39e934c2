"""What a model-level forward pre-hook can learn about the call it precedes."""

from __future__ import annotations

import torch


def call_context(args: tuple, kwargs: dict) -> tuple[torch.Tensor | None, int]:
    """(attention mask or None, number of tokens already in the KV cache) of a model call, for
    hooks that decide per sequence when it starts and keep the decision for its cached steps."""
    mask = kwargs.get("attention_mask")
    if mask is None and len(args) > 1 and torch.is_tensor(args[1]):
        mask = args[1]
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    past = 0
    if cache is not None and hasattr(cache, "get_seq_length"):
        past = int(cache.get_seq_length())  # a shape, not a device value: no synchronisation
    return mask, past
