"""Adapters on tiny from-config models of every family: sites resolve, weights are seen
in (out, in) orientation, and per-head slices add up to the attention output."""

import pytest
import torch
from torch import nn

from editkit.errors import UnsupportedArchitecture
from editkit.host import get_host
from editkit.sites import LAYER_COMPONENTS, MODEL_COMPONENTS, Site


def _tokens(loaded):
    return loaded.tokenizer("The capital of France is Paris", return_tensors="pt").input_ids


def test_every_site_resolves(tiny_loaded, tiny_family):
    loaded = tiny_loaded[tiny_family]
    adapter = loaded.adapter
    expected_absent = {"gpt2": {"mlp.gate", "attn.q", "attn.k", "attn.v"},
                       "llama": {"attn.qkv"},
                       "gpt_neox": {"mlp.gate", "attn.q", "attn.k", "attn.v"}}[tiny_family]
    for layer in (0, -1, 0.5, 1.0):
        for component in LAYER_COMPONENTS:
            site = Site(component, layer)
            if component in expected_absent:
                with pytest.raises(ValueError, match="has no component"):
                    adapter.module(site)
            else:
                assert isinstance(adapter.module(site), nn.Module)
    for component in MODEL_COMPONENTS:
        assert isinstance(adapter.module(Site(component)), nn.Module)
    assert adapter.module(Site("block", -1)) is adapter.blocks()[adapter.num_layers - 1]


def test_layer_indexing(tiny_loaded):
    adapter = tiny_loaded["llama"].adapter  # 4 layers
    assert [adapter.layer_index(x) for x in (0, 3, -1, -4, 0.0, 0.5, 1.0)] == [0, 3, 3, 0, 0, 2, 3]
    for bad in (4, -5):
        with pytest.raises(ValueError, match="out of range"):
            adapter.layer_index(bad)


def test_site_parsing_and_validation():
    assert Site.parse("mlp.down@25") == Site("mlp.down", 25)
    assert Site.parse("mlp.down@-5") == Site("mlp.down", -5)
    assert Site.parse("mlp.down@0.85") == Site("mlp.down", 0.85)
    assert Site.parse("final_norm") == Site("final_norm")
    with pytest.raises(ValueError, match="unknown site component"):
        Site("mlp.sideways", 1)
    with pytest.raises(ValueError, match="needs a layer"):
        Site("mlp.down")
    with pytest.raises(ValueError, match="takes no layer"):
        Site("final_norm", 2)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        Site("mlp.down", 1.5)


@torch.no_grad()
def test_weight_orientation_matches_module_output(tiny_loaded, tiny_family):
    """weight(site) is (out, in) for every family (GPT-2's Conv1D stores the transpose)."""
    loaded = tiny_loaded[tiny_family]
    adapter = loaded.adapter
    for component in ("mlp.up", "mlp.down", "attn.out"):
        site = Site(component, 1)
        module = adapter.module(site)
        in_f, out_f = adapter.linear_features(site)
        x = torch.randn(3, in_f)
        bias = getattr(module, "bias", None)
        expected = x @ adapter.weight(site).T + (0 if bias is None else bias)
        torch.testing.assert_close(module(x), expected)


@torch.no_grad()
def test_head_contributions_sum_to_attention_output(tiny_loaded, tiny_family):
    loaded = tiny_loaded[tiny_family]
    adapter = loaded.adapter
    site = Site("attn.heads", 2)
    module = adapter.module(site)
    seen = {}
    handle = module.register_forward_hook(lambda m, i, o: seen.update(x=i[0], y=o))
    try:
        loaded.model(_tokens(loaded))
    finally:
        handle.remove()
    weight = adapter.weight(site)
    total = sum(seen["x"][..., adapter.head_slice(h)] @ weight[:, adapter.head_slice(h)].T
                for h in range(adapter.num_heads))
    if getattr(module, "bias", None) is not None:
        total = total + module.bias
    torch.testing.assert_close(total, seen["y"], rtol=1e-5, atol=1e-5)
    assert adapter.num_heads * adapter.head_dim == weight.shape[1]


def test_qkv_head_slices_cover_the_projection(tiny_loaded, tiny_family):
    """Every head's q slice is distinct; k/v slices are shared exactly as the KV heads say."""
    adapter = tiny_loaded[tiny_family].adapter
    slices = [adapter.qkv_slices(1, h) for h in range(adapter.num_heads)]
    q = {(s["q"][1].start, s["q"][1].stop) for s in slices}
    k = {(s["k"][1].start, s["k"][1].stop) for s in slices}
    assert len(q) == adapter.num_heads
    assert len(k) == adapter.num_kv_heads
    for s in slices:
        for module, part in s.values():
            width = module.weight.shape[0] if not adapter.transposed_weights else module.weight.shape[1]
            assert 0 <= part.start < part.stop <= width
            assert part.stop - part.start == adapter.head_dim


@torch.no_grad()
def test_interleaved_neox_slices_pick_the_query(tiny_loaded):
    """For GPT-NeoX, slicing the fused projection output per head reproduces the layer's own split."""
    adapter = tiny_loaded["gpt_neox"].adapter
    module, q_slice = adapter.qkv_slices(0, 1)["q"]
    x = torch.randn(2, adapter.hidden_size)
    fused = module(x)
    per_head = fused.view(2, adapter.num_heads, 3 * adapter.head_dim)
    torch.testing.assert_close(fused[:, q_slice], per_head[:, 1, : adapter.head_dim])


def test_unsupported_architecture_is_named():
    from transformers import BloomConfig, BloomForCausalLM

    model = BloomForCausalLM(BloomConfig(n_layer=1, hidden_size=32, n_head=2, vocab_size=50))
    with pytest.raises(UnsupportedArchitecture) as err:
        get_host().adapter_for(model)
    message = str(err.value)
    assert "bloom" in message and "llama" in message and "gpt2" in message and "gpt_neox" in message
