"""editkit-example-plugin: a small, complete third-party editkit plugin.

editkit finds this module through the ``editkit`` entry point group (see pyproject.toml)
and registers it with its plugin manager; every function below decorated with
``editkit.hookimpl`` implements one hook of ``editkit.hookspecs``:

* ``register_editors``  - the ``bias`` editor (``editkit edit ... --method bias``)
* ``register_commands`` - the ``editkit example hello`` command group
* ``before_edit``       - a policy: veto edits whose target is too long
"""

from __future__ import annotations

import os

from editkit import hookimpl

from .editor import BiasConfig, BiasEditor

__version__ = "0.1.0"
DISTRIBUTION = "editkit-example-plugin"
MAX_TARGET_ENV = "EDITKIT_EXAMPLE_MAX_TARGET_CHARS"

__all__ = ["BiasConfig", "BiasEditor", "MAX_TARGET_ENV", "__version__", "plugin_version"]


def plugin_version() -> str:
    """The installed distribution's version (falls back to this module's when run from source)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:
        return __version__


@hookimpl
def register_editors(register):
    register(BiasEditor)


@hookimpl
def register_commands(register):
    from .commands import make_app

    register("example", make_app())


@hookimpl
def before_edit(session, request):
    """Veto any edit (whatever its method) whose target is longer than the limit in
    EDITKIT_EXAMPLE_MAX_TARGET_CHARS. Unset or empty means no limit. The variable is read on
    every call, so it can change while a process runs."""
    raw = os.environ.get(MAX_TARGET_ENV, "").strip()
    if not raw:
        return None
    try:
        limit = int(raw)
        if limit < 0:
            raise ValueError
    except ValueError:
        # A broken setting should not silently allow everything, nor crash the session.
        return f"{MAX_TARGET_ENV} must be a non-negative whole number of characters, not {raw!r}"
    length = len(request.target_new)
    if length > limit:
        return (f"target is {length} characters long, more than the {limit} that "
                f"{MAX_TARGET_ENV} allows")
    return None
