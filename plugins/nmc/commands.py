"""`editkit nmc ...`: meta-train the synthetic-gradient module into a file, measure a file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from editkit.cli._common import (ConfigOpt, DeviceMapOpt, DeviceOpt, DtypeOpt, JsonOpt, ModelOpt, console,
                                 echo_json, host_of, parse_config)

DataOpt = Annotated[Optional[Path], typer.Option(
    "--data", dir_okay=False, help="CounterFact JSON to train on (default: the shared CounterFact training file).")]
HeldOutDataOpt = Annotated[Optional[Path], typer.Option(
    "--held-out-data", dir_okay=False,
    help="CounterFact JSON whose first records are the held-out edits (default: the shared dev file).")]
HeldOutOpt = Annotated[int, typer.Option("--held-out", min=0, help="Held-out edits to measure (0: none).")]


def _files(data: Path | None, held_out_data: Path | None) -> tuple[Path, Path]:
    """The training and held-out CounterFact files: as given, else the shared data's."""
    from editkit.data import shared_file

    return data or shared_file("counterfact-train"), held_out_data or shared_file("counterfact")


def _editor(ctx, config, model, device, dtype, device_map):
    from editkit.model import load_model

    from .editor import NMCEditor

    values = parse_config(config)
    NMCEditor.make_config(values)  # a bad --config fails before the model loads
    loaded = load_model(model, device=device, dtype=dtype.value if dtype else None, device_map=device_map,
                        host=host_of(ctx))
    editor = NMCEditor(loaded, values)
    editor.attach()
    return editor


def _bar(as_json: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console(), transient=True, disable=as_json)


