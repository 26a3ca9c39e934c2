"""Sites: places in a model named the same way for every architecture.

Only adapters turn a Site into a module (see adapters/base.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from editkit.errors import InvalidRequest

# Components every adapter resolves. Per-layer ones need a layer; the rest are model-wide.
LAYER_COMPONENTS = (
    "block",  # the whole decoder block; its output is the residual stream after the layer
    "block.out",  # alias of "block", used when hooking the block's output
    "mlp",
    "mlp.up",  # first MLP projection (fc_in / up_proj)
    "mlp.gate",  # gate projection of gated MLPs (LLaMA-like only)
    "mlp.down",  # last MLP projection (fc_out / down_proj): the usual edit target
    "attn",
    "attn.qkv",  # fused QKV projection (GPT-2, GPT-NeoX)
    "attn.q",  # separate query / key / value projections (LLaMA-like)
    "attn.k",
    "attn.v",
    "attn.out",  # attention output projection; its input is the concatenated heads
    "attn.heads",  # same module as attn.out; per-head slices of its input via head_slice()
)
MODEL_COMPONENTS = ("embed", "final_norm", "unembed")


@dataclass(frozen=True)
class Site:
    """A (layer, component) address. `layer` may be an index, a negative index, or a
    fraction of depth in [0, 1] given as a float (0.85 -> the layer at 85% of depth)."""

    component: str
    layer: int | float | None = None

    def __post_init__(self):
        if self.component in LAYER_COMPONENTS:
            if self.layer is None or isinstance(self.layer, bool):
                raise InvalidRequest(f"site component '{self.component}' needs a layer")
            if isinstance(self.layer, float) and not 0.0 <= self.layer <= 1.0:
                raise InvalidRequest(f"fractional layer must lie in [0, 1], got {self.layer}")
        elif self.component in MODEL_COMPONENTS:
            if self.layer is not None:
                raise InvalidRequest(f"site component '{self.component}' takes no layer")
        else:
            known = ", ".join(LAYER_COMPONENTS + MODEL_COMPONENTS)
            raise InvalidRequest(f"unknown site component '{self.component}' (known: {known})")

    @classmethod
    def parse(cls, text: str) -> "Site":
        """'mlp.down@25', 'mlp.down@-5', 'mlp.down@0.85', 'final_norm'."""
        component, _, layer = text.partition("@")
        if not layer:
            return cls(component)
        try:
            value: int | float = float(layer) if "." in layer else int(layer)
        except ValueError:
            raise InvalidRequest(f"bad layer '{layer}' in site '{text}'") from None
        return cls(component, value)

    def __str__(self) -> str:
        return self.component if self.layer is None else f"{self.component}@{self.layer}"
