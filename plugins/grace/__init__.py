"""GRACE baseline plugin (Hartvigsen et al., arXiv 2211.11031): a discrete key-value codebook
adaptor at one layer."""

from editkit.hookspecs import hookimpl

from .config import GraceConfig
from .editor import GraceEditor

__all__ = ["GraceConfig", "GraceEditor"]


@hookimpl
def register_editors(register):
    register(GraceEditor)
