"""What the commands share: option types, the plugin host, opening a session, small output
helpers, and the one error formatter (`fail`)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, Optional

import typer
from pydantic import ValidationError
from typer.core import TyperGroup

from editkit.errors import EditkitError, InvalidRequest

try:  # typer >= 0.2x carries its own click, whose exceptions derive from TyperException
    from typer import TyperException as ClickError
except ImportError:  # older typer: click's own
    from click import ClickException as ClickError

if TYPE_CHECKING:
    from editkit.host import PluginHost
    from editkit.session import Session

DEFAULT_WORKSPACE = Path("editkit-workspace")
SCORES = ("reliability", "generalization", "locality")
SCORES_CAPTION = "rel, gen, loc: reliability, generalization, locality, measured right after the edit"


class Dtype(str, Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


# ---- option types ----------------------------------------------------------------------
WorkspaceOpt = Annotated[Path, typer.Option(
    "--workspace", "-w", envvar="EDITKIT_WORKSPACE", file_okay=False, metavar="DIR",
    help="Workspace directory: the journal of edits and their saved state.")]
ModelOpt = Annotated[Optional[str], typer.Option(
    "--model", envvar="EDITKIT_MODEL", metavar="ID_OR_PATH",
    help="Hugging Face model id or local directory. Default: the workspace's model, "
         "or the embedded SmolLM2-135M-Instruct for a new workspace.")]
DeviceOpt = Annotated[str, typer.Option("--device", metavar="DEVICE", help="cpu, cuda, cuda:N or auto.")]
DtypeOpt = Annotated[Optional[Dtype], typer.Option("--dtype", help="Weight dtype (default float32).")]
DeviceMapOpt = Annotated[Optional[str], typer.Option(
    "--device-map", metavar="MAP",
    help="Spread the model over devices with accelerate (then --device is unused): auto, balanced, "
         "sequential, or a JSON object of module -> device where \"cpu\" and \"disk\" offload a layer's weights.")]
MethodOpt = Annotated[Optional[str], typer.Option(
    "--method", metavar="NAME", help="Editing method (see `editkit plugins`). Default: the workspace's, or wise.")]
ConfigOpt = Annotated[Optional[list[str]], typer.Option(
    "--config", metavar="KEY=VALUE",
    help="Method config value, repeatable; VALUE is read as JSON where it parses, else as a string.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
ConfigFileOpt = Annotated[Optional[Path], typer.Option(
    "--config-file", dir_okay=False, metavar="FILE",
    help="YAML or JSON file of method settings (KEY: VALUE); --config values override it.")]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Check and resolve everything, print the plan, change nothing.")]


# ---- the one error formatter -----------------------------------------------------------
def one_line(text: Any) -> str:
    line = " ".join(part.strip() for part in str(text).splitlines() if part.strip())
    return line or "(no reason given)"


def fail(exc: BaseException | str) -> NoReturn:
    """Print `error: <reason>` on one line to stderr and exit with status 1."""
    if isinstance(exc, ValidationError):
        from editkit.components import describe_validation_error

        exc = InvalidRequest(describe_validation_error(exc, exc.title))
    typer.echo(f"error: {one_line(exc)}", err=True)
    raise typer.Exit(1)


def usage_error(exc: ClickError) -> NoReturn:
    """Click's own errors (a bad option value, a missing argument, an unknown command) as
    `error: <reason>` on one line, keeping their exit status (2 for usage errors)."""
    ctx = getattr(exc, "ctx", None)
    hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
    typer.echo(f"error: {one_line(exc.format_message())}{hint}", err=True)
    raise typer.Exit(exc.exit_code)


def _is_help(exc: ClickError) -> bool:
    """`editkit` or a command group called without arguments: the help text, not an error."""
    return type(exc).__name__ == "NoArgsIsHelpError"


class EditkitGroup(TyperGroup):
    """The root command group: user errors raised anywhere below it (built-in commands,
    plugin command groups, option callbacks) end in `fail`, and usage errors in
    `usage_error`, never in a traceback or a box."""

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except ClickError as exc:  # options of the root itself, e.g. `editkit --bogus`
            if _is_help(exc):
                raise
            usage_error(exc)

    def invoke(self, ctx):
        quiet_libraries()
        try:
            return super().invoke(ctx)
        except (EditkitError, ValidationError) as exc:
            fail(exc)
        except ClickError as exc:
            if _is_help(exc):
                raise
            usage_error(exc)


def quiet_libraries() -> None:
    """No progress bars or info logs from transformers: stderr is for our messages."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


# ---- shared plumbing -------------------------------------------------------------------
def host_of(ctx: typer.Context) -> PluginHost:
    """The host the app was built with (the root context's obj), else the process-wide one."""
    from editkit.host import PluginHost, get_host

    obj = ctx.find_root().obj
    return obj if isinstance(obj, PluginHost) else get_host()


def model_name(model: str | None) -> str | None:
    """The model as a workspace records it (a local directory by absolute path)."""
    from editkit.session import _model_key

    return None if model is None else _model_key(model)


def parse_config(items: list[str] | None) -> dict[str, Any] | None:
    """`KEY=VALUE` pairs -> dict; VALUE as JSON where it parses (0.5, 3, true, [1,2]), else a string."""
    if not items:
        return None
    config: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise InvalidRequest(f"--config expects KEY=VALUE, got '{item}'")
        if key in config:
            raise InvalidRequest(f"--config key '{key}' is given twice")
        try:
            config[key] = json.loads(raw)
        except ValueError:
            config[key] = raw
    return config


def read_config_file(path: Path | None) -> dict[str, Any]:
    """A YAML or JSON mapping from `path` (empty without one); a one-line error otherwise."""
    if path is None:
        return {}
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidRequest(f"cannot read config file {path}: {exc.strerror or exc}") from None
    try:
        import yaml

        data = yaml.safe_load(text) if Path(path).suffix in (".yaml", ".yml") else json.loads(text)
    except Exception as exc:  # yaml.YAMLError / ValueError: one line naming the file
        raise InvalidRequest(f"config file {path} is not valid: {str(exc).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise InvalidRequest(f"config file {path} must hold a mapping of settings (KEY: VALUE)")
    return data


def method_config(items: list[str] | None, path: Path | None) -> dict[str, Any] | None:
    """Method settings: the config file's, with --config KEY=VALUE items over them."""
    merged = {**read_config_file(path), **(parse_config(items) or {})}
    return merged or None


def start_session(ctx: typer.Context, workspace: Path, *, create: bool, model: str | None, device: str,
                  dtype: Dtype | None, device_map: str | None, method: str | None = None,
                  method_config: dict | None = None, readonly: bool = False, follow: bool = False) -> Session:
    """Session.open with the CLI's options (a failed first open leaves nothing behind)."""
    from editkit.session import Session

    return Session.open(Path(workspace), model=model, method=method, method_config=method_config,
                        device=device, dtype=dtype.value if dtype else None, device_map=device_map,
                        create=create, readonly=readonly, follow=follow, host=host_of(ctx))


@contextmanager
def open_session(ctx: typer.Context, workspace: Path, **options) -> Iterator[Session]:
    session = start_session(ctx, workspace, **options)
    try:
        yield session
    finally:
        session.close()


def fmt_score(value: Any) -> str:
    return "-" if value is None else f"{value:.2f}"


def fmt_seconds(value: Any) -> str:
    return "-" if value is None else f"{value:.2f}"


def console():
    """A rich console for stdout. Markup is off: prompts and generations are printed as typed."""
    from rich.console import Console

    return Console(markup=False, highlight=False, emoji=False)


def echo_json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2, ensure_ascii=False, default=str))
