"""`editkit plugins`: what is loaded, what each plugin registers, and what failed."""

from __future__ import annotations

import typer

from ._common import JsonOpt, console, echo_json, host_of


def plugins(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """List loaded plugins (name, version, source, what they register) and plugins that failed."""
    host = host_of(ctx)
    loaded = [{"name": p.name, "version": p.version, "source": p.source,
               "registers": {kind: list(names) for kind, names in p.registers.items()}}
              for p in host.plugins.values()]
    failures = [{"name": name, "cause": cause} for name, cause in host.failures.items()]
    if as_json:
        echo_json({"plugins": loaded, "failures": failures})
        return
    from rich.table import Table
    from rich.text import Text

    table = Table(title="plugins", title_justify="left")
    for col in ("name", "version", "source"):
        table.add_column(col, no_wrap=True)
    table.add_column("registers")
    for p in loaded:
        regs = "; ".join(f"{kind}: {', '.join(names)}" for kind, names in p["registers"].items()) or "-"
        table.add_row(Text(p["name"]), Text(p["version"]), Text(p["source"]), Text(regs))
    out = console()
    out.print(table)
    for f in failures:
        out.print(Text.assemble(("failed: ", "red"), (f"{f['name']}: {f['cause']}", "")))


def register(app: typer.Typer) -> None:
    app.command()(plugins)
