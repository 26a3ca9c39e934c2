"""`editkit methods [NAME]`: the editing methods and interventions, each with its description
and its config (key, type, default, description), read from the plugins' pydantic configs."""

from __future__ import annotations

from typing import Annotated, Any, Optional

import typer

from editkit.errors import UnknownComponent

from ._common import JsonOpt, console, echo_json, host_of


def _type_name(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) if not getattr(annotation, "__args__", None) else None
    return text or str(annotation).replace("typing.", "").replace("NoneType", "None")


def describe(cls, kind: str) -> dict[str, Any]:
    """What `editkit methods` shows of one component class."""
    fields = []
    for key, info in cls.Config.model_fields.items():
        default = info.get_default(call_default_factory=True)
        fields.append({"key": key, "type": _type_name(info.annotation), "default": default,
                       "description": info.description or ""})
    return {"name": cls.name, "kind": kind, "description": cls.description, "config": fields,
            "schema": cls.Config.model_json_schema()}


def methods(
    ctx: typer.Context,
    name: Annotated[Optional[str], typer.Argument(metavar="NAME", help="One method or intervention.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """List the editing methods and interventions with their configs (what --config KEY=VALUE takes)."""
    host = host_of(ctx)
    found = [describe(cls, "editor") for cls, _ in host.registry["editors"].values()]
    found += [describe(cls, "intervention") for cls, _ in host.registry["interventions"].values()]
    if name is not None:
        names = [d["name"] for d in found]
        found = [d for d in found if d["name"] == name]
        if not found:
            raise UnknownComponent(f"no method or intervention '{name}'; available: {', '.join(sorted(names))}")
    if as_json:
        echo_json(found if name is None else found[0])
        return
    from rich import box
    from rich.table import Table
    from rich.text import Text

    out = console()
    for d in found:
        out.print(Text.assemble((d["name"], "bold"), f" ({d['kind']}): {d['description']}"))
        if name is None:
            continue
        table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
        for col in ("key", "type", "default"):
            table.add_column(col, no_wrap=True)
        table.add_column("description", ratio=1)
        for f in d["config"]:
            table.add_row(Text(f["key"]), Text(f["type"]), Text(repr(f["default"])), Text(f["description"]))
        out.print(table)
    if name is None:
        out.print("editkit methods NAME shows one method's config; --config KEY=VALUE sets it.")


def register(app: typer.Typer) -> None:
    app.command()(methods)
