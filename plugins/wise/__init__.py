"""WISE lifelong editing plugin (Wang et al. 2024, arXiv 2405.14768): a routed side memory."""

from editkit.hookspecs import hookimpl

from .config import WISEConfig
from .editor import WISEEditor

__all__ = ["WISEConfig", "WISEEditor"]


@hookimpl
def register_editors(register):
    register(WISEEditor)
