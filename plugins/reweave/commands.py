"""`editkit reweave train`: train a reweaver into a workspace or a file; attach a file with
`editkit intervention add reweave --from FILE`."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from editkit.cli._common import (ConfigOpt, DeviceMapOpt, DeviceOpt, DtypeOpt, JsonOpt, ModelOpt, console,
                                 echo_json, host_of, open_session, parse_config)
from editkit.errors import InvalidRequest, WorkspaceError


class Data(str, Enum):
    passkey = "passkey"
    counterfact = "counterfact"
    zsre = "zsre"
    mixed = "mixed"


def make_app() -> typer.Typer:
    app = typer.Typer(help="Contextual memory reweaving: memory of earlier chunks without re-reading them.",
                      no_args_is_help=True)

    @app.callback()
    def reweave() -> None:
        """Contextual memory reweaving (arXiv 2502.02046): capture hidden states of earlier chunks in a
        bounded per-conversation buffer and weave them back into a later layer (trained adapter)."""

    @app.command("train")
    def train_cmd(
        ctx: typer.Context,
        workspace: Annotated[Optional[Path], typer.Option(
            "--workspace", "-w", file_okay=False, metavar="DIR",
            help="Workspace to attach the trained reweaver to (kept across reopenings).")] = None,
        out: Annotated[Optional[Path], typer.Option(
            "--out", "-o", dir_okay=False, help="Standalone safetensors file to write instead.")] = None,
        steps: Annotated[int, typer.Option("--steps", min=1, help="Optimisation steps.")] = 1200,
        examples: Annotated[int, typer.Option("--examples", min=2, help="Training episodes.")] = 2048,
        held_out: Annotated[int, typer.Option("--held-out", min=0, help="Held-out episodes to measure.")] = 128,
        data: Annotated[Data, typer.Option("--data", help="Episodes: built-in passkeys, CounterFact or zsRE "
                                           "facts from the shared data (../shared/data or $EDITKIT_SHARED_DATA), or a mix "
                                           "(half passkeys, half CounterFact facts; measured per kind).")] = Data.mixed,
        distance: Annotated[int, typer.Option("--distance", min=1, help="Chunks between fact and query.")] = 1,
        lr: Annotated[float, typer.Option("--lr", min=0.0, help="Peak Adam learning rate (linear warm-up, cosine decay).")] = 3e-3,
        reconstruction: Annotated[float, typer.Option(
            "--reconstruction", min=0.0, help="Weight of the reconstruction objective: the woven states at the answer "
            "positions pulled towards the frozen model's with the earlier chunks in its context (0: answer "
            "cross-entropy only).")] = 0.0,
        binding: Annotated[float, typer.Option(
            "--binding", min=0.0, help="Weight of the binding objective: each answer position's attention pulled "
            "onto the memory entries that hold the token it must predict (0: answer cross-entropy only, needed for "
            "values that are not token embeddings; see docs/reweave.md).")] = 1.0,
        batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Episodes per step.")] = 16,
        seed: Annotated[int, typer.Option("--seed")] = 0,
        config: ConfigOpt = None,
        model: ModelOpt = None, device: DeviceOpt = "auto", dtype: DtypeOpt = None,
        device_map: DeviceMapOpt = None, as_json: JsonOpt = False,
    ) -> None:
        """Train the reweaver (base model frozen) on cross-chunk recall episodes; measure held-out recall."""
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        from editkit.model import load_model

        from .data import episodes
        from .files import save_file
        from .intervention import MemoryReweaving
        from .train import check_binding, evaluate, prepare, train

        if (workspace is None) == (out is None):
            raise InvalidRequest("give exactly one of --workspace and --out")
        values = parse_config(config)
        MemoryReweaving.make_config(values)  # a bad --config fails before the model loads
        items = episodes(data.value, examples + held_out, seed=seed, distance=distance)
        train_items, test_items = items[:examples], items[examples:]

        def run(loaded, rw) -> dict:
            check_binding(rw, binding)  # before minutes of capture, not after
            with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                          TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=console(),
                          transient=True, disable=as_json) as bar:
                prep_task = bar.add_task("capturing", total=len(train_items), info="")
                prepared = prepare(rw, train_items, progress=lambda d, t: bar.update(prep_task, completed=d),
                                   teacher=reconstruction > 0)
                task = bar.add_task("training", total=steps, info="")
                stats = train(rw, prepared, steps=steps, lr=lr, batch_size=batch_size, seed=seed,
                              reconstruction=reconstruction, binding=binding,
                              progress=lambda s, t, loss: bar.update(task, completed=s, info=f"loss {loss:.3f}"))
            report = {"train": stats}
            if test_items:
                kinds = sorted({ep.kind for ep in test_items})
                report["held_out"] = {}
                for kind in kinds:  # a mix is measured per kind: one average would hide the weak one
                    some = [ep for ep in test_items if ep.kind == kind]
                    suffix = f" {kind}" if len(kinds) > 1 else ""
                    report["held_out"][f"baseline{suffix}"] = evaluate(rw, some, use_memory=False)
                    report["held_out"][f"reweave{suffix}"] = evaluate(rw, some, use_memory=True)
            return report

        if out is not None:
            loaded = load_model(model, device=device, dtype=dtype.value if dtype else None, device_map=device_map,
                                host=host_of(ctx))
            rw = MemoryReweaving(loaded, values)
            rw.attach()
            try:
                report = run(loaded, rw)
                tensors, meta = rw.state_dict()
                save_file(out, tensors, rw.config.model_dump(mode="json"), meta, loaded.fingerprint)
            finally:
                rw.detach()
            where = str(out)
        else:
            with open_session(ctx, workspace, create=True, model=model, device=device, dtype=dtype,
                              device_map=device_map) as session:
                old = session.interventions.get("reweave")
                if old is not None and values is not None and old.make_config(values) != old.config:
                    raise WorkspaceError("the workspace's reweaver has another config; run `editkit reweave "
                                         "remove` first or leave out --config")
                rw = MemoryReweaving(session.loaded, old.config if old else values)
                rw.attach()
                try:
                    if old is not None:  # continue training the workspace's reweaver
                        rw.load_state_dict(*old.state_dict())
                    report = run(session.loaded, rw)
                    state = rw.state_dict()
                finally:
                    rw.detach()
                if old is not None:
                    session.remove_intervention("reweave")
                session.add_intervention("reweave", rw.config.model_dump(mode="json"), state=state)
            where = str(workspace)
        report["saved_to"] = where
        if as_json:
            echo_json(report)
            return
        _print_report(report)

    return app


def _print_report(report: dict) -> None:
    from rich.table import Table

    con = console()
    t = report["train"]
    con.print(f"trained {t['steps']} steps on {t['examples']} episodes in {t['seconds']:.1f}s: "
              f"loss {t['first_loss']:.3f} -> {t['last5_loss']:.3f} (last 5), gate {t['gate']:.3f}")
    held = report.get("held_out")
    if held:
        table = Table("held-out", "key exact", "token acc", "answer log-prob")
        for name, row in held.items():
            table.add_row(name, f"{100 * row['exact']:.1f}%", f"{100 * row['token_accuracy']:.1f}%",
                          f"{row['answer_logprob']:.3f}")
        con.print(table)
    con.print(f"saved to {report['saved_to']}")
