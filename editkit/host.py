"""The plugin host: loads built-in and entry-point plugins the same way and keeps what
they register (editors, interventions, adapters, suites, CLI commands)."""

from __future__ import annotations

import importlib
import importlib.metadata
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import pluggy

from editkit import hookspecs
from editkit.errors import PluginError, UnknownComponent, UnsupportedArchitecture

ENTRY_POINT_GROUP = "editkit"

# Built-in plugins: name -> module. They load through the same path as entry points.
BUILTIN_PLUGINS = {
    "adapters": "editkit.adapters",
    "evaluation": "editkit.evaluation.suites",
    "ft": "editkit.plugins.ft",
    "wise": "editkit.plugins.wise",
    "grace": "editkit.plugins.grace",
    "ph3": "editkit.plugins.ph3",
    "reweave": "editkit.plugins.reweave",
    "nmc": "editkit.plugins.nmc",
    "ultraedit": "editkit.plugins.ultraedit",
}

KINDS = ("editors", "interventions", "adapters", "suites", "commands")


@dataclass
class PluginInfo:
    name: str
    version: str
    source: str  # "builtin" or "entry point (<distribution>)"
    registers: dict[str, list[str]] = field(default_factory=dict)


@dataclass(frozen=True)
class Candidate:
    name: str
    version: str
    source: str
    load: Callable[[], Any]


def _editkit_version() -> str:
    try:
        return importlib.metadata.version("editkit")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def _names(value: str | None) -> set[str]:
    return {n.strip() for n in (value or "").split(",") if n.strip()}


def builtin_candidates() -> list[Candidate]:
    version = _editkit_version()
    return [Candidate(name, version, "builtin", lambda m=module: importlib.import_module(m))
            for name, module in BUILTIN_PLUGINS.items()]


def entry_point_candidates() -> list[Candidate]:
    found = []
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = ep.dist
        version = dist.version if dist else "unknown"
        source = f"entry point ({dist.name})" if dist else "entry point"
        found.append(Candidate(ep.name, version, source, ep.load))
    return found


