"""The package layout installs as documented: every folder is listed, the CLI entry exists."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_listed_in_pyproject():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = set()
    for package, folder in config["package-dir"].items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([package, *rel.parts]))
    # Nested mappings (editkit.plugins lives in plugins/, not editkit/plugins/) count once.
    assert sorted(found) == sorted(config["packages"])


def test_console_script_and_fixed_layout():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["editkit"] == "editkit.cli.main:main"
    for name in ("pyproject.toml", "editkit", "plugins", "adapters", "evaluation", "tests", "cli", "README.md"):
        assert (ROOT / name).exists(), name


def test_mapped_packages_import():
    import editkit.adapters
    import editkit.evaluation
    import editkit.plugins.ft

    assert editkit.plugins.ft.FTEditor.name == "ft"
    assert hasattr(editkit.adapters, "Adapter") and hasattr(editkit.evaluation, "Suite")


def test_the_layering_contract_covers_the_whole_core():
    """Every module and package of the core (editkit/) is a source of the contract that keeps
    evaluation, the CLI and plugins out of it (checked by lint-imports in `make test`)."""
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    core = next(c for c in contracts if c["name"].startswith("The core"))
    modules = {f"editkit.{p.stem}" for p in (ROOT / "editkit").glob("*.py") if p.stem != "__init__"}
    modules |= {f"editkit.{p.parent.name}" for p in (ROOT / "editkit").glob("*/__init__.py")}
    assert sorted(modules) == sorted(core["source_modules"])
    assert set(core["forbidden_modules"]) == {"editkit.evaluation", "editkit.cli", "editkit.plugins"}
