"""Evaluation sweeps: suites x methods x config grids x seeds, each cell one `editkit eval` run
in its own folder, executed one after another here or as Ray tasks on a cluster.

A spec (YAML or JSON) names what to run::

    suites: [{name: zsre, data: ../shared/data/zsre/zsre-dev-500.json}]
    methods:
      ft: {steps: {grid: [20, 40]}}      # {grid: [...]} is an axis; any other value is fixed
      grace: {}
    seeds: [0, 1]
    edits: 100
    protocol: final                     # and at / every / group_size / sample / turn_size / select
    resources: {num_cpus: 1, num_gpus: 0}

Layout of OUT: sweep.json (the spec and its cells), cells/<cell>/ (an eval run folder, plus
attempts.jsonl: one line per attempt, with the process id), sweep.md / sweep.json's results
and compare-<suite>/ (the cells' overlaid plots). A cell whose report is complete is skipped
when the sweep runs again; one that was interrupted resumes from its journal; one that fails
is tried once more and then reported, without stopping the others. A cell runs with as many
torch threads as it declares CPUs, locally as on Ray, so both give the same figures.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from editkit.components import describe_validation_error
from editkit.errors import InvalidRequest, WorkspaceError
from editkit.store import atomic_write_text

from editkit.scoring import mean
from .rundir import PROTOCOLS, read_plan

SWEEP_FORMAT = 1


class SuiteSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="Suite name (zsre, counterfact, jsonl, builtin, or a plugin's).")
    data: str | None = Field(None, description="Data file of the suite, relative to the spec file's folder.")


class Resources(BaseModel):
    model_config = ConfigDict(extra="forbid")
    num_cpus: float = Field(1, gt=0, description="CPUs a cell holds (also its torch threads).")
    num_gpus: float = Field(0, ge=0, description="GPUs a cell holds (Ray places it on a GPU node).")


class SweepSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    suites: list[SuiteSpec] = Field(min_length=1)
    methods: dict[str, dict[str, Any]] = Field(min_length=1, description="Method -> config; {grid: [...]} values are axes.")
    seeds: list[int] = Field([0], min_length=1)
    edits: int = Field(100, ge=1)
    protocol: str = "final"
    every: int | None = Field(None, ge=1)
    group_size: int | None = Field(None, ge=1)
    at: list[int] | None = None
    sample: int | None = Field(None, ge=1)
    turn_size: int = Field(1, ge=1)
    select: Literal["first", "random"] = "first"
    model: str | None = None
    device: str = "cpu"
    dtype: str | None = None
    resources: Resources = Field(default_factory=Resources)


def read_spec(path: str | Path) -> SweepSpec:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidRequest(f"cannot read sweep spec {path}: {exc.strerror or exc}") from None
    try:
        import yaml

        raw = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
    except Exception as exc:  # yaml.YAMLError / ValueError: one line naming the file
        raise InvalidRequest(f"sweep spec {path} is not valid {'YAML' if path.suffix != '.json' else 'JSON'}: "
                             f"{str(exc).splitlines()[0]}") from None
    try:
        spec = SweepSpec.model_validate(raw)
    except ValidationError as exc:
        raise InvalidRequest(describe_validation_error(exc, f"sweep spec {path}")) from None
    if spec.protocol not in PROTOCOLS:
        raise InvalidRequest(f"sweep spec {path}: unknown protocol '{spec.protocol}'")
    for suite in spec.suites:  # data paths are relative to the spec file
        if suite.data is not None and not Path(suite.data).is_absolute():
            suite.data = str((path.parent / suite.data).resolve())
    return spec


def grid_points(config: dict[str, Any]) -> list[dict[str, Any]]:
    """Every combination of a config's {grid: [...]} axes (the fixed values in each)."""
    axes = {k: v["grid"] for k, v in config.items() if isinstance(v, dict) and set(v) == {"grid"}}
    for key, values in axes.items():
        if not isinstance(values, list) or not values:
            raise InvalidRequest(f"config grid '{key}' needs a non-empty list of values")
    fixed = {k: v for k, v in config.items() if k not in axes}
    return [{**fixed, **dict(zip(axes, combo))} for combo in itertools.product(*axes.values())] or [fixed]


def cells(spec: SweepSpec, host) -> list[dict[str, Any]]:
    """The sweep's cells, each validated (method and config) before any runs."""
    out = []
    for suite, (method, config), seed in itertools.product(spec.suites, spec.methods.items(), spec.seeds):
        editor = host.editor(method)
        host.suite(suite.name)
        for point in grid_points(config):
            resolved = editor.make_config(point).model_dump(mode="json")
            digest = hashlib.sha256(json.dumps([suite.name, suite.data, method, resolved],
                                               sort_keys=True).encode()).hexdigest()[:8]
            out.append({"id": f"{suite.name}-{method}-{digest}-seed{seed}", "suite": suite.name, "data": suite.data,
                        "method": method, "config": resolved, "grid": point, "seed": seed})
    return out


