"""Suites turn a dataset into EditRequests. Registered through the plugin host so
third-party plugins can add their own (hook: register_suites)."""

from __future__ import annotations

from typing import ClassVar

from editkit.hookspecs import hookimpl
from editkit.schemas import EditRequest

from .builtin_edits import BUILTIN_EDITS


class Suite:
    """A named source of edit requests."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""

    def load(self, path: str | None = None, limit: int | None = None) -> list[EditRequest]:
        raise NotImplementedError


class BuiltinSuite(Suite):
    name = "builtin"
    description = "editkit's own small counterfactual edit set (no data files needed)"

    def load(self, path: str | None = None, limit: int | None = None) -> list[EditRequest]:
        edits = [EditRequest.model_validate(e) for e in BUILTIN_EDITS]
        return edits[:limit] if limit is not None else edits


@hookimpl
def register_suites(register):
    register(BuiltinSuite)
