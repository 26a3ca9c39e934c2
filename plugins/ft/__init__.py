"""FT-L baseline plugin."""

from editkit.hookspecs import hookimpl

from .config import FTConfig
from .editor import FTEditor

__all__ = ["FTConfig", "FTEditor"]


@hookimpl
def register_editors(register):
    register(FTEditor)