def run_args(spec: SweepSpec) -> dict[str, Any]:
    return {"edits": spec.edits, "protocol": spec.protocol, "every": spec.every, "group_size": spec.group_size,
            "at": spec.at, "sample": spec.sample, "turn_size": spec.turn_size, "select": spec.select,
            "model": spec.model, "device": spec.device, "dtype": spec.dtype}


def run_cell(cell: dict[str, Any], args: dict[str, Any], folder: str, threads: int) -> dict[str, Any]:
    """One cell: an evaluation run in `folder` (resuming what an earlier attempt journaled).
    A plain function of plain values, so a Ray worker runs it as the driver would."""
    import torch

    from .runner import run_eval

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "attempts.jsonl", "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"pid": os.getpid(), "started": time.time()}) + "\n")
    torch.set_num_threads(threads)
    report = run_eval(folder, suite=cell["suite"], data=cell["data"], methods=[cell["method"]],
                      configs={cell["method"]: cell["config"]}, seed=cell["seed"], plots=False, **args)
    method = report["methods"][cell["method"]]
    return {"id": cell["id"], "complete": method["complete"], "summary": method["summary"],
            "seconds_per_edit": method["seconds_per_edit"]}


def _done(folder: Path, method: str) -> bool:
    try:
        report = json.loads((folder / "report.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return bool(report.get("methods", {}).get(method, {}).get("complete"))


Progress = Callable[[str, str], None]  # (cell id, what happened)


class Sweep:
    def __init__(self, spec: SweepSpec, out: str | Path, host=None):
        from editkit.host import get_host

        self.spec, self.out, self.host = spec, Path(out), host or get_host()
        self.cells = cells(spec, self.host)
        self.args = run_args(spec)
        self.threads = max(1, int(spec.resources.num_cpus))

    def folder(self, cell: dict) -> Path:
        return self.out / "cells" / cell["id"]

    def _check_plan(self) -> None:
        plan = {"format": SWEEP_FORMAT, "spec": self.spec.model_dump(mode="json"), "cells": self.cells}
        path = self.out / "sweep-plan.json"
        old = read_plan(path)
        if old is not None and old != plan:
            raise WorkspaceError(f"{self.out} holds another sweep; use another --out, or the same spec to resume")
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(plan, indent=1, sort_keys=True))

    def run(self, ray_address: str | None = None, progress: Progress | None = None) -> dict[str, Any]:
        """Run every cell not yet complete (on Ray when `ray_address` is given: "local" starts a
        runtime here, "auto" or an address joins a cluster); returns the summary."""
        self._check_plan()
        note = progress or (lambda cell, what: None)
        pending = []
        for cell in self.cells:
            if _done(self.folder(cell), cell["method"]):
                note(cell["id"], "done before: skipped")
            else:
                pending.append(cell)
        failures = self._run_ray(pending, ray_address, note) if ray_address else self._run_local(pending, note)
        return self.summarise(failures)

    def _run_local(self, pending: list[dict], note: Progress) -> dict[str, str]:
        failures = {}
        for cell in pending:
            for attempt in (1, 2):
                note(cell["id"], f"running (attempt {attempt})")
                try:
                    run_cell(cell, self.args, str(self.folder(cell)), self.threads)
                    note(cell["id"], "complete")
                    break
                except Exception as exc:  # a cell's failure is reported, the sweep goes on
                    if attempt == 2:
                        failures[cell["id"]] = f"{type(exc).__name__}: {exc}"
                        note(cell["id"], f"failed: {exc}")
        return failures

    def _run_ray(self, pending: list[dict], address: str, note: Progress) -> dict[str, str]:
        try:
            import ray
        except ImportError:
            raise InvalidRequest('--ray needs Ray: pip install -e ".[ray]" (or run without --ray)') from None
        started_here = False
        if not ray.is_initialized():
            if address == "local":
                ray.init(include_dashboard=False, log_to_driver=False)
            else:
                ray.init(address=address, log_to_driver=False)
            started_here = True
        try:
            res = self.spec.resources
            task = ray.remote(run_cell).options(num_cpus=res.num_cpus, num_gpus=res.num_gpus, max_retries=1,
                                                retry_exceptions=True)
            refs = {task.remote(cell, self.args, str(self.folder(cell).resolve()), self.threads): cell
                    for cell in pending}
            for cell in pending:
                note(cell["id"], "submitted")
            failures = {}
            waiting = list(refs)
            while waiting:
                ready, waiting = ray.wait(waiting, num_returns=1)
                cell = refs[ready[0]]
                try:
                    ray.get(ready[0])
                    note(cell["id"], "complete")
                except Exception as exc:  # after its retry: reported, the others go on
                    failures[cell["id"]] = str(exc).strip().splitlines()[-1]
                    note(cell["id"], f"failed: {failures[cell['id']]}")
            return failures
        finally:
            if started_here:
                ray.shutdown()

    # ---- results -----------------------------------------------------------------------
    def summarise(self, failures: dict[str, str]) -> dict[str, Any]:
        rows = []
        for cell in self.cells:
            folder = self.folder(cell)
            row = {k: cell[k] for k in ("id", "suite", "method", "grid", "seed")}
            if _done(folder, cell["method"]):
                report = json.loads((folder / "report.json").read_text(encoding="utf-8"))
                m = report["methods"][cell["method"]]
                attempts = (folder / "attempts.jsonl").read_text(encoding="utf-8").splitlines() \
                    if (folder / "attempts.jsonl").exists() else []
                row.update(status="complete", summary=m["summary"], seconds_per_edit=m["seconds_per_edit"],
                           attempts=len(attempts))
            else:
                row.update(status="failed" if cell["id"] in failures else "incomplete",
                           error=failures.get(cell["id"]))
            rows.append(row)
        groups: dict[str, list[dict]] = {}
        for row in rows:
            if row["status"] == "complete":
                key = json.dumps([row["suite"], row["method"], row["grid"]], sort_keys=True)
                groups.setdefault(key, []).append(row)
        aggregated = []
        for key, members in groups.items():
            suite, method, grid = json.loads(key)
            summary = {}
            for metric in ("rel_tf", "rel_em", "gen_tf", "gen_em", "loc_tf", "loc_em"):
                values = [r["summary"].get(metric) for r in members if r["summary"].get(metric) is not None]
                if values:
                    mu = sum(values) / len(values)
                    sd = (sum((v - mu) ** 2 for v in values) / len(values)) ** 0.5
                    summary[metric] = {"mean": mu, "std": sd}
            aggregated.append({"suite": suite, "method": method, "grid": grid, "seeds": len(members),
                               "summary": summary, "seconds_per_edit": mean(r["seconds_per_edit"] for r in members)})
        result = {"format": SWEEP_FORMAT, "cells": rows, "aggregated": aggregated,
                  "failed": sorted(failures), "spec": self.spec.model_dump(mode="json")}
        atomic_write_text(self.out / "sweep.json", json.dumps(result, indent=1, sort_keys=True))
        atomic_write_text(self.out / "sweep.md", sweep_markdown(result))
        self._plots(rows)
        return result

    def _plots(self, rows: list[dict]) -> None:
        """The compare view of each suite's complete cells (overlaid plots, one table)."""
        from .compare import compare_runs, render_comparison

        by_suite: dict[str, list[Path]] = {}
        for row in rows:
            if row["status"] == "complete":
                by_suite.setdefault(row["suite"], []).append(self.out / "cells" / row["id"])
        for suite, folders in by_suite.items():
            if len(folders) > 1:
                render_comparison(compare_runs(folders, force=True), self.out / f"compare-{suite}")


def _fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, dict):
        return f"{value['mean']:.3f} ± {value['std']:.3f}"
    return f"{value:.3f}"


