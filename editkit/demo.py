"""The demo: apply the built-in edit set to a model and show what changed.

Generations "before" are taken before the first edit, "after" once every edit is in force
(the lifelong setting: later edits must not undo earlier ones). The per-edit scores are the
ones measured right after each edit (its EditRecord.metrics)."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from editkit.host import PluginHost
from editkit.model import LoadedModel
from editkit.schemas import EditRequest


@dataclass
class DemoEdit:
    id: int
    prompt: str
    target_new: str
    target_old: str | None
    before: str
    after: str
    rephrase: str | None
    rephrase_before: str | None
    rephrase_after: str | None
    metrics: dict[str, float | None] = field(default_factory=dict)  # reliability, generalization, locality
    seconds: float | None = None


@dataclass
class DemoResult:
    model: str
    method: str
    workspace: str | None  # None: a temporary workspace, removed afterwards
    edits: list[DemoEdit]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_demo(model: str | None = None, method: str | None = None, workspace: str | Path | None = None, *,
             edits: list[EditRequest | dict] | None = None, max_new_tokens: int = 12,
             method_config: dict | None = None, device: str = "auto", dtype: str | None = None,
             device_map: str | None = None, loaded: LoadedModel | None = None, host: PluginHost | None = None,
             progress: Callable[[str], None] | None = None) -> DemoResult:
    """Apply `edits` (default: the built-in suite) in a workspace (default: a fresh temporary
    one) and return, per edit, generations before/after for its prompt and first rephrase."""
    from editkit.host import get_host
    from editkit.session import Session, as_request

    say = progress or (lambda message: None)
    items = (host or get_host()).suite("builtin")().load() if edits is None else edits
    requests = [as_request(e, i) for i, e in enumerate(items)]
    with ExitStack() as stack:
        if workspace is None:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="editkit-demo-"))
            ws = Path(tmp) / "workspace"
        else:
            ws = Path(workspace)
        say("loading the model")
        session = stack.enter_context(Session.open(
            ws, model=model, method=method, method_config=method_config, device=device, dtype=dtype,
            device_map=device_map, loaded=loaded, host=host))
        probes = [r.prompt for r in requests] + [r.rephrases[0] for r in requests if r.rephrases]
        say("generating before the edits")
        before = dict(zip(probes, session.generate(probes, max_new_tokens=max_new_tokens)))
        records = []
        for i, request in enumerate(requests, start=1):
            say(f"applying edit {i}/{len(requests)}: {request.prompt} -> {request.target_new}")
            records += session.edit(request)
        say("generating after the edits")
        after = dict(zip(probes, session.generate(probes, max_new_tokens=max_new_tokens)))
        rows = []
        for request, record in zip(requests, records):
            rephrase = request.rephrases[0] if request.rephrases else None
            rows.append(DemoEdit(
                id=record.id, prompt=request.prompt, target_new=request.target_new,
                target_old=request.target_old, before=before[request.prompt], after=after[request.prompt],
                rephrase=rephrase, rephrase_before=before.get(rephrase) if rephrase else None,
                rephrase_after=after.get(rephrase) if rephrase else None,
                metrics={k: record.metrics.get(k) for k in ("reliability", "generalization", "locality")},
                seconds=record.stats.get("seconds")))
        return DemoResult(model=session.settings["model"], method=session.method,
                          workspace=None if workspace is None else str(ws), edits=rows)
