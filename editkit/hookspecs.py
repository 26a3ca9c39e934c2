"""The hook contract between editkit and its plugins (project name "editkit").

Registration hooks receive a `register` callback; call it once per thing you provide.
Lifecycle hooks are called by a Session around every edit and rollback.
A plugin module implements any subset, decorated with `editkit.hookimpl`.
"""

import pluggy

hookspec = pluggy.HookspecMarker("editkit")
hookimpl = pluggy.HookimplMarker("editkit")


@hookspec
def register_editors(register):
    """Provide editing methods: ``register(EditorClass)`` for each subclass of
    ``editkit.Editor``. The class's ``name`` is what ``--method`` selects."""


@hookspec
def register_interventions(register):
    """Provide interventions (change how the model uses knowledge, take no edit requests):
    ``register(InterventionClass)`` for each subclass of ``editkit.Intervention``."""


@hookspec
def register_adapters(register):
    """Provide architecture adapters: ``register(AdapterClass)`` for each subclass of
    ``editkit.adapters.Adapter``; its ``model_types`` name the ``config.model_type`` values it serves."""


@hookspec
def register_suites(register):
    """Provide evaluation suites: ``register(SuiteClass)`` for each subclass of
    ``editkit.evaluation.Suite``; its ``name`` is what ``--suite`` selects."""


@hookspec
def register_commands(register):
    """Add CLI command groups: ``register(name, typer_app)`` mounts ``editkit NAME ...``."""


@hookspec
def before_edit(session, request):
    """Called before an edit changes anything. Return a string to veto the edit (the
    string is the reason shown to the user), or None to let it through."""


@hookspec
def after_edit(session, request, record):
    """Called after an edit is applied and journaled; `record` is its ``EditRecord``."""


@hookspec
def after_rollback(session, edit_id):
    """Called after edit `edit_id` was rolled back and the model rebuilt without it."""
