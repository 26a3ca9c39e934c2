"""`editkit eval` (run or resume a lifelong evaluation) and `editkit report` (render a run's
report again). Logic: editkit.evaluation.runner and editkit.evaluation.report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from editkit.errors import InvalidRequest

from ._common import (DeviceMapOpt, DeviceOpt, DryRunOpt, DtypeOpt, ModelOpt, console, echo_json, host_of,
                      model_name, quiet_libraries, read_config_file)


def _progress_bar():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("edits"),
                    TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.fields[note]}"),
                    console=console(), transient=False)


def eval_command(
    ctx: typer.Context,
    suite: Annotated[str, typer.Option("--suite", metavar="NAME",
                                       help="Suite: zsre, counterfact, jsonl, builtin, or one a plugin registers.")] = "builtin",
    data: Annotated[Optional[str], typer.Option(
        "--data", metavar="FILE", help="Data file (JSON / JSONL) for the suite, or a hub dataset name.")] = None,
    method: Annotated[Optional[list[str]], typer.Option(
        "--method", metavar="NAME", help="Editing method; repeat for a comparison table.")] = None,
    edits: Annotated[int, typer.Option("--edits", min=1, help="Number of edits in the stream (T).")] = 100,
    protocol: Annotated[str, typer.Option(
        "--protocol", metavar="NAME", help="final | immediate | retention | groups.")] = "final",
    every: Annotated[Optional[int], typer.Option(
        "--every", min=1, help="retention: re-measure every k edits (default T/10).")] = None,
    group_size: Annotated[Optional[int], typer.Option(
        "--group-size", min=1, help="groups: edits per group before rolling back (default 10).")] = None,
    at: Annotated[Optional[str], typer.Option(
        "--at", metavar="T,T,...", help="final: also measure after each of these numbers of edits, in the "
                                        "same stream (e.g. 1,10,100,1000).")] = None,
    sample: Annotated[Optional[int], typer.Option(
        "--sample", min=1, help="Measure at each point a fixed random sample of this many of the edits made "
                                "so far (cost linear in the stream).")] = None,
    turn_size: Annotated[int, typer.Option(
        "--turn-size", min=1, help="Edits handed to the session per call: one turn for editors that edit "
                                   "in turns (ultraedit).")] = 1,
    out: Annotated[Path, typer.Option("--out", file_okay=False, metavar="DIR",
                                      help="Run directory: workspaces, measurements and the report. Rerun "
                                           "with the same arguments to resume.")] = Path("editkit-eval"),
    seed: Annotated[int, typer.Option("--seed", help="Seed for torch and for --select random.")] = 0,
    select: Annotated[str, typer.Option("--select", metavar="HOW",
                                        help="first: the first T valid records; random: T drawn with --seed.")] = "first",
    skip_invalid: Annotated[bool, typer.Option(
        "--skip-invalid", help="Skip malformed records (and report how many) instead of stopping.")] = False,
    config: Annotated[Optional[list[str]], typer.Option(
        "--config", metavar="METHOD.KEY=VALUE", help="Method config value, repeatable; VALUE read as JSON "
                                                     "where it parses.")] = None,
    model: ModelOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = None,
    device_map: DeviceMapOpt = None,
    plots: Annotated[bool, typer.Option("--plots/--no-plots", help="Write PNG plots.")] = True,
    log_to: Annotated[Optional[list[str]], typer.Option(
        "--log-to", metavar="TRACKER", help="Also log the run to wandb, mlflow or tensorboard (repeatable; "
                                            "pip install -e \".[tracking]\").")] = None,
    config_file: Annotated[Optional[Path], typer.Option(
        "--config-file", dir_okay=False, metavar="RUN.yaml",
        help="YAML or JSON of this command's settings (suite, data, method, edits, protocol, at, ..., and "
             "configs: {METHOD: {KEY: VALUE}}); options given on the command line win. The effective "
             "settings are written into the run folder as run-config.yaml.")] = None,
    dry_run: DryRunOpt = False,
) -> None:
    """Evaluate editing methods over a lifelong edit stream and write a report."""
    from editkit.evaluation.report import markdown
    from editkit.evaluation.runner import EvalRun, parse_method_configs, run_eval
    from editkit.evaluation.tracking import check_trackers, log_report

    quiet_libraries()
    given = {k: v for k, v in ctx.params.items() if _given(ctx, k)}
    run = _run_settings(ctx.params, given, read_config_file(config_file))
    check_trackers(run["log_to"] or [])
    methods = run["method"] or ["ft"]
    configs = parse_method_configs(config, methods, base=run["configs"])
    args = dict(suite=run["suite"], data=run["data"], edits=run["edits"], protocol=run["protocol"],
                every=run["every"], group_size=run["group_size"], seed=run["seed"], select=run["select"],
                skip_invalid=run["skip_invalid"], model=model_name(run["model"]), at=_parse_at(run["at"]),
                sample=run["sample"], turn_size=run["turn_size"])
    effective = {**{k: v for k, v in run.items() if k not in ("configs", "out")}, "method": methods,
                 "configs": configs, "out": str(out)}
    if dry_run:
        plan = EvalRun(out, host=host_of(ctx), **args).describe(methods, configs)
        echo_json({"settings": effective, "plan": plan})
        return
    with _progress_bar() as bar:
        tasks: dict[str, int] = {}

        def progress(name: str, done: int, total: int, note: str) -> None:
            if name not in tasks:
                tasks[name] = bar.add_task(name, total=total, note="")
            bar.update(tasks[name], completed=done, note=note)

        report = run_eval(out, methods=methods, configs=configs, device=device, device_map=device_map,
                          dtype=dtype.value if dtype else None, progress=progress, host=host_of(ctx), plots=plots,
                          settings=effective, **args)
    if run["log_to"]:
        log_report(report, out, run["log_to"])
    typer.echo(markdown(report))
    if report["skipped"]:
        typer.echo(f"skipped {len(report['skipped'])} invalid record(s)", err=True)
    typer.echo(f"report: {Path(out) / 'report.md'}", err=True)


def _given(ctx: typer.Context, name: str) -> bool:
    """Whether option `name` came from the command line or the environment, not its default."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name in ("COMMANDLINE", "ENVIRONMENT")


