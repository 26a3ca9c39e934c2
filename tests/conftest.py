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


@pytest.fixture(scope="session")
def trained_reweave(default_model) -> dict:
    """A reweaver trained once per run on the default model (the benchmark's recipe at half
    the episodes: 2-digit passkeys one chunk back), with its held-out episodes and the frozen
    and woven recall on them. Shared by the recall test and the composition test."""
    import time

    from editkit.plugins.reweave import evaluate, passkeys, prepare, reweaving, train

    started = time.perf_counter()
    items = passkeys(288, seed=0, digits=2, distractors=0)
    with reweaving(default_model) as rw:
        stats = train(rw, prepare(rw, items[:256]), steps=400, lr=3e-3, batch_size=16)
        base = evaluate(rw, items[256:], use_memory=False)
        woven = evaluate(rw, items[256:], use_memory=True)
        state = rw.state_dict()
        config = rw.config.model_dump(mode="json")
    return {"config": config, "state": state, "held_out": items[256:], "stats": stats, "base": base,
            "woven": woven, "seconds": time.perf_counter() - started}


@pytest.fixture(scope="session")
def located_ph3(default_model) -> dict:
    """PH3 head scores located once per run on known-fact conflict items of the default model
    (120 items, splits 48 / 36 / 36), with the unpruned validation rates."""
    from editkit.plugins.ph3 import build_items, evaluate_rates, locate_heads, split_items

    shared_path("known")
    items = build_items(default_model, "known", limit=120, seed=0)
    parts = split_items(items, seed=0)
    return {"parts": parts, "scores": locate_heads(default_model, parts["locate"]),
            "base_validation": evaluate_rates(default_model, parts["validation"])}


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


def benchmark_module(name: str):
    """benchmarks/<name>.py loaded as a module (the benchmarks are scripts, not a package)."""
    import importlib.util

    path = Path(__file__).parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
