from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class GraceConfig(BaseModel):
    """GRACE: General Retrieval Adaptors for Continual Editing (Hartvigsen et al. 2023)."""

    model_config = ConfigDict(extra="forbid")

    layer: int | float = Field(0.6, description="Layer of the codebook: index, negative index, or fraction of depth.")
    component: Literal["mlp.down", "block.out"] = Field(
        "mlp.down", description="Where the codebook sits: the MLP down-projection (key = its input, the MLP "
        "hidden activation; value replaces its output) or the whole block (key = the residual stream entering "
        "the block; value replaces the block's output).")
    epsilon: float = Field(
        0.25, gt=0, description="Initial deferral radius of a new key, as a fraction of that key's L2 norm "
        "(scale-free across models; the paper's epsilon_init in units of the key's size).")
    lr: float = Field(1.0, gt=0, description="Adam learning rate for a new value vector (the paper uses 1.0).")
    steps: int = Field(100, ge=1, le=10_000, description="Most optimisation steps per value.")
    early_stop_loss: float = Field(0.01, ge=0, description="Stop training a value once the target loss falls below this.")
    duplicate_fraction: float = Field(
        1e-3, ge=0, description="A new key closer than this fraction of its norm to an existing key counts as the "
        "same input: its entry is overwritten (the newest edit of a prompt wins) instead of split.")
    faiss_min_keys: int = Field(
        256, ge=1, description="Codebook size from which nearest-key search uses a faiss exact L2 index instead "
        "of torch distances.")
