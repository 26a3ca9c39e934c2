"""Lifelong evaluation runs: one suite, one or more methods, one protocol.

Protocols (when figures are taken):

- ``final``: apply the T edits in order, then measure every edit (the papers' tables). With
  ``at`` (e.g. 1,10,100,1000) it also measures after each of those numbers of edits: the
  first T edits of the stream are exactly a T-edit run, so one stream gives every T.
- ``immediate``: measure each edit right after it is applied.
- ``retention``: every k edits (and after the last), re-measure every edit made so far,
  with its locality probes; gives retention curves.
- ``groups``: apply the stream in groups of G edits, each group in a fresh workspace (the
  exact and cheapest rollback: nothing to replay), measure the group's edits after its last
  one, and average over the stream.

Layout of OUT (everything needed to resume and to re-render the report)::

    run.json                     the plan: suite, data, protocol, seed, the selected cases
    baseline.json                the unedited model on every measured case (pre-edit predictions)
    methods/<name>/workspace/    the session workspace (journal + state); groups/gNNNN/ for groups
    methods/<name>/measurements.jsonl   one line per measurement point
    report.json, report.md, *.png       written by evaluation.report

Cost at scale: the unedited model is measured once per record that a measurement point
reads (baseline.json); ``sample`` limits every measurement point to a fixed random sample of
the edits made so far, so a long stream's measurements, the unedited one included, cost the
sample, not the stream. ``turn_size`` hands edits
to the session in calls of that many (one turn for editors that edit in turns), cut at
measurement points.

Resuming: a rerun with the same arguments opens each method's workspace, checks that its
journaled edits are the planned ones, skips them, and continues; measurement points already
written are not taken again.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from editkit.errors import InvalidRequest, WorkspaceError
from editkit.host import PluginHost, get_host
from editkit.model import DEFAULT_ALIASES, DEFAULT_MODEL, LoadedModel, load_model
from editkit.store import atomic_write_text

from editkit.scoring import ItemBaseline, item_baseline, measure_item
from .report import build_report, render_report
from .rundir import PLAN_DEFAULTS, PROTOCOLS, RUN_FORMAT, append_jsonl, read_jsonl, read_plan
from .suites import EditCase

# A progress callback: (method, edits done, edits in total, what just happened).
Progress = Callable[[str, int, int, str], None]


def parse_method_configs(items: list[str] | None, methods: list[str],
                         base: dict[str, dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """`method.key=value` items -> {method: {key: value}}, over `base` (e.g. a config file's);
    value read as JSON where it parses."""
    base = base or {}
    stray = sorted(set(base) - set(methods))
    if stray:
        raise InvalidRequest(f"configs are given for {', '.join(stray)}, which is not among the methods "
                             f"({', '.join(methods)})")
    configs: dict[str, dict[str, Any]] = {m: dict(base.get(m, {})) for m in methods}
    for item in items or []:
        left, sep, raw = item.partition("=")
        method, dot, key = left.strip().partition(".")
        if not sep or not dot or not key:
            raise InvalidRequest(f"--config expects METHOD.KEY=VALUE, got '{item}'")
        if method not in configs:
            raise InvalidRequest(f"--config '{item}' names method '{method}', which is not among --method "
                                 f"({', '.join(methods)})")
        try:
            configs[method][key] = json.loads(raw)
        except ValueError:
            configs[method][key] = raw
    return configs


def _model_key(name: str | None) -> str:
    if name is None or name in DEFAULT_ALIASES:
        return DEFAULT_MODEL
    return str(Path(name).resolve()) if Path(name).is_dir() else name


def select_cases(cases: list[EditCase], edits: int, seed: int, select: str) -> list[EditCase]:
    if select == "first":
        return cases[:edits]
    if select == "random":
        chosen = random.Random(seed).sample(range(len(cases)), min(edits, len(cases)))
        return [cases[i] for i in chosen]
    raise InvalidRequest(f"unknown selection '{select}' (use first or random)")


class EvalRun:
    """One evaluation run in directory `out`. Use run_eval() for the whole thing."""

    def __init__(self, out: str | Path, *, suite: str, data: str | None, edits: int = 100,
                 protocol: str = "final", every: int | None = None, group_size: int | None = None,
                 seed: int = 0, select: str = "first", skip_invalid: bool = False, model: str | None = None,
                 at: list[int] | None = None, sample: int | None = None, turn_size: int = 1,
                 host: PluginHost | None = None):
        if protocol not in PROTOCOLS:
            raise InvalidRequest(f"unknown protocol '{protocol}' (use one of {', '.join(PROTOCOLS)})")
        if edits < 1:
            raise InvalidRequest("--edits must be at least 1")
        self.out = Path(out)
        self.host = host or get_host()
        suite_obj = self.host.suite(suite)()
        read = suite_obj.read(data if data is None else str(data), None if select == "random" else edits,
                              skip_invalid)
        cases = select_cases(read.cases, edits, seed, select)
        if not cases:
            raise InvalidRequest(f"suite '{suite}' gave no valid edit cases from {data}")
        n = len(cases)
        if protocol == "retention":
            every = every or max(1, n // 10)
        if protocol == "groups":
            group_size = group_size or min(n, 10)
        if (every is not None and every < 1) or (group_size is not None and group_size < 1):
            raise InvalidRequest("--every and --group-size must be at least 1")
        if at is not None:
            if protocol != "final":
                raise InvalidRequest("--at measures a final-protocol stream at several lengths; use it with "
                                     "--protocol final")
            if not at or any(t < 1 for t in at):
                raise InvalidRequest("--at takes numbers of edits of at least 1")
            if max(at) > n:
                raise InvalidRequest(f"--at {max(at)} is beyond the stream's {n} edits (raise --edits)")
            at = sorted(set(at) | {n})
        if sample is not None and sample < 1:
            raise InvalidRequest("--sample must be at least 1")
        if turn_size < 1:
            raise InvalidRequest("--turn-size must be at least 1")
        if protocol == "groups" and sample is not None:
            raise InvalidRequest("--sample applies to stream protocols (final, immediate, retention), not groups")
        self.cases = cases
        self.skipped = read.skipped
        self.plan = {
            "format": RUN_FORMAT, "suite": suite, "data": None if data is None else str(data),
            "protocol": protocol, "edits": n, "edits_requested": edits,
            "every": every if protocol == "retention" else None,
            "group_size": group_size if protocol == "groups" else None, "seed": seed, "select": select,
            "at": at, "turn_size": turn_size, "sample": sample,
            "sampled": sorted(random.Random(seed).sample(range(n), sample)) if sample and sample < n else None,
            "model": _model_key(model), "skip_invalid": skip_invalid, "records_read": read.total,
            "skipped": [{"index": i, "reason": r} for i, r in read.skipped],
            "cases": [c.to_dict() for c in cases], "methods": {},
        }
        self.model = model

    # ---- plan and resumption ------------------------------------------------------------
    def _check_plan(self, methods: dict[str, dict]) -> None:
        path = self.out / "run.json"
        old = read_plan(path)
        if old is not None:
            for key in ("format", "suite", "protocol", "edits", "every", "group_size", "seed", "select",
                        "model", "cases", "at", "turn_size", "sample"):
                if old.get(key, PLAN_DEFAULTS.get(key)) != self.plan.get(key):
                    raise WorkspaceError(f"{self.out} holds a different run ({key} differs: {old.get(key)!r:.80} "
                                         f"there); use another --out, or the same arguments to resume")
            for name, cfg in methods.items():
                if name in old["methods"] and old["methods"][name] != cfg:
                    raise WorkspaceError(f"{self.out} ran method '{name}' with config {old['methods'][name]}, "
                                         f"not {cfg}; use another --out")
            self.plan["methods"] = old["methods"]
        self.plan["methods"].update(methods)
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(self.plan, indent=1, sort_keys=True))

    def _baselines(self, loaded: LoadedModel) -> list[ItemBaseline | None]:
        """The unedited model on each record some measurement reads (None for the others:
        with --sample, a 1,000-edit stream measured on 100 records measures 100 unedited)."""
        needed = self._measured()
        path = self.out / "baseline.json"
        items: list[dict | None] = [None] * len(self.cases)
        if path.exists():
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("fingerprint") == loaded.fingerprint and len(data.get("items", [])) == len(self.cases):
                items = data["items"]
        missing = [i for i in needed if items[i] is None]
        for i in missing:
            case = self.cases[i]
            base = item_baseline(loaded, case.request)
            items[i] = {"baseline": base.to_dict(),
                        "metrics": measure_item(loaded, case.request, base, list(case.portability))}
        if missing:
            atomic_write_text(path, json.dumps({"fingerprint": loaded.fingerprint, "items": items}, sort_keys=True))
        return [None if item is None else ItemBaseline.from_dict(item["baseline"]) for item in items]

    def _measured(self) -> list[int]:
        """Indices of the records that some measurement point reads."""
        if self.plan["protocol"] == "groups":
            return list(range(len(self.cases)))
        return sorted(set().union(*self._points().values()))

    # ---- running ------------------------------------------------------------------------
    def describe(self, methods: list[str], configs: dict[str, dict] | None = None) -> dict[str, Any]:
        """What run() would do (for --dry-run): the plan, each method's resolved config, the
        measurement points, and whether the folder holds a run to resume. Writes nothing."""
        resolved = {m: self.host.editor(m).make_config((configs or {}).get(m)).model_dump(mode="json")
                    for m in methods}
        plan = {k: v for k, v in self.plan.items() if k not in ("cases", "methods")}
        return {**plan, "methods": resolved, "first_cases": [c.to_dict()["request"] for c in self.cases[:3]],
                "points": list(self._points()) if self.plan["protocol"] != "groups" else None,
                "resume": (self.out / "run.json").exists()}

    def run(self, methods: list[str], configs: dict[str, dict] | None = None, loaded: LoadedModel | None = None,
            device: str = "auto", dtype: str | None = None, progress: Progress | None = None,
            device_map: str | None = None) -> Path:
        if not methods:
            raise InvalidRequest("name at least one --method")
        if len(set(methods)) != len(methods):
            raise InvalidRequest("a method is named twice")
        configs = configs or {}
        resolved = {}
        for m in methods:  # validate every method and config before any work
            cls = self.host.editor(m)
            resolved[m] = cls.make_config(configs.get(m)).model_dump(mode="json")
        self._check_plan(resolved)
        if loaded is None:
            loaded = load_model(self.model, device=device, dtype=dtype, device_map=device_map, host=self.host)
        baselines = self._baselines(loaded)
        for m in methods:
            torch.manual_seed(self.plan["seed"])
            runner = self._run_groups if self.plan["protocol"] == "groups" else self._run_stream
            runner(m, resolved[m], loaded, baselines, progress)
        return self.out

    def _measure(self, loaded, baselines, indices: list[int]) -> dict[str, dict]:
        return {str(i): measure_item(loaded, self.cases[i].request, baselines[i], list(self.cases[i].portability))
                for i in indices}

    def _open(self, ws: Path, method: str, config: dict, loaded: LoadedModel, first: int):
        from editkit.session import Session

        session = Session.open(ws, loaded=loaded, method=method, method_config=config, host=self.host)
        done = session.history(active_only=True)
        for k, record in enumerate(done):
            want = self.cases[first + k].request.model_dump(mode="json") if first + k < len(self.cases) else None
            if record.request != want:
                session.close()
                raise WorkspaceError(f"{ws} holds edits other than this run's (edit {k + 1} differs); "
                                     "use another --out")
        return session, len(done)

    def _points(self) -> dict[int, list[int]]:
        """Measurement points of a stream protocol: number of edits -> the edits measured."""
        protocol, n, every = self.plan["protocol"], len(self.cases), self.plan["every"]
        if protocol == "final":
            steps = self.plan["at"] or [n]
        elif protocol == "immediate":
            return {t: [t - 1] for t in range(1, n + 1)}
        else:  # retention
            steps = sorted({t for t in range(every, n + 1, every)} | {n})
        sampled = self.plan["sampled"]
        return {t: [i for i in (sampled if sampled is not None else range(n)) if i < t] for t in steps}

    def _run_stream(self, method, config, loaded, baselines, progress) -> None:
        folder = self.out / "methods" / method
        folder.mkdir(parents=True, exist_ok=True)
        mfile = folder / "measurements.jsonl"
        measured = {row["step"] for row in read_jsonl(mfile)}
        n, turn = len(self.cases), self.plan["turn_size"]
        points = self._points()
        session, done = self._open(folder / "workspace", method, config, loaded, 0)
        try:
            i = 0
            while i < n:
                # The next turn: turn_size edits, never past a measurement point.
                stop = min(n, i + turn, min((t for t in points if t > i), default=n))
                if stop > done:
                    if i < done:  # a turn cut short by an interruption: its journaled part stays
                        i = done
                    started = time.perf_counter()
                    session.edit([c.request for c in self.cases[i:stop]], measure=False)
                    if progress:
                        progress(method, stop, n, f"edits {i + 1}-{stop} in {time.perf_counter() - started:.1f}s"
                                 if stop - i > 1 else f"edit {stop} in {time.perf_counter() - started:.1f}s")
                elif progress:
                    progress(method, stop, n, "journaled")
                i = stop
                if stop in points and stop not in measured:
                    if stop < done:  # later edits are applied already: this point cannot be taken now
                        continue
                    append_jsonl(mfile, {"step": stop, "group": None,
                                          "items": self._measure(loaded, baselines, points[stop])})
        finally:
            session.close()

    def _run_groups(self, method, config, loaded, baselines, progress) -> None:
        folder = self.out / "methods" / method
        folder.mkdir(parents=True, exist_ok=True)
        mfile = folder / "measurements.jsonl"
        measured = {row["group"] for row in read_jsonl(mfile)}
        n, size = len(self.cases), self.plan["group_size"]
        for g, start in enumerate(range(0, n, size)):
            stop = min(n, start + size)
            if g in measured:
                if progress:
                    progress(method, stop, n, "journaled")
                continue
            session, done = self._open(folder / "groups" / f"g{g:04d}", method, config, loaded, start)
            try:
                for i in range(start, stop):
                    if i - start >= done:
                        started = time.perf_counter()
                        session.edit(self.cases[i].request, measure=False)
                        if progress:
                            progress(method, i + 1, n, f"edit {i + 1} in {time.perf_counter() - started:.1f}s")
                    elif progress:
                        progress(method, i + 1, n, "journaled")
                append_jsonl(mfile, {"step": stop, "group": g,
                                      "items": self._measure(loaded, baselines, list(range(start, stop)))})
            finally:
                session.close()


def run_eval(out: str | Path, *, suite: str, data: str | None, methods: list[str], edits: int = 100,
             protocol: str = "final", every: int | None = None, group_size: int | None = None, seed: int = 0,
             select: str = "first", skip_invalid: bool = False, model: str | None = None,
             at: list[int] | None = None, sample: int | None = None, turn_size: int = 1,
             configs: dict[str, dict] | None = None, loaded: LoadedModel | None = None, device: str = "auto",
             dtype: str | None = None, progress: Progress | None = None, host: PluginHost | None = None,
             plots: bool = True, device_map: str | None = None, settings: dict | None = None) -> dict:
    """Run (or resume) an evaluation into `out` and write its report; returns the report dict.
    `settings` (the command's effective settings) is written into the folder as run-config.yaml."""
    run = EvalRun(out, suite=suite, data=data, edits=edits, protocol=protocol, every=every,
                  group_size=group_size, seed=seed, select=select, skip_invalid=skip_invalid,
                  model=model if loaded is None or model is not None else loaded.name, at=at, sample=sample,
                  turn_size=turn_size, host=host)
    run.run(methods, configs, loaded=loaded, device=device, dtype=dtype, progress=progress, device_map=device_map)
    if settings is not None:
        import yaml

        atomic_write_text(Path(out) / "run-config.yaml", yaml.safe_dump(settings, sort_keys=True))
    report = build_report(out)
    render_report(report, out, plots=plots)
    return report
