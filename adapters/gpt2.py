"""GPT-2: Conv1D linears store W^T (in, out); one fused [q | k | v] projection."""

from .base import Adapter


class GPT2Adapter(Adapter):
    name = "gpt2"
    model_types = ("gpt2",)
    layers_path = "transformer.h"
    embed_path = "transformer.wte"
    final_norm_path = "transformer.ln_f"
    unembed_path = "lm_head"
    block_paths = {
        "mlp": "mlp",
        "mlp.up": "mlp.c_fc",
        "mlp.down": "mlp.c_proj",
        "attn": "attn",
        "attn.qkv": "attn.c_attn",
        "attn.out": "attn.c_proj",
    }
    transposed_weights = True
    qkv_layout = "fused"