def _progress(bar):
    tasks: dict[str, int] = {}

    def update(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = bar.add_task(stage, total=total)
        bar.update(tasks[stage], completed=done)
    return update


def _emit(report: dict, as_json: bool, show) -> None:
    """The command's report: JSON with --json, else `show`'s tables."""
    if as_json:
        echo_json(report)
    else:
        show(report)


def _print(report: dict) -> None:
    from rich.table import Table

    if "pretrain" in report:
        p = report["pretrain"]
        console().print(f"trained on {p['records']} edits ({p['samples']} gradients), fit loss "
                        f"{p['fit_loss_first']:.3f} -> {p['fit_loss_last']:.3f}; saved to {report['saved_to']}")
    e = report.get("held_out")
    if not e:
        return
    table = Table(title=f"held-out edits: {e['edits']}")
    table.add_column("measure")
    table.add_column("value", justify="right")
    rows = [("cosine(predicted, true gradient), mean", f"{e['cosine_mean']:.3f}"),
            ("  untrained module", f"{e['cosine_untrained_mean']:.3f}"),
            ("one-step success", f"{e['one_step_success']:.2f}"),
            ("  untrained module", f"{e['one_step_success_untrained']:.2f}"),
            ("  true gradient, same line search", f"{e['one_step_success_true_gradient']:.2f}"),
            ("median steps to the margin: nmc", str(e["median_steps_nmc"])),
            ("  Adam (slow path alone)", str(e["median_steps_adam"])),
            (f"  plain SGD (lr {e['sgd_lr']:.3g})", str(e["median_steps_sgd"]))]
    cost = e.get("mean_cost_to_margin", {})
    rows += [(f"mean cost to the margin, {name}: rows forward / backward passes",
              f"{c['forward_rows']:.1f} / {c['backward']:.1f}") for name, c in cost.items()]
    for name, value in rows:
        table.add_row(name, value)
    console().print(table)
    for layer, other in report.get("held_out_other_layers", {}).items():
        console().print(f"memory at block {layer}, same module: cosine {other['cosine_mean']:.3f}, one-step success "
                        f"{other['one_step_success']:.2f} (untrained {other['one_step_success_untrained']:.2f}), "
                        f"median steps {other['median_steps_nmc']} (Adam {other['median_steps_adam']})")


def make_app() -> typer.Typer:
    app = typer.Typer(help="Neural memory controller: synthetic-gradient module training and measures.",
                      no_args_is_help=True)

    @app.callback()
    def nmc() -> None:
        """Neural memory controller with synthetic gradients (arXiv 2011.05438)."""

    @app.command("pretrain")
    def pretrain_cmd(
        ctx: typer.Context,
        out: Annotated[Path, typer.Option("--out", "-o", dir_okay=False,
                                          help="Safetensors file to write; use it with --config feedback=FILE.")],
        records: Annotated[int, typer.Option("--records", min=1, help="Training edits.")] = 512,
        held_out: HeldOutOpt = 64,
        steps: Annotated[int, typer.Option("--steps", min=1, help="Slow-path points per training edit.")] = 8,
        epochs: Annotated[int, typer.Option("--epochs", min=1, help="Passes over the collected gradients.")] = 60,
        layers: Annotated[Optional[str], typer.Option(
            "--layers", help="Comma-separated memory layers (index or fraction of depth) that share the module; "
                             "the file then serves a memory at any of them (default: the config's layer).")] = None,
        data: DataOpt = None, held_out_data: HeldOutDataOpt = None,
        config: ConfigOpt = None, model: ModelOpt = None, device: DeviceOpt = "auto", dtype: DtypeOpt = None,
        device_map: DeviceMapOpt = None, as_json: JsonOpt = False,
    ) -> None:
        """Meta-train the synthetic-gradient module on CounterFact edits (base model frozen, memory
        empty), save it on its own, and measure it on held-out edits (at each layer with --layers)."""
        from editkit.errors import InvalidRequest

        from .editor import NMCEditor
        from .feedback import save_feedback
        from .pretrain import counterfact_requests, evaluate_feedback, pretrain, sgd_rate

        try:
            wanted = [float(x) if "." in x else int(x) for x in layers.split(",")] if layers else []
        except ValueError:
            raise InvalidRequest(f"--layers must be comma-separated layer indices or fractions, not {layers!r}") from None
        data, held_out_data = _files(data, held_out_data)
        train_reqs = counterfact_requests(data, records)
        test_reqs = counterfact_requests(held_out_data, held_out) if held_out else []
        editor = _editor(ctx, config, model, device, dtype, device_map)
        editors = [editor]
        try:
            for value in wanted[1:]:
                editors.append(NMCEditor(editor.loaded, {**editor.config.model_dump(), "layer": value}))
                editors[-1].attach()
            if wanted:  # the first listed layer is the primary editor's
                editors[0].detach()
                editors[0] = editor = NMCEditor(editor.loaded, {**editor.config.model_dump(), "layer": wanted[0]})
                editor.attach()
            with _bar(as_json) as bar:
                progress = _progress(bar)
                stats = pretrain(editor, train_reqs, steps=steps, epochs=epochs, progress=progress,
                                 shared_with=editors[1:])
                report = {"pretrain": stats}
                if test_reqs:
                    lr = sgd_rate(editor, train_reqs[:32])
                    report["held_out"] = evaluate_feedback(editor, test_reqs, lr, progress=progress)
                    report["held_out"].pop("rows")
                    for other in editors[1:]:
                        held = evaluate_feedback(other, test_reqs, sgd_rate(other, train_reqs[:32]), progress=progress)
                        held.pop("rows")
                        report.setdefault("held_out_other_layers", {})[str(other.layer)] = held
            save_feedback(out, editor.feedback, {**editor.feedback_info(), "layers": stats["layers"],
                                                 "pretrain": stats, "held_out": report.get("held_out")})
        finally:
            for e in editors:
                if e.attached:
                    e.detach()
        report["saved_to"] = str(out)
        _emit(report, as_json, _print)

    @app.command("evaluate")
    def evaluate_cmd(
        ctx: typer.Context,
        file: Annotated[Optional[Path], typer.Argument(
            dir_okay=False, help="File from `nmc pretrain` (none: the untrained module).")] = None,
        held_out: HeldOutOpt = 64,
        data: DataOpt = None, held_out_data: HeldOutDataOpt = None,
        config: ConfigOpt = None, model: ModelOpt = None, device: DeviceOpt = "auto", dtype: DtypeOpt = None,
        device_map: DeviceMapOpt = None, as_json: JsonOpt = False,
    ) -> None:
        """Measure a synthetic-gradient module on held-out edits (cosine to the true gradient, one-step
        success, steps to the margin against Adam and plain SGD)."""
        from .pretrain import counterfact_requests, evaluate_feedback, sgd_rate

        data, held_out_data = _files(data, held_out_data)
        test_reqs = counterfact_requests(held_out_data, max(held_out, 1))[:held_out]
        calibrate = counterfact_requests(data, 32)
        editor = _editor(ctx, config, model, device, dtype, device_map)
        try:
            if file is not None:
                editor.load_feedback(file)
            with _bar(as_json) as bar:
                report = {"held_out": evaluate_feedback(editor, test_reqs, sgd_rate(editor, calibrate),
                                                        progress=_progress(bar))}
                report["held_out"].pop("rows")
        finally:
            editor.detach()
        _emit(report, as_json, _print)

    @app.command("train-controller")
    def train_controller_cmd(
        ctx: typer.Context,
        out: Annotated[Path, typer.Option("--out", "-o", dir_okay=False,
                                          help="Safetensors file to write; use it with --config controller=learned "
                                               "--config controller_file=FILE.")],
        records: Annotated[int, typer.Option("--records", min=8, help="Training facts (plus the training file's "
                                                                      "facts that share a subject, half of them).")] = 600,
        held_out: HeldOutOpt = 300,
        streams: Annotated[int, typer.Option("--streams", min=1, help="Simulated training streams.")] = 300,
        length: Annotated[int, typer.Option("--length", min=4, help="Edits per stream.")] = 48,
        mode: Annotated[str, typer.Option("--mode", help="'synthetic' (decoupled, through a synthetic-gradient "
                                                         "module) or 'true' (the stream's loss backpropagated).")] = "synthetic",
        seed: Annotated[int, typer.Option("--seed")] = 0,
        data: DataOpt = None, held_out_data: HeldOutDataOpt = None,
        config: ConfigOpt = None, model: ModelOpt = None, device: DeviceOpt = "auto", dtype: DtypeOpt = None,
        device_map: DeviceMapOpt = None, as_json: JsonOpt = False,
    ) -> None:
        """Meta-train the learned controller on simulated streams of CounterFact facts (edited,
        edited again, reverted, more than the slots), save it, and compare it with the rule
        controller on held-out streams (docs/nmc.md)."""
        from editkit.errors import InvalidRequest

        from .control_train import (controller_requests, evaluate_controllers, fact_table, settings_of,
                                    train_controller)
        from .controller import save_controller

        if mode not in ("synthetic", "true"):
            raise InvalidRequest(f"--mode must be 'synthetic' or 'true', not {mode!r}")
        data, held_out_data = _files(data, held_out_data)
        train_reqs, test_reqs = controller_requests(data, held_out_data, records, held_out)
        editor = _editor(ctx, config, model, device, dtype, device_map)
        try:
            with _bar(as_json) as bar:
                progress = _progress(bar)
                train_facts = fact_table(editor, train_reqs, progress)
                test_facts = fact_table(editor, test_reqs, progress)
                s = settings_of(editor.config)
                net, stats = train_controller(train_facts, s, mode=mode, streams=streams, length=length, seed=seed,
                                              progress=progress)
            report = {"train": stats, "held_out_facts": len(test_facts),
                      "held_out": evaluate_controllers(test_facts, s, {"rule": None, "learned": net}, length=length),
                      "train_streams": evaluate_controllers(train_facts, s, {"rule": None, "learned": net},
                                                            length=length, streams=20)}
            save_controller(out, net, {**editor.feedback_info(), "report": report})
        finally:
            editor.detach()
        report["saved_to"] = str(out)
        _emit(report, as_json, _print_controllers)

    return app


def _print_controllers(report: dict) -> None:
    from rich.table import Table

    t = report["train"]
    console().print(f"trained ({t['mode']} gradients) on {t['streams']} streams of {t['length']} edits over "
                    f"{t['facts']} facts: loss {t['loss_before']:.3f} -> {t['loss_after']:.3f} (fixed probe streams); saved to "
                    f"{report['saved_to']}")
    for split in ("held_out", "train_streams"):
        rows = report[split]
        table = Table(title=f"{split.replace('_', ' ')}: share of prompts reading their latest answer")
        table.add_column("last edit of the fact")
        for name in rows:
            table.add_column(name, justify="right")
        for kind in (k for k in rows["rule"] if k != "prompts"):
            table.add_row(f"{kind} ({rows['rule']['prompts'][kind]})", *(f"{rows[n][kind]:.3f}" for n in rows))
        console().print(table)
