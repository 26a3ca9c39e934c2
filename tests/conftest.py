"""Shared fixtures: tiny from-config models of every family, the real default model, ../shared."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import pytest

from editkit.testing import FAMILIES, save_tiny_model



@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-models")
    return {family: save_tiny_model(family, root / family) for family in FAMILIES}


@pytest.fixture(scope="session", params=FAMILIES)
def tiny_family(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def tiny_loaded(tiny_dirs):
    """Loaded tiny models by family (shared: tests must leave them as they found them)."""
    from editkit.model import load_model

    return {family: load_model(str(path), device="cpu") for family, path in tiny_dirs.items()}


@pytest.fixture(scope="session")
def default_model():
    """The real default model, loaded once per test run."""
    from editkit.errors import ModelLoadError
    from editkit.model import load_model

    try:
        return load_model(device="cpu")
    except ModelLoadError as exc:
        if os.environ.get("CI"):
            raise  # CI installs the model wheel; a missing model there is a failure, not a skip
        pytest.skip(f"default model unavailable: {exc}")


def shared_path(name: str) -> Path:
    """Shared data set `name` (editkit.data.SHARED_FILES), or a skip (a fail in CI, where the
    shared data must be present)."""
    from editkit.data import SHARED_FILES, shared_data_dir

    path = shared_data_dir().joinpath(*SHARED_FILES[name])
    if not path.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{path} is missing; CI must have ../shared beside the checkout (or EDITKIT_SHARED_DATA)")
        pytest.skip(f"{path} not found (no shared data on this machine)")
    return path


# ---- the HTTP service in process, over a tiny model -----------------------------------------
TOKEN = "s3cret"
# FT-L with few, large steps: an edit that goes through is quick and shows in greedy generation.
FAST_FT = {"steps": 2, "lr": 0.05, "norm_constraint": 10.0, "early_stop_loss": 0.0}


@contextmanager
def served(workspace: Path, loaded, **config):
    """(app, session): the service over a new ft workspace on `loaded`; closed afterwards,
    which leaves the shared model as it was."""
    from editkit.service import ServiceConfig, create_app
    from editkit.session import Session

    session = Session.open(workspace, loaded=loaded, method="ft", method_config=FAST_FT)
    try:
        yield create_app(session, ServiceConfig(**{"token": TOKEN, **config})), session
    finally:
        session.close()


def journal_rows(workspace: Path) -> list:
    """Everything the journal holds, read without touching it."""
    import sqlite3

    db = sqlite3.connect(f"{(workspace / 'journal.sqlite').resolve().as_uri()}?mode=ro", uri=True)
    try:
        return [db.execute(f"SELECT * FROM {t} ORDER BY 1").fetchall() for t in ("edits", "head", "checkpoints")]
    finally:
        db.close()
