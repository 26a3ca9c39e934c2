from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class NMCConfig(BaseModel):
    """Neural memory controller with synthetic gradients (arXiv 2011.05438; Jaderberg et al. 2017)."""

    model_config = ConfigDict(extra="forbid")

    # the memory and how it is read
    layer: int | float = Field(0.7, description="Block whose output the memory writes into (index, negative index or fraction of depth).")
    key_layer: int | float = Field(0.15, description="Block whose output addresses the memory: a token's standardised state there is matched against the slots' subject keys, the running mean of them against the slots' prompt keys. Early blocks tell entities apart; late ones mostly see the format (docs/nmc.md).")
    slots: int = Field(4096, ge=1, le=1_000_000, description="Memory capacity; when full, the least used slot is freed for a new edit.")
    threshold: float = Field(0.9, gt=0, lt=1, description="Deferral threshold: a slot is read once a token's cosine similarity with its subject key reaches this; below it the model runs unchanged (0.9: chosen on CounterFact training edits, where neighbourhood prompts reading a slot fell from 0.036 at 0.6 to 0.005; docs/nmc.md).")
    gate_width: float = Field(0.05, gt=0, le=2, description="The read gate rises linearly from 0 at the threshold to 1 at threshold + gate_width.")
    match_threshold: float = Field(0.9, gt=0, le=1, description="Controller: an edit whose subject key is at least this similar to a slot's, and whose prompt key at least match_context, is the same fact again: it rewrites that slot instead of taking a new one.")
    match_context: float = Field(0.8, ge=-1, le=1, description="Controller: the prompt-key similarity (cosine of running means) that, with a subject match, makes an edit the same fact as a slot's.")
    controller: Literal["rule", "learned"] = Field("rule", description="Who decides where an edit is written: 'rule', the hand-written rule (same fact again -> its slot, else a free slot, else the least used), or 'learned', the network in controller_file (docs/nmc.md compares them).")
    controller_file: str | None = Field(None, description="Safetensors file of a learned controller (`editkit nmc train-controller`); required with controller=learned.")
    usage_decay: float = Field(0.99, gt=0, le=1, description="Controller: every edit multiplies all usage counts by this before the written slot gains 1, so the least used slot is the least recently and least often written.")

    # the edit loss and when an edit counts as absorbed
    margin: float = Field(1.0, ge=0, description="An edit is absorbed when every target token is the greedy choice by at least this many logits (teacher forced).")

    # fast path: synthetic gradients
    feedback: str | None = Field(None, description="Safetensors file of a pretrained synthetic-gradient module (`editkit nmc pretrain`); None starts untrained and learns online from slow steps.")
    feedback_hidden: int = Field(256, ge=8, le=8192, description="Hidden width of the synthetic-gradient module.")
    fast_steps: int = Field(1, ge=0, le=16, description="Synthetic-gradient steps per edit, each with a line search over step sizes in one batched forward of the blocks above (no backpropagation).")
    step_sizes: list[float] = Field(default_factory=lambda: [0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5],
                                    description="Line-search step norms of a fast step, as fractions of the norm of the hidden state at the written position.")
    feedback_lr: float = Field(0.01, ge=0, description="SGD learning rate with which every true gradient of the slow path trains the synthetic-gradient module (0 = frozen).")

    # slow path: true gradients
    slow_steps: int = Field(40, ge=0, le=10_000, description="Most true-gradient steps (through the frozen blocks above) when the fast path misses the margin.")
    slow_lr: float = Field(0.05, gt=0, description="Adam learning rate of the slow path, in units of the typical per-coordinate size of the hidden state at the written layer.")

    @model_validator(mode="after")
    def _check(self) -> "NMCConfig":
        if not self.step_sizes or any(s <= 0 for s in self.step_sizes):
            raise ValueError("step_sizes needs at least one positive value")
        if self.controller == "learned" and not self.controller_file:
            raise ValueError("controller=learned needs controller_file (train one with `editkit nmc train-controller`)")
        if self.match_threshold < self.threshold:
            raise ValueError("match_threshold must not be below threshold")
        return self
