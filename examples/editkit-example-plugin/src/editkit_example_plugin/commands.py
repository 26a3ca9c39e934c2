"""The plugin's CLI command group, mounted by editkit as ``editkit example ...``."""

from __future__ import annotations

import typer


def make_app() -> typer.Typer:
    app = typer.Typer(help="Commands added by editkit-example-plugin.", no_args_is_help=True)

    @app.callback()
    def example() -> None:
        """Commands added by editkit-example-plugin."""
        # A callback keeps this a group even with one command, so the command is
        # `editkit example hello` rather than `editkit example`.

    @app.command()
    def hello() -> None:
        """Print the plugin's version."""
        from . import plugin_version

        typer.echo(f"editkit-example-plugin {plugin_version()}")

    return app