def sweep_markdown(result: dict) -> str:
    keys = ("rel_tf", "rel_em", "gen_tf", "gen_em", "loc_tf", "loc_em")
    head = "| suite | method | config | " + " | ".join(keys) + " | s/edit |"
    lines = ["# editkit sweep", "", f"{len(result['cells'])} cells; "
             f"{sum(r['status'] == 'complete' for r in result['cells'])} complete, {len(result['failed'])} failed.", "",
             "## Mean ± std over seeds", "", head.replace("| s/edit |", "| seeds | s/edit |"),
             "|" + "---|" * (len(keys) + 5)]
    for a in result["aggregated"]:
        lines.append(f"| {a['suite']} | {a['method']} | `{json.dumps(a['grid'], sort_keys=True)}` | "
                     + " | ".join(_fmt(a["summary"].get(k)) for k in keys)
                     + f" | {a['seeds']} | {_fmt(a['seconds_per_edit'])} |")
    lines += ["", "## Cells", "", "| cell | status | seed | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 3)]
    for r in result["cells"]:
        values = " | ".join(_fmt((r.get("summary") or {}).get(k)) for k in keys)
        status = r["status"] + (f" ({r['error']})" if r.get("error") else "")
        lines.append(f"| {r['id']} | {status} | {r['seed']} | {values} |")
    return "\n".join(lines) + "\n"
