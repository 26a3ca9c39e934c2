"""Where the shared evaluation data lives (zsRE, CounterFact, known facts; never shipped
with editkit): the directory named by $EDITKIT_SHARED_DATA, else ../shared/data beside a
source checkout. An installed editkit has no checkout around it: set the variable. The
files are read through the suites (`editkit.host.get_host().suite(name)`), one loader per
format."""

from __future__ import annotations

import os
from pathlib import Path

from editkit.errors import InvalidRequest

ENV = "EDITKIT_SHARED_DATA"
SHARED_FILES = {
    "zsre": ("zsre", "zsre-dev-500.json"),
    "counterfact": ("counterfact", "counterfact-dev-1k.json"),
    "counterfact-train": ("counterfact", "counterfact-train-10k.json"),
    "known": ("known", "known_1000.json"),
}


def shared_data_dir() -> Path:
    env = os.environ.get(ENV)
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared_file(name: str) -> Path:
    """The path of shared data set `name` (see SHARED_FILES); a clear error where it is absent."""
    if name not in SHARED_FILES:
        raise InvalidRequest(f"unknown shared data set '{name}' (known: {', '.join(SHARED_FILES)})")
    path = shared_data_dir().joinpath(*SHARED_FILES[name])
    if not path.is_file():
        raise InvalidRequest(f"{path} not found: shared data lives in ../shared/data beside a source checkout, "
                             f"or where ${ENV} points")
    return path
