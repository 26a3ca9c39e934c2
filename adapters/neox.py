"""GPT-NeoX (Pythia): one QKV projection interleaved per head ([q_h | k_h | v_h] for each
head h), parallel attention and MLP."""

from .base import Adapter


class GPTNeoXAdapter(Adapter):
    name = "gpt_neox"
    model_types = ("gpt_neox",)
    layers_path = "gpt_neox.layers"
    embed_path = "gpt_neox.embed_in"
    final_norm_path = "gpt_neox.final_layer_norm"
    unembed_path = "lm_head"
    block_paths = {
        "mlp": "mlp",
        "mlp.up": "mlp.dense_h_to_4h",
        "mlp.down": "mlp.dense_4h_to_h",
        "attn": "attention",
        "attn.qkv": "attention.query_key_value",
        "attn.out": "attention.dense",
    }
    rotary_path = "gpt_neox.rotary_emb"
    qkv_layout = "interleaved"
