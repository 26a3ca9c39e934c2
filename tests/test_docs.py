"""The plugin documentation keeps up with the hook contract (in the spirit of datasette's
tests/test_docs.py): every hookspec has a docstring, a heading in docs/plugins.md with its
exact signature, and at least one test that implements it."""

from __future__ import annotations

import inspect
import re
import tomllib
from pathlib import Path

import pytest

from editkit import hookspecs
from editkit.host import ENTRY_POINT_GROUP

ROOT = Path(__file__).resolve().parents[1]
PLUGINS_DOC = ROOT / "docs" / "plugins.md"
EXAMPLE = ROOT / "examples" / "editkit-example-plugin"


def hook_specs() -> dict[str, object]:
    """name -> function, for every function in editkit.hookspecs marked as a hookspec."""
    specs = {name: fn for name, fn in vars(hookspecs).items()
             if inspect.isfunction(fn) and hasattr(fn, "editkit_spec")}
    assert specs, "no hookspecs found (did the marker's project name change?)"
    return specs


SPECS = hook_specs()


def signature(fn) -> str:
    return f"{fn.__name__}({', '.join(inspect.signature(fn).parameters)})"


@pytest.fixture(scope="module")
def doc() -> str:
    return PLUGINS_DOC.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def hookimpls_in_tests() -> set[str]:
    """Names of functions decorated with @hookimpl anywhere under tests/ (this file aside)."""
    names: set[str] = set()
    for path in (ROOT / "tests").rglob("*.py"):
        if path.name != Path(__file__).name:
            names.update(re.findall(r"@hookimpl[^\n]*\n\s*def\s+(\w+)\s*\(", path.read_text(encoding="utf-8")))
    return names


@pytest.mark.parametrize("name", sorted(SPECS))
def test_hookspec_has_a_docstring(name):
    doc_text = inspect.getdoc(SPECS[name]) or ""
    assert len(doc_text.split()) >= 5, f"hookspec {name} needs a docstring saying when it is called and what to do"


@pytest.mark.parametrize("name", sorted(SPECS))
def test_hookspec_is_documented(doc, name):
    headings = [line for line in doc.splitlines() if line.startswith("#")]
    expected = signature(SPECS[name])
    assert any(f"`{expected}`" in h for h in headings), (
        f"docs/plugins.md needs a heading with `{expected}` (headings mentioning it: "
        f"{[h for h in headings if name in h]})")


@pytest.mark.parametrize("name", sorted(SPECS))
def test_hookspec_is_exercised_by_a_test(hookimpls_in_tests, name):
    assert name in hookimpls_in_tests, f"no test under tests/ implements the hook {name} with @hookimpl"


def test_documented_hooks_exist(doc):
    """A heading that looks like a hook but names none is stale documentation."""
    documented = set(re.findall(r"^#+ `(\w+)\(", doc, flags=re.MULTILINE))
    assert documented - set(SPECS) == set(), f"docs/plugins.md documents hooks that do not exist: {documented - set(SPECS)}"


def test_switches_and_contract_are_documented(doc):
    for term in ("EDITKIT_PLUGINS", "EDITKIT_DISABLE_PLUGINS", "EDITKIT_EXAMPLE_MAX_TARGET_CHARS",
                 f"[project.entry-points.{ENTRY_POINT_GROUP}]", "editkit.hookimpl",
                 "attach()", "detach()", "apply(request)", "state_dict()", "load_state_dict(",
                 "register_adapters", "editkit.adapters.Adapter", "model_types", "pickle", "seed"):
        assert term in doc, f"docs/plugins.md does not mention {term}"


def test_example_plugin_is_packaged_as_documented():
    meta = tomllib.loads((EXAMPLE / "pyproject.toml").read_text(encoding="utf-8"))
    assert meta["project"]["name"] == "editkit-example-plugin"
    assert meta["project"]["version"] == "0.1.0"
    assert meta["project"]["entry-points"][ENTRY_POINT_GROUP] == {"example": "editkit_example_plugin"}
    assert (EXAMPLE / "README.md").is_file()
    init = (EXAMPLE / "src" / "editkit_example_plugin" / "__init__.py").read_text(encoding="utf-8")
    assert '__version__ = "0.1.0"' in init
