"""`editkit ph3 locate`: find memory and context heads and write a heads file; attach them to a
workspace with `editkit intervention add ph3 --from HEADS --config favour=...`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from editkit.cli._common import DeviceMapOpt, DeviceOpt, DtypeOpt, JsonOpt, ModelOpt, console, echo_json, host_of
from editkit.errors import InvalidRequest


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def make_app() -> typer.Typer:
    app = typer.Typer(help="PH3: prune memory or context heads to settle knowledge conflicts.", no_args_is_help=True)

    @app.callback()
    def ph3() -> None:
        """PH3 (arXiv 2402.18154): choose whether the model follows its memory or a conflicting
        context by pruning attention heads."""

    @app.command()
    def locate(
        ctx: typer.Context,
        out: Annotated[Path, typer.Option("--out", "-o", dir_okay=False, help="Heads file (JSON) to write.")],
        items: Annotated[str, typer.Option(
            "--items", metavar="FILE|builtin|known|counterfact",
            help="Facts to build conflict items from: the built-in set, the known-facts or CounterFact file "
                 "in the shared data (editkit.data: ../shared/data or $EDITKIT_SHARED_DATA), or a JSON/JSONL file (prompt, answer, optional context_answer, relation).")]
        = "builtin",
        limit: Annotated[Optional[int], typer.Option("--limit", min=6, help="Most conflict items to use.")] = None,
        mode: Annotated[str, typer.Option(
            "--mode", metavar="direct|activation",
            help="direct: direct path patching (one cached pass per prompt); activation: activation patching "
                 "(every downstream path, one forward pass per head).")] = "direct",
        order: Annotated[str, typer.Option(
            "--order", metavar="effect|paper",
            help="Pruning order: effect (editkit's: each head's direct effect in the conflict run minus its help "
                 "to the clean answer) or paper (PH3's: the patching score).")] = "effect",
        full_patching: Annotated[bool, typer.Option(
            "--full-patching", hidden=True, help="Deprecated: --mode activation.")] = False,
        tolerance: Annotated[float, typer.Option(
            "--tolerance", min=0.0, max=1.0, help="Most clean-accuracy loss allowed when choosing k.")] = 0.1,
        seed: Annotated[int, typer.Option("--seed", help="Seed of the splits and of conflicting answers.")] = 0,
        model: ModelOpt = None, device: DeviceOpt = "auto", dtype: DtypeOpt = None,
        device_map: DeviceMapOpt = None, as_json: JsonOpt = False,
    ) -> None:
        """Build conflict items, score every head, choose k per direction, measure on held-out items."""
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        from editkit.model import load_model

        from .items import build_items, load_facts
        from .pipeline import run_ph3, write_heads

        from .locate import MODES, ORDERS

        if full_patching:
            typer.echo("warning: --full-patching is deprecated (it is activation patching); use --mode activation",
                       err=True)
            mode = "activation"
        if mode not in MODES or order not in ORDERS:
            raise InvalidRequest(f"--mode is one of {', '.join(MODES)} and --order one of {', '.join(ORDERS)}")
        facts = load_facts(items)  # a bad --items fails before the model loads
        loaded = load_model(model, device=device, dtype=dtype.value if dtype else None, device_map=device_map,
                            host=host_of(ctx))
        stats: dict = {}
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console(), transient=True, disable=as_json) as bar:
            tasks: dict[str, int] = {}

            def report(stage: str, done: int, total: int) -> None:
                if stage not in tasks:
                    tasks[stage] = bar.add_task(stage, total=total)
                bar.update(tasks[stage], completed=done, total=total)

            built = build_items(loaded, facts, limit=limit, seed=seed, stats=stats,
                                progress=lambda d, t: report("known facts", d, t))
            doc = run_ph3(loaded, built, seed=seed, mode=mode, order=order, tolerance=tolerance, progress=report)
        doc["items"] = {**stats, "source": items}
        write_heads(doc, out)
        if as_json:
            echo_json({k: v for k, v in doc.items() if k not in ("scores", "split_items")})
            return
        _print_summary(doc, out)

    return app


def _print_summary(doc: dict, out: Path) -> None:
    from rich.table import Table

    con = console()
    items = doc.get("items", {})
    con.print(f"{items.get('items')} conflict items from {items.get('considered')} facts "
              f"({items.get('known')} known); splits {doc['splits']}; scoring: {doc['mode']} patching, "
              f"pruning order: {doc['order']}")
    for kind in ("memory", "context"):
        top = doc[f"{kind}_heads"][:8]
        con.print(f"top {kind} heads: " + (", ".join(f"L{l}H{h} ({s:+.2f})" for l, h, s in top) or "none"))
        order = (doc.get("pruning_order") or {}).get(kind)
        if order is not None:
            con.print("  pruning order (gain): " + (", ".join(f"L{l}H{h} ({g:+.2f})" for l, h, g in order[:8])
                                                     or "none"))
    table = Table("test split", "memory rate", "context rate", "clean acc", "perplexity", "k")
    before = doc["test"]["before"]
    table.add_row("no pruning", _pct(before["memory_rate"]), _pct(before["context_rate"]),
                  _pct(before["clean_accuracy"]), f"{before['perplexity']:.2f}", "0")
    for favour, row in doc["test"].items():
        if favour == "before":
            continue
        table.add_row(f"favour {favour}", _pct(row["memory_rate"]), _pct(row["context_rate"]),
                      _pct(row["clean_accuracy"]), f"{row['perplexity']:.2f}", str(doc["choice"][favour]["k"]))
    con.print(table)
    con.print(f"wrote {out}")
