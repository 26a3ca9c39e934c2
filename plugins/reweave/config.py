from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# Every field a reweaver's config had before query_layer and key_window existed: a complete
# config of those (what editkit wrote into workspaces and trained files) means what it meant
# then, whatever today's defaults of the new fields are.
FIELDS_BEFORE_QUERY_LAYER = frozenset({
    "capture_layers", "reweave_layer", "heads", "head_dim", "capacity", "keep_per_chunk", "scorer", "eviction",
    "value_from", "attention_scale", "gate_init", "seed", "chunk_tokens", "max_conversations"})


class ReweaveConfig(BaseModel):
    """Contextual memory reweaving (arXiv 2502.02046): capture latent states, reweave them later."""

    model_config = ConfigDict(extra="forbid")

    capture_layers: list[Union[int, float]] = Field(
        [0.25, 0.45, 0.65], min_length=1,
        description="Blocks whose output hidden states are captured into the memory: indices, negative "
        "indices or fractions of depth (0.5 = the middle block). Duplicates after resolution are merged.")
    reweave_layer: Union[int, float] = Field(
        0.9, description="Block after whose output the gated cross-attention onto the memory is added "
        "(index, negative index or fraction of depth). Training runs only the blocks above it with grad.")
    query_layer: Union[int, float, None] = Field(
        0.65, description="Block whose output forms the cross-attention's queries (at or below reweave_layer; "
        "index, negative index or fraction of depth); None: the reweave block's own output. Mid-depth states "
        "still say what the query is about; at the reweave block they mostly say what comes next.")
    heads: int = Field(8, ge=1, le=64, description="Attention heads of the reweaving cross-attention.")
    head_dim: int = Field(32, ge=4, le=256, description="Width of each reweaving head.")
    capacity: int = Field(128, ge=1, le=65536, description="Most latent states kept per capture layer "
                          "and conversation; the buffer never grows past capture layers x capacity.")
    keep_per_chunk: int = Field(64, ge=1, le=65536, description="Most states kept per capture layer from "
                                "one forward pass (the highest relevance scores).")
    scorer: Literal["norm", "learned"] = Field(
        "norm", description="Relevance score of a captured state: 'norm' (z-score of its L2 norm within the "
        "chunk) or 'learned' (a linear probe trained with the reweaver; its score is also added to the "
        "attention logit of the state, which is how it learns).")
    eviction: Literal["score", "fifo"] = Field(
        "score", description="When a layer's buffer is full: drop the lowest-scored state ('score') or the "
        "oldest ('fifo').")
    value_from: Literal["next", "next_token", "token", "self"] = Field(
        "next_token", description="What a stored state contributes when attended: 'next' stores [the token's state | "
        "the next token's state] and reads the latter (recall of what followed a matching context, as an "
        "induction head does; twice the memory); 'next_token' stores [the token's state | the next token's "
        "input embedding] (the token itself is copied, as an induction head's copying half does); 'token' "
        "[the token's state | its own input embedding] (the state knows what the token is bound to; the "
        "token is copied); 'self' the token's own state.")
    key_window: int = Field(1, ge=1, le=16, description="A stored entry keeps its token's state and the "
                            "key_window - 1 states before it in the same pass; its key is a learned projection of "
                            "all of them, so a key can name the phrase the token ends ('the code for the red "
                            "locker is'), not the token alone (memory grows by a state per extra token).")
    attention_scale: float = Field(
        4.0, gt=0.0, le=100.0, description="Initial multiplier of the attention logits (learned): above 1 the "
        "attention starts sharper than standard scaled dot-product, so a matching context stands out early.")
    gate_init: float = Field(0.1, ge=-4.0, le=4.0, description="Initial gate parameter g; the contribution is "
                             "tanh(g) * out_proj(attention); out_proj starts at zero, so the plugin is the "
                             "identity until trained whatever g is (g must be non-zero for out_proj to learn).")
    seed: int = Field(0, description="Seed of the reweaver's random initialisation (with train()'s own seed for "
                      "batch order, a run is reproducible on the same machine and thread count).")
    chunk_tokens: int = Field(0, ge=0, le=65536, description="Within a conversation, an input longer than this "
                              "many tokens is read chunk by chunk (each earlier chunk one forward pass whose states "
                              "enter the memory; generation continues from the last chunk), so one long input gets "
                              "the memory without the client cutting it into calls; 0 = read whole.")
    max_conversations: int = Field(64, ge=1, le=100000, description="Most conversation buffers held at once; "
                                   "the least recently used is dropped beyond this.")

    @model_validator(mode="before")
    @classmethod
    def _written_before_query_layer(cls, data):
        if isinstance(data, dict) and FIELDS_BEFORE_QUERY_LAYER <= set(data) and \
                not {"query_layer", "key_window"} & set(data):
            data = {**data, "query_layer": None, "key_window": 1}
        return data

    @field_validator("gate_init")
    @classmethod
    def _nonzero_gate(cls, value: float) -> float:
        if value == 0.0:
            raise ValueError("must be non-zero (with a zero gate and a zero output projection nothing can learn)")
        return value
