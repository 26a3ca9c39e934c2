"""Sending an evaluation run's figures to experiment trackers (`editkit eval --log-to ...`):
Weights & Biases, MLflow, TensorBoard, each an optional extra (`pip install -e ".[tracking]"`).
Logged: the plan and every method's config as parameters; each method's figures at every
measurement point, with the number of edits as the step; the final summary; and the report,
per-edit CSV and plots as files. Where the tracker writes is its own setting (WANDB_MODE /
WANDB_PROJECT, MLFLOW_TRACKING_URI; MLflow's default here is a SQLite store and an artifact
folder inside the run folder)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from editkit.errors import InvalidRequest

TRACKERS = ("wandb", "mlflow", "tensorboard")
_PACKAGES = {"wandb": "wandb", "mlflow": "mlflow", "tensorboard": "tensorboard"}


def check_trackers(names: list[str]) -> None:
    """Refuse unknown or uninstalled trackers before any work is done."""
    import importlib.util

    for name in names:
        if name not in TRACKERS:
            raise InvalidRequest(f"--log-to '{name}': use one of {', '.join(TRACKERS)}")
        if importlib.util.find_spec(_PACKAGES[name]) is None:
            raise InvalidRequest(f"--log-to {name} needs the {_PACKAGES[name]} package: "
                                 f"pip install -e \".[tracking]\" (or pip install {_PACKAGES[name]})")


def params(report: dict) -> dict[str, Any]:
    keys = ("suite", "data", "protocol", "edits", "seed", "select", "every", "group_size", "at", "sample",
            "turn_size", "model", "fingerprint")
    out = {k: report.get(k) for k in keys if report.get(k) is not None}
    for method, m in report["methods"].items():
        for key, value in m["config"].items():
            out[f"{method}.{key}"] = value
    return out


def points(report: dict) -> dict[int, dict[str, float]]:
    """Number of edits -> {"<method>/<metric>": value} over every method's measurement points."""
    by_step: dict[int, dict[str, float]] = {}
    for method, m in report["methods"].items():
        for cp in m["checkpoints"]:
            row = by_step.setdefault(cp["step"], {})
            for key, value in cp["summary"].items():
                if value is not None:
                    row[f"{method}/{key}"] = float(value)
            if cp.get("seconds_per_edit") is not None:
                row[f"{method}/seconds_per_edit"] = float(cp["seconds_per_edit"])
    return dict(sorted(by_step.items()))


def summary(report: dict) -> dict[str, float]:
    return {f"{method}/final_{key}": float(value) for method, m in report["methods"].items()
            for key, value in m["summary"].items() if value is not None}


def files(out: Path) -> list[Path]:
    return [p for p in [out / "report.md", out / "per_edit.csv", *sorted(out.glob("*.png"))] if p.is_file()]


def log_report(report: dict, out: str | Path, trackers: list[str], name: str | None = None) -> None:
    out = Path(out)
    name = name or out.name
    for tracker in trackers:
        {"wandb": _wandb, "mlflow": _mlflow, "tensorboard": _tensorboard}[tracker](report, out, name)


def _wandb(report: dict, out: Path, name: str) -> None:
    import wandb

    run = wandb.init(project=os.environ.get("WANDB_PROJECT", "editkit"), name=name, dir=str(out),
                     config=params(report), reinit="finish_previous")
    try:
        for step, row in points(report).items():
            run.log({**row, "edits": step}, step=step)
        run.summary.update(summary(report))
        for path in files(out):
            run.save(str(path), base_path=str(out), policy="now")
    finally:
        run.finish()


def _mlflow(report: dict, out: Path, name: str) -> None:
    import mlflow

    own_store = not os.environ.get("MLFLOW_TRACKING_URI")
    if own_store:  # a SQLite store and an artifact folder inside the run folder
        mlflow.set_tracking_uri(f"sqlite:///{(out / 'mlflow.db').resolve()}")
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name("editkit")
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(
        "editkit", artifact_location=(out / "mlartifacts").resolve().as_uri() if own_store else None)
    with mlflow.start_run(experiment_id=experiment_id, run_name=name):
        mlflow.log_params({k: str(v)[:500] for k, v in params(report).items()})
        for step, row in points(report).items():
            mlflow.log_metrics({k.replace("/", ".") : v for k, v in row.items()}, step=step)
        mlflow.log_metrics({k.replace("/", "."): v for k, v in summary(report).items()})
        for path in files(out):
            mlflow.log_artifact(str(path))


def _tensorboard(report: dict, out: Path, name: str) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(out / "tensorboard" / name))
    try:
        for step, row in points(report).items():
            for key, value in row.items():
                writer.add_scalar(key, value, step)
        for key, value in summary(report).items():
            writer.add_scalar(key, value, report["edits"])
        if (out / "report.md").is_file():
            writer.add_text("report", (out / "report.md").read_text(encoding="utf-8"))
    finally:
        writer.close()
