"""faiss, where it is installed: `pip install -e ".[faiss]"` (CPU) or `".[gpu]"` (faiss-gpu in
its place). Without it, methods search exactly with torch: the same answers, slower for
very large codebooks."""

from __future__ import annotations

import importlib
from types import ModuleType


def faiss() -> ModuleType | None:
    """The faiss module, or None when neither faiss-cpu nor faiss-gpu is installed."""
    try:
        return importlib.import_module("faiss")
    except ImportError:
        return None
