"""The `editkit` app: built-in commands plus every command group plugins register."""

from __future__ import annotations

import typer

from editkit.errors import EditkitError

from . import demo, edit, eval, export, intervention, methods, plugins, serve, sweep
from ._common import EditkitGroup, fail


def build_app(host=None) -> typer.Typer:
    """The CLI for `host` (default: the process-wide plugin host). Each entry of
    host.registry["commands"] (name -> typer.Typer) is mounted as `editkit NAME ...`.
    Commands reach the host as the root context's obj (see _common.host_of)."""
    from editkit.host import get_host

    host = host or get_host()
    app = typer.Typer(
        name="editkit", cls=EditkitGroup, no_args_is_help=True, add_completion=True,
        pretty_exceptions_enable=False, context_settings={"obj": host, "help_option_names": ["-h", "--help"]},
        help="Lifelong model editing for Hugging Face causal language models.")
    edit.register(app)
    plugins.register(app)
    methods.register(app)
    demo.register(app)
    serve.register(app)
    eval.register(app)
    export.register(app)
    sweep.register(app)
    intervention.register(app)
    builtin = {info.name for info in app.registered_commands if info.name} | {
        info.callback.__name__ for info in app.registered_commands if info.callback} | {
        info.name for info in app.registered_groups if info.name}
    for name, (group, plugin) in sorted(host.registry["commands"].items()):
        if name in builtin:
            typer.echo(f"warning: plugin '{plugin}' registers command '{name}', which is built in; not mounted",
                       err=True)
        elif not isinstance(group, typer.Typer):
            typer.echo(f"warning: plugin '{plugin}' registers command '{name}' as {type(group).__name__}, "
                       "not a typer.Typer; not mounted", err=True)
        else:
            app.add_typer(group, name=name)
    return app


def main() -> None:
    """Console entry point (`editkit`)."""
    try:
        app = build_app()
    except EditkitError as exc:  # e.g. two plugins claiming one name
        try:
            fail(exc)
        except typer.Exit as stop:
            raise SystemExit(stop.exit_code) from None
    app()


if __name__ == "__main__":
    main()
