"""`editkit compare RUN...`: several evaluation runs' reports merged into one table and one
set of overlaid plots. Runs compare only where they measured the same thing: the same suite,
the same records in the same order, protocol and seed; anything else is refused unless
forced (then the report says what differs)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from editkit.errors import InvalidRequest
from editkit.store import atomic_write_text

from .report import load_report, markdown, write_plots

# What two runs must share for their figures to be comparable.
SAME = ("suite", "data", "protocol", "seed", "select", "edits", "at", "sample", "turn_size", "fingerprint")


def _records(report: dict) -> list:
    return [(e["record"], e["prompt"], e["target_new"])
            for m in report["methods"].values() for e in m["per_edit"]][: report["edits"]]


def compare_runs(runs: list[str | Path], force: bool = False) -> dict[str, Any]:
    """One report whose methods are every run's methods, named RUN/METHOD."""
    if len(runs) < 2:
        raise InvalidRequest("compare needs at least two run directories")
    reports = [(Path(r), load_report(r)) for r in runs]
    first_path, first = reports[0]
    differences = []
    for path, report in reports[1:]:
        for key in SAME:
            if report.get(key) != first.get(key):
                differences.append(f"{path.name}: {key} {report.get(key)!r} vs {first.get(key)!r} in {first_path.name}")
        if _records(report) != _records(first):
            differences.append(f"{path.name}: other records than {first_path.name}")
    if differences and not force:
        raise InvalidRequest("runs are not comparable (" + "; ".join(differences[:4])
                             + ("; ..." if len(differences) > 4 else "") + "); pass --force to compare anyway")
    merged = copy.deepcopy(first)
    merged["methods"] = {}
    for path, report in reports:
        for name, method in report["methods"].items():
            merged["methods"][f"{path.name}/{name}"] = method
    merged["compared_runs"] = [str(p) for p, _ in reports]
    merged["differences"] = differences
    return merged


def render_comparison(merged: dict[str, Any], out: str | Path, plots: bool = True) -> list[Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(merged).replace("# editkit evaluation", "# editkit comparison", 1)
    text += "\nRuns: " + ", ".join(f"`{r}`" for r in merged["compared_runs"]) + "\n"
    if merged["differences"]:
        text += "\n**Not like for like** (compared with --force): " + "; ".join(merged["differences"]) + "\n"
    atomic_write_text(out / "compare.md", text)
    atomic_write_text(out / "compare.json", json.dumps(merged, indent=1, sort_keys=True))
    paths = [out / "compare.md", out / "compare.json"]
    if plots:
        paths += write_plots(merged, out)
    return paths
