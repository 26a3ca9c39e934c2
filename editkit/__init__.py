"""editkit: plugin-based lifelong model editing for Hugging Face causal language models."""

from editkit.hookspecs import hookimpl

__all__ = ["hookimpl", "EditRequest", "LocalityProbe", "Site", "Editor", "Intervention",
           "Session", "load_model", "get_host"]


def __getattr__(name):
    # Lazy exports keep `import editkit` (and plugin imports of editkit.hookimpl) light.
    if name in ("EditRequest", "LocalityProbe"):
        from editkit import schemas
        return getattr(schemas, name)
    if name == "Site":
        from editkit.sites import Site
        return Site
    if name in ("Editor", "Intervention"):
        from editkit import components
        return getattr(components, name)
    if name == "Session":
        from editkit.session import Session
        return Session
    if name == "load_model":
        from editkit.model import load_model
        return load_model
    if name == "get_host":
        from editkit.host import get_host
        return get_host
    raise AttributeError(name)
