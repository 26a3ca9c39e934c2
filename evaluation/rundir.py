"""The run folder of an evaluation (layout in evaluation/runner.py): its protocols, plan
format and measurement files, shared by the runner that writes it and the report that reads
it."""

from __future__ import annotations

import json
import os
from pathlib import Path

from editkit.errors import WorkspaceError

PROTOCOLS = {
    "final": "T sequential edits, then every edit measured once after the last",
    "immediate": "every edit measured right after it is applied",
    "retention": "every k edits, all edits so far re-measured (with their locality probes)",
    "groups": "edits applied in groups of G from the unedited model (fresh workspace per group), "
              "each group measured after its last edit, averaged over the stream",
}
RUN_FORMAT = 1
PLAN_DEFAULTS = {"at": None, "turn_size": 1, "sample": None}  # what runs written before these keys used


def read_plan(path: Path) -> dict | None:
    """A run's (or sweep's) plan file, None where there is none yet; an unreadable one is an
    error naming it (the folder holds something else)."""
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise WorkspaceError(f"{path} is unreadable ({exc}); use another --out") from None


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:  # a torn last line from an interruption: that point is taken again
            break
    return rows


def append_jsonl(path: Path, row: dict) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(row, sort_keys=True) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