class PluginHost:
    """Loads plugins and answers "which class implements X?"."""

    def __init__(self, candidates: Iterable[Candidate] | None = None, env: dict | None = None):
        env = os.environ if env is None else env
        self.pm = pluggy.PluginManager("editkit")
        self.pm.add_hookspecs(hookspecs)
        self.plugins: dict[str, PluginInfo] = {}
        self.failures: dict[str, str] = {}  # plugin name -> cause
        self.registry: dict[str, dict[str, tuple[Any, str]]] = {k: {} for k in KINDS}
        allowed, blocked = _names(env.get("EDITKIT_PLUGINS")), _names(env.get("EDITKIT_DISABLE_PLUGINS"))
        if candidates is None:
            candidates = builtin_candidates() + entry_point_candidates()
        for cand in candidates:
            if (allowed and cand.name not in allowed) or cand.name in blocked:
                continue
            self._load(cand)
        self._collect()

    # ---- loading -----------------------------------------------------------------------
    def _load(self, cand: Candidate) -> None:
        if cand.name in self.plugins:
            self.failures[cand.name] = f"a plugin named '{cand.name}' is already loaded"
            return
        try:
            self.pm.register(cand.load(), name=cand.name)
        except Exception as exc:  # a broken plugin must not take the others down
            self.failures[cand.name] = f"{type(exc).__name__}: {exc}"
            return
        self.plugins[cand.name] = PluginInfo(cand.name, cand.version, cand.source)

    def add_plugin(self, module: Any, name: str, version: str = "0", source: str = "added") -> None:
        """Register a plugin object at run time (tests, notebooks) and collect its registrations."""
        self._load(Candidate(name, version, source, lambda: module))
        self._collect()

    def _collect(self) -> None:
        self.registry = {k: {} for k in KINDS}
        for info in self.plugins.values():
            info.registers = {}
        for kind in KINDS:
            for plugin, impl in self._impls(f"register_{kind}"):
                try:
                    impl(register=self._registrar(kind, plugin))
                except PluginError:
                    raise
                except Exception as exc:
                    self.failures[plugin] = f"register_{kind} failed: {type(exc).__name__}: {exc}"
                    self._forget(plugin)

    def _impls(self, hook: str):
        """(plugin name, call) per implementation, in registration order. Called one by one
        so a failure or a veto can be pinned on the plugin that caused it."""
        for impl in getattr(self.pm.hook, hook).get_hookimpls():
            if impl.plugin_name in self.plugins:
                def call(_impl=impl, **kwargs):  # pluggy lets an impl take a subset of the args
                    return _impl.function(*[kwargs[a] for a in _impl.argnames])
                yield impl.plugin_name, call

    def _forget(self, plugin: str) -> None:
        for kind in KINDS:
            for name in [n for n, (_, owner) in self.registry[kind].items() if owner == plugin]:
                del self.registry[kind][name]
        self.pm.unregister(name=plugin)
        self.plugins.pop(plugin, None)

    def _registrar(self, kind: str, plugin: str) -> Callable:
        def register(obj: Any, name: str | None = None) -> None:
            if kind == "commands":  # register(name, typer_app)
                name, obj = obj, name
            label = name or getattr(obj, "name", None) or getattr(obj, "__name__", None)
            if not label:
                raise PluginError(f"plugin '{plugin}' registered an unnamed {kind[:-1]}")
            if label in self.registry[kind]:
                other = self.registry[kind][label][1]
                raise PluginError(f"{kind[:-1]} '{label}' is registered by two plugins: '{other}' and '{plugin}'")
            self.registry[kind][label] = (obj, plugin)
            self.plugins[plugin].registers.setdefault(kind, []).append(label)
        return register

    # ---- lookups -----------------------------------------------------------------------
    def get(self, kind: str, name: str) -> Any:
        try:
            return self.registry[kind][name][0]
        except KeyError:
            known = ", ".join(sorted(self.registry[kind])) or "none"
            hint = f" (plugins that failed to load: {', '.join(sorted(self.failures))})" if self.failures else ""
            raise UnknownComponent(f"unknown {kind[:-1]} '{name}'; available: {known}{hint}") from None

    def editor(self, name: str):
        return self.get("editors", name)

    def intervention(self, name: str):
        return self.get("interventions", name)

    def suite(self, name: str):
        return self.get("suites", name)

    def adapter_for(self, model) -> Any:
        model_type = getattr(model.config, "model_type", None)
        for adapter_cls, _ in self.registry["adapters"].values():
            if model_type in adapter_cls.model_types:
                return adapter_cls(model)
        supported = sorted(t for cls, _ in self.registry["adapters"].values() for t in cls.model_types)
        raise UnsupportedArchitecture(
            f"no adapter for model_type '{model_type}'; supported: {', '.join(supported)}. "
            "Add one by subclassing editkit.adapters.Adapter and registering it from a plugin's "
            "register_adapters hook (see docs/plugins.md)")

    # ---- lifecycle ---------------------------------------------------------------------
    def veto(self, session, request) -> tuple[str, str] | None:
        """First (plugin, reason) that vetoes `request`, or None."""
        for plugin, fn in self._impls("before_edit"):
            reason = fn(session=session, request=request)
            if reason:
                return plugin, str(reason)
        return None

    def notify(self, hook: str, **kwargs) -> None:
        getattr(self.pm.hook, hook)(**kwargs)


_host: PluginHost | None = None


def get_host() -> PluginHost:
    """The process-wide host, loaded on first use."""
    global _host
    if _host is None:
        _host = PluginHost()
    return _host


def reset_host() -> None:
    """Forget the loaded host (tests, or after installing a plugin in a running process)."""
    global _host
    _host = None
