"""`editkit sweep SPEC`: suites x methods x config grids x seeds, each cell an `editkit eval`
run, one after another here or as Ray tasks (--ray). Logic: editkit.evaluation.sweep."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ._common import console, fail, host_of, quiet_libraries


def sweep(
    ctx: typer.Context,
    spec: Annotated[Path, typer.Argument(metavar="SPEC", dir_okay=False, help="Sweep spec (YAML or JSON).")],
    out: Annotated[Path, typer.Option("--out", file_okay=False, metavar="DIR",
                                      help="Sweep folder; rerun with the same spec to resume.")] = Path("editkit-sweep"),
    ray: Annotated[Optional[str], typer.Option(
        "--ray", metavar="ADDRESS", help="Run cells as Ray tasks: local (a runtime here), auto (the running "
                                         "cluster) or a cluster address. Without it, cells run one after another.")] = None,
) -> None:
    """Run an evaluation sweep and write sweep.md (mean ± std over seeds, every cell)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from editkit.evaluation.sweep import Sweep, read_spec

    quiet_libraries()
    job = Sweep(read_spec(spec), out, host=host_of(ctx))
    con = console()
    with Progress(TextColumn("cells"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.fields[note]}"), console=con) as bar:
        task = bar.add_task("cells", total=len(job.cells), note="")

        def progress(cell: str, what: str) -> None:
            if what == "complete" or what.startswith(("failed", "done before")):
                bar.advance(task)
            bar.update(task, note=f"{cell}: {what}")
            if what.startswith("failed"):
                con.print(f"{cell}: {what}")

        result = job.run(ray_address=ray, progress=progress)
    typer.echo((Path(out) / "sweep.md").read_text(encoding="utf-8"))
    if result["failed"]:
        fail(f"{len(result['failed'])} cell(s) failed after a retry: {', '.join(result['failed'])}")


def register(app: typer.Typer) -> None:
    app.command()(sweep)
