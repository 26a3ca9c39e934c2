"""Errors a user can act on. Each carries a one-line reason; the CLI prints it as is."""


class EditkitError(Exception):
    """Base class: anything raised on purpose by editkit for bad input or bad state."""


class InvalidRequest(EditkitError, ValueError):
    """An edit request, file, option or config value is malformed; nothing was changed."""


class EditVetoed(EditkitError):
    """A plugin's before_edit hook refused the edit."""

    def __init__(self, plugin: str, reason: str):
        super().__init__(f"edit vetoed by plugin '{plugin}': {reason}")
        self.plugin = plugin
        self.reason = reason


class PluginError(EditkitError):
    """A plugin could not be loaded, or two plugins claim the same name."""


class UnknownComponent(EditkitError):
    """A method, intervention, suite or adapter name that no loaded plugin registers."""


class UnsupportedArchitecture(EditkitError):
    """No adapter handles this model's config.model_type."""


class WorkspaceError(EditkitError):
    """A workspace is missing, made for another model, or its state fails verification."""


class ModelLoadError(EditkitError):
    """A model could not be found or loaded."""
