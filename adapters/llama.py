"""LLaMA-like models (LLaMA, Mistral, Qwen2, SmolLM): separate q/k/v with grouped-query
attention, a gated MLP, RMSNorm."""

from .base import Adapter


class LlamaAdapter(Adapter):
    name = "llama"
    model_types = ("llama", "mistral", "qwen2", "qwen3", "smollm3")
    layers_path = "model.layers"
    embed_path = "model.embed_tokens"
    final_norm_path = "model.norm"
    unembed_path = "lm_head"
    block_paths = {
        "mlp": "mlp",
        "mlp.up": "mlp.up_proj",
        "mlp.gate": "mlp.gate_proj",
        "mlp.down": "mlp.down_proj",
        "attn": "self_attn",
        "attn.q": "self_attn.q_proj",
        "attn.k": "self_attn.k_proj",
        "attn.v": "self_attn.v_proj",
        "attn.out": "self_attn.o_proj",
    }
    rotary_path = "model.rotary_emb"
    qkv_layout = "separate"
    final_norm_centers = False  # RMSNorm
    final_norm_eps_attr = "variance_epsilon"
