"""`editkit demo`: the built-in edit set on a model, before and after (logic: editkit.demo)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ._common import (SCORES, SCORES_CAPTION, ConfigOpt, DeviceMapOpt, DeviceOpt, DtypeOpt, JsonOpt, MethodOpt,
                      ModelOpt, console, echo_json, fmt_score, fmt_seconds, host_of, parse_config)


def _flat(text: str | None) -> str:
    return "-" if text is None else " ".join(text.split()) or "(nothing)"


def render(result) -> None:
    from rich import box
    from rich.table import Table
    from rich.text import Text

    out = console()
    where = result.workspace or "a temporary workspace"
    out.print(Text(f"editkit demo · model {result.model} · method {result.method} · {where}", style="bold"))
    out.print(f"before: generations before the first edit; after: with all {len(result.edits)} edits in force")
    for e in result.edits:
        out.print()
        was = f" (was {e.target_old})" if e.target_old else ""
        table = Table(title=f"edit {e.id}: {e.prompt} -> {e.target_new}{was}", title_justify="left")
        table.add_column("", no_wrap=True, style="bold")
        table.add_column("prompt", ratio=2)
        table.add_column("before", ratio=2)
        table.add_column("after", ratio=2)
        table.add_row("edit", Text(e.prompt), Text(_flat(e.before)), Text(_flat(e.after), style="cyan"))
        if e.rephrase is not None:
            table.add_row("rephrase", Text(e.rephrase), Text(_flat(e.rephrase_before)),
                          Text(_flat(e.rephrase_after), style="cyan"))
        out.print(table)
    summary = Table(title="scores", title_justify="left", caption=SCORES_CAPTION, caption_justify="left",
                    box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True)
    summary.add_column("id", justify="right", no_wrap=True)
    summary.add_column("edit", min_width=12)
    for col in ("rel", "gen", "loc", "sec"):
        summary.add_column(col, justify="right", no_wrap=True)
    for e in result.edits:
        summary.add_row(Text(str(e.id)), Text(f"{e.prompt} -> {e.target_new}"),
                        *[Text(fmt_score(e.metrics.get(k))) for k in SCORES], Text(fmt_seconds(e.seconds)))
    out.print()
    out.print(summary)


def demo(
    ctx: typer.Context,
    method: MethodOpt = None,
    config: ConfigOpt = None,
    workspace: Annotated[Optional[Path], typer.Option(
        "--workspace", "-w", file_okay=False,
        help="Keep the demo's edits in this workspace (default: a temporary one, removed afterwards).")] = None,
    model: ModelOpt = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1, help="Tokens generated per prompt.")] = 12,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = None,
    device_map: DeviceMapOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Apply the built-in edit set and show generations before and after, with scores."""
    from editkit.demo import run_demo

    method_config = parse_config(config)
    result = run_demo(model=model, method=method, workspace=workspace,
                      max_new_tokens=max_new_tokens, method_config=method_config, device=device,
                      dtype=dtype.value if dtype else None, device_map=device_map, host=host_of(ctx),
                      progress=lambda message: typer.echo(f"{message}...", err=True))
    if as_json:
        echo_json(result.to_dict())
    else:
        render(result)


def register(app: typer.Typer) -> None:
    app.command()(demo)
