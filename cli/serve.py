"""`editkit serve`: the HTTP service over one workspace."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ._common import (DEFAULT_WORKSPACE, ConfigFileOpt, ConfigOpt, DeviceMapOpt, DeviceOpt, DtypeOpt, MethodOpt,
                      ModelOpt, WorkspaceOpt, method_config, start_session)


def serve(
    ctx: typer.Context,
    workspace: WorkspaceOpt = DEFAULT_WORKSPACE,
    host: Annotated[str, typer.Option("--host", help="Address to bind; a non-loopback one needs a token.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="TCP port.")] = 8000,
    token: Annotated[Optional[str], typer.Option(
        "--token", envvar="EDITKIT_TOKEN", help="Bearer token required by every request that changes state.")] = None,
    max_body_bytes: Annotated[int, typer.Option("--max-body-bytes", help="Largest request body (413 above).")] = 1_000_000,
    max_prompt_chars: Annotated[Optional[int], typer.Option(
        "--max-prompt-chars", min=1, show_default=False,
        help="Longest prompt or target (422 above). Default: $EDITKIT_MAX_PROMPT_CHARS, else 4000.")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Most tokens per generation.")] = 512,
    data_dir: Annotated[Optional[Path], typer.Option("--data-dir", help="Where /v1/evaluate may read suite files.")] = None,
    follow: Annotated[Optional[Path], typer.Option(
        "--follow", file_okay=False, metavar="WS",
        help="Serve as a read replica of workspace WS (its writer is another `editkit serve`): generation only, "
             "switching to each head the writer commits.")] = None,
    writer: Annotated[Optional[str], typer.Option(
        "--writer", metavar="URL", help="A replica's writer, named in the 409 that answers edits.")] = None,
    poll_interval: Annotated[float, typer.Option(
        "--poll-interval", min=0.01, help="How often a replica looks for a new head (seconds).")] = 1.0,
    batch_rows: Annotated[int, typer.Option("--batch-rows", min=1, help="Most prompts decoded together.")] = 32,
    batch_window_ms: Annotated[float, typer.Option(
        "--batch-window-ms", min=0.0, help="How long a batch's first request waits for others (ms).")] = 20.0,
    model: ModelOpt = None,
    method: MethodOpt = None,
    config: ConfigOpt = None,
    config_file: ConfigFileOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = None,
    device_map: DeviceMapOpt = None,
) -> None:
    """Serve generation with the workspace's edits in force, and take edits while serving
    (OpenAPI docs at /docs)."""
    from editkit.service import ServiceConfig, serve as run

    limits = {"max_prompt_chars": max_prompt_chars} if max_prompt_chars else {}
    settings = ServiceConfig(token=token, max_body_bytes=max_body_bytes, max_new_tokens=max_new_tokens,
                             data_dir=str(data_dir) if data_dir else None, batch_rows=batch_rows,
                             batch_window_ms=batch_window_ms, writer=writer, poll_interval=poll_interval, **limits)
    if follow is not None:
        factory = lambda: start_session(ctx, follow, create=False, follow=True, model=model,  # noqa: E731
                                        device=device, dtype=dtype, device_map=device_map)
    else:
        factory = lambda: start_session(ctx, workspace, create=True, model=model, device=device,  # noqa: E731
                                        dtype=dtype, device_map=device_map, method=method,
                                        method_config=method_config(config, config_file))
    run(factory, host=host, port=port, config=settings)


def register(app: typer.Typer) -> None:
    app.command()(serve)
