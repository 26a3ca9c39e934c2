"""Helpers around a model's forward pass: what a model-level forward pre-hook can learn about
the call it precedes, and the states the vocabulary projection would receive."""

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


class _Stop(Exception):
    """Ends a forward pass at the vocabulary projection (see unembed_inputs)."""


def unembed_inputs(loaded, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T, H) states the vocabulary projection receives in a forward pass of the model with
    every attached component in force, without projecting every position: the pass stops
    there. Project the positions you need with `loaded.adapter.unembed`. Runs under whatever
    grad mode the caller is in (a graph back to the model's activations where it records one)."""
    from editkit.sites import Site

    seen: list[torch.Tensor] = []

    def stop(module, args):
        seen.append(args[0])
        raise _Stop

    handle = loaded.adapter.module(Site("unembed")).register_forward_pre_hook(stop)
    try:
        loaded.model(input_ids=input_ids, attention_mask=attention_mask)
    except _Stop:
        pass
    finally:
        handle.remove()
    return seen[0]
