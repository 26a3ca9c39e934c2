"""`editkit intervention add|remove|list`: attach an intervention to a workspace, from a file
its own commands wrote (`ph3 locate`, `reweave train --out`) or from --config alone."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Annotated, Optional

import typer

from editkit.errors import InvalidRequest

from ._common import (ConfigOpt, DeviceMapOpt, DeviceOpt, DtypeOpt, JsonOpt, ModelOpt, WorkspaceOpt, echo_json,
                      host_of, open_session, parse_config)

NameArg = Annotated[str, typer.Argument(metavar="NAME", help="The intervention (see `editkit plugins`).")]


def add(
    ctx: typer.Context,
    name: NameArg,
    workspace: WorkspaceOpt,
    source: Annotated[Optional[Path], typer.Option(
        "--from", dir_okay=False, metavar="FILE",
        help="A file the intervention's own commands wrote (ph3 locate's heads file, reweave train --out).")] = None,
    config: ConfigOpt = None,
    model: ModelOpt = None, device: DeviceOpt = "auto", dtype: DtypeOpt = None, device_map: DeviceMapOpt = None,
) -> None:
    """Attach intervention NAME to a workspace (created on first use); it stays attached
    across reopenings, with the workspace's edits. ph3: --from HEADS --config favour=memory|context
    [--config k=N]; reweave: --from TRAINED.safetensors."""
    cls = host_of(ctx).intervention(name)  # an unknown name fails before the model loads
    options = parse_config(config) or {}
    fresh = not Path(workspace).exists()
    try:
        with open_session(ctx, workspace, create=True, model=model, device=device, dtype=dtype,
                          device_map=device_map) as session:
            if name in session.interventions:
                raise InvalidRequest(f"{name} is already attached to {workspace}; run `editkit intervention "
                                     f"remove {name}` first")
            if source is None:
                session.add_intervention(name, options)
            else:
                cfg, tensors, meta = cls.state_from_file(source, options, session.loaded)
                session.add_intervention(name, cfg, state=(tensors, meta))
            summary = session.interventions[name].state_dict()[1]
    except Exception:
        if fresh and Path(workspace).exists():  # this call made it: a failed add leaves nothing behind
            shutil.rmtree(workspace)
        raise
    typer.echo(f"attached {name} to {workspace}" + (f" from {source}" if source else "")
               + (f": {summary}" if summary else ""))


def remove(ctx: typer.Context, name: NameArg, workspace: WorkspaceOpt) -> None:
    """Detach intervention NAME from a workspace."""
    with open_session(ctx, workspace, create=False, model=None, device="auto", dtype=None,
                      device_map=None) as session:
        session.remove_intervention(name)
    typer.echo(f"removed {name} from {workspace}")


def list_(ctx: typer.Context, workspace: WorkspaceOpt, as_json: JsonOpt = False) -> None:
    """The interventions attached to a workspace, with their configs."""
    with open_session(ctx, workspace, create=False, readonly=True, model=None, device="auto", dtype=None,
                      device_map=None) as session:
        found = {name: i.config.model_dump(mode="json") for name, i in session.interventions.items()}
    if as_json:
        echo_json(found)
        return
    typer.echo("\n".join(f"{name}: {cfg}" for name, cfg in found.items()) or f"no interventions in {workspace}")


def register(app: typer.Typer) -> None:
    group = typer.Typer(name="intervention", no_args_is_help=True,
                        help="Attach, detach and list interventions (ph3, reweave, ...) in a workspace.")
    group.command("add")(add)
    group.command("remove")(remove)
    group.command("list")(list_)
    app.add_typer(group, name="intervention")
