"""UltraEdit (Gu et al., arXiv 2505.14679): training-, subject- and memory-free lifelong editing.
Per turn of edits, one forward/backward pass gives each edited module's inputs and output
gradients at the target positions; lifelong normalization (running statistics across turns)
and a closed-form ridge regression turn them into a weight shift. Options: StableEdit's
warm-up and full whitening (arXiv 2605.11836), AlphaEdit's null-space projection
(arXiv 2410.02355). See editor.py and docs/ultraedit.md."""

from editkit.hookspecs import hookimpl

from .config import UltraEditConfig
from .editor import UltraEditEditor

__all__ = ["UltraEditConfig", "UltraEditEditor"]


@hookimpl
def register_editors(register):
    register(UltraEditEditor)
