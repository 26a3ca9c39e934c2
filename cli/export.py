"""`editkit export`: write a workspace's edited model as a plain Hugging Face checkpoint."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from ._common import DeviceMapOpt, DeviceOpt, DtypeOpt, ModelOpt, WorkspaceOpt, open_session


def export(
    ctx: typer.Context,
    workspace: WorkspaceOpt,
    out: Annotated[Path, typer.Option("--out", "-o", file_okay=False, metavar="DIR",
                                      help="New (or empty) directory for the checkpoint, tokenizer and model card.")],
    push_to_hub: Annotated[Optional[str], typer.Option(
        "--push-to-hub", metavar="REPO", help="Also upload the directory to this Hugging Face Hub repository "
                                             "(private; token from HF_TOKEN or the huggingface_hub login).")] = None,
    model: ModelOpt = None, device: DeviceOpt = "auto", dtype: DtypeOpt = None, device_map: DeviceMapOpt = None,
) -> None:
    """Write the workspace's edited model for transformers, vLLM or TGI: methods whose edits
    are weight changes (ft, ultraedit) and ph3 fold into the weights; methods that route or
    look things up at inference (wise, grace, nmc, reweave) refuse, naming what would be lost."""
    from editkit.export import push_to_hub as push

    with open_session(ctx, workspace, create=False, readonly=True, model=model, device=device, dtype=dtype,
                      device_map=device_map) as session:
        written = session.export(out)
    typer.echo(f"wrote {written}")
    if push_to_hub:
        typer.echo(f"pushed to {push(written, push_to_hub, token=os.environ.get('HF_TOKEN'))}")


def register(app: typer.Typer) -> None:
    app.command()(export)
