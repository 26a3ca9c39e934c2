from pydantic import BaseModel, ConfigDict, Field


class FTConfig(BaseModel):
    """Constrained fine-tuning (FT-L, Zhu et al. 2020; as in ROME's and EasyEdit's baselines)."""

    model_config = ConfigDict(extra="forbid")

    layer: int | float = Field(0.5, description="Layer of the MLP down-projection to tune: index, negative index, or fraction of depth.")
    lr: float = Field(5e-3, gt=0, description="Adam learning rate.")
    steps: int = Field(60, ge=1, le=10_000, description="Most optimisation steps per edit.")
    norm_constraint: float = Field(1e-2, gt=0, description="Bound on every entry of the total weight change (L-infinity).")
    early_stop_loss: float = Field(0.02, ge=0, description="Stop once the target loss falls below this.")
