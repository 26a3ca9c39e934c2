"""The `editkit` command line: thin commands over the library (see cli/main.py)."""

from .main import build_app, main

__all__ = ["build_app", "main"]