RUN_SETTINGS = ("suite", "data", "method", "edits", "protocol", "every", "group_size", "at", "sample", "turn_size",
                "seed", "select", "skip_invalid", "model", "log_to")


def _run_settings(params: dict, given: dict, from_file: dict) -> dict:
    """This run's settings: the command line's where given, else the config file's, else the
    defaults; the file's per-method configs under `configs`."""
    unknown = sorted(set(from_file) - set(RUN_SETTINGS) - {"configs"})
    if unknown:
        raise InvalidRequest(f"config file: unknown setting(s) {', '.join(unknown)} "
                             f"(known: {', '.join(RUN_SETTINGS)}, configs)")
    run = {k: given[k] if k in given else from_file.get(k, params.get(k)) for k in RUN_SETTINGS}
    if isinstance(run["method"], str):
        run["method"] = [run["method"]]
    if isinstance(run["at"], list):
        run["at"] = ",".join(str(t) for t in run["at"])
    configs = from_file.get("configs") or {}
    if not isinstance(configs, dict) or not all(isinstance(v, dict) for v in configs.values()):
        raise InvalidRequest("config file: configs must map each method to its settings")
    run["configs"] = configs
    return run


def _parse_at(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise InvalidRequest(f"--at expects numbers of edits separated by commas, got '{text}'") from None


def report_command(
    out: Annotated[Path, typer.Argument(metavar="DIR", help="A run directory written by `editkit eval`.",
                                        file_okay=False)],
    rebuild: Annotated[bool, typer.Option("--rebuild", help="Rebuild report.json from the run's files first.")] = False,
    plots: Annotated[bool, typer.Option("--plots/--no-plots", help="Write PNG plots.")] = True,
) -> None:
    """Render a run's report again (report.md and the PNG plots) from its report.json."""
    from editkit.evaluation.report import build_report, load_report, markdown, render_report

    report = build_report(out) if rebuild else load_report(out)
    paths = render_report(report, out, plots=plots)
    typer.echo(markdown(report))
    typer.echo("wrote " + ", ".join(str(p) for p in paths), err=True)


def compare_command(
    runs: Annotated[list[Path], typer.Argument(metavar="RUN...", help="Run directories written by `editkit eval`.",
                                               file_okay=False)],
    out: Annotated[Path, typer.Option("--out", file_okay=False, metavar="DIR",
                                      help="Where compare.md, compare.json and the plots go.")] = Path("editkit-compare"),
    force: Annotated[bool, typer.Option("--force", help="Compare runs of other suites, records or seeds anyway "
                                                        "(the report says what differs).")] = False,
    plots: Annotated[bool, typer.Option("--plots/--no-plots", help="Write PNG plots.")] = True,
) -> None:
    """Merge several runs' reports into one table and overlaid plots (methods named RUN/METHOD)."""
    from editkit.evaluation.compare import compare_runs, render_comparison

    merged = compare_runs(runs, force=force)
    paths = render_comparison(merged, out, plots=plots)
    typer.echo((Path(out) / "compare.md").read_text(encoding="utf-8"))
    typer.echo("wrote " + ", ".join(str(p) for p in paths), err=True)


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_command)
    app.command("report")(report_command)
    app.command("compare")(compare_command)
