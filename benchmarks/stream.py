"""What a long edit stream costs through a Session: the method's own seconds against the
session's overhead (measurement, state write, journal commit), disk added per edit against
what the method's state grows by, workspace size, peak RSS, reopen time, and rollback cost,
at several points of ONE stream.

    .venv/bin/python benchmarks/stream.py --edits 10000 --at 1,100,1000,10000
    .venv/bin/python benchmarks/stream.py --method grace --config steps=2 --edits 1000 --at 1,100,1000

The default method is the stand-in editor `append-test` (editkit.testing: it appends one
576-float row and the target per edit, as a codebook does, and costs next to nothing), so
what remains is editkit's own cost. Requests come from CounterFact's training file in
../shared when it is there (prompt, rephrase, neighbourhood probe), else are synthetic.
The `--window` edits before each point are measured by the session (measure=True: locality
baseline before, scores after) and give the point's figures (means over the window); the
others are applied with measure=False, so a 10,000-edit stream does not spend its hours on
measurement, whose cost per edit does not depend on the stream's length.

Writes benchmarks/results/stream-<method>-<time>.json and .md beside it.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import time
from pathlib import Path

import torch

from editkit.data import SHARED_FILES, shared_data_dir
from editkit.model import load_model
from editkit.schemas import EditRequest
from editkit.session import Session
from editkit.testing import stand_in_host

RESULTS = Path(__file__).resolve().parent / "results"


def requests(n: int, host) -> tuple[list[EditRequest], str]:
    shared = shared_data_dir().joinpath(*SHARED_FILES["counterfact-train"])
    if shared.is_file():
        cases = host.suite("counterfact")().read(str(shared), None, skip_invalid=True).cases
        reqs = [c.request for c in cases]
        source = f"CounterFact train ({len(reqs)} records, cycled with a suffix past them)"
    else:
        reqs = [EditRequest(prompt=f"The code name of project {i} is", target_new=f"Falcon {i}",
                            rephrases=[f"Project {i} is code-named"],
                            locality=[{"prompt": "The capital of France is", "answer": "Paris"}]) for i in range(n)]
        source = "synthetic (../shared absent)"
    out = []
    for i in range(n):  # past the file's end, the same records again as new prompts
        r = reqs[i % len(reqs)]
        out.append(r if i < len(reqs) else r.model_copy(update={"prompt": f"{r.prompt} ({i // len(reqs)})"}))
    return out, source


def disk_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def state_bytes(session) -> int:
    tensors, meta = session.editor.state_dict()
    return sum(t.numel() * t.element_size() for t in tensors.values()) + len(json.dumps(meta))


class Timers:
    """Seconds spent in the session's measurement, state write and journal commit."""

    def __init__(self, session):
        self.totals = {"measure": 0.0, "state": 0.0, "journal": 0.0}
        import editkit.session as session_module

        self._wrap(session_module, "item_baselines", "measure")
        self._wrap(session_module, "measure_items", "measure")
        self._wrap(session, "_write_state", "state")
        self._wrap(session.journal, "commit_turn", "journal")
        self._wrap(session.chunks, "remove", "state")

    def _wrap(self, owner, name, key):
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.totals[key] += time.perf_counter() - started

        setattr(owner, name, timed)

    def take(self) -> dict[str, float]:
        values, self.totals = self.totals, dict.fromkeys(self.totals, 0.0)
        return values


def open_session(ws, loaded, method, config, host):
    return Session.open(ws, loaded=loaded, method=method, method_config=config, host=host)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", default="append-test")
    parser.add_argument("--config", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--edits", type=int, default=10000)
    parser.add_argument("--at", default="1,100,1000,10000")
    parser.add_argument("--window", type=int, default=20, help="edits averaged at each point")
    parser.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--workdir", default=None, help="where the workspace goes (default: a results folder)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (1 on a shared machine)")
    parser.add_argument("--no-rollback", action="store_true",
                        help="skip the rollback timings (they replay up to half the stream: hours for a trained method)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    points = sorted({int(x) for x in args.at.split(",") if int(x) <= args.edits} | {args.edits})
    config = {}
    for item in args.config:
        key, _, raw = item.partition("=")
        try:
            config[key] = json.loads(raw)
        except ValueError:
            config[key] = raw

    host = stand_in_host()
    loaded = load_model(args.model, device="cpu")
    reqs, source = requests(args.edits, host)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    RESULTS.mkdir(parents=True, exist_ok=True)
    work = Path(args.workdir) if args.workdir else RESULTS / f"stream-{args.method}-{stamp}"
    ws = work / "workspace"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)

    session = open_session(ws, loaded, args.method, config, host)
    timers = Timers(session)
    rows, window, last_disk, last_state, last_point = [], [], disk_bytes(ws), state_bytes(session), 0
    started_all = time.perf_counter()
    for i, req in enumerate(reqs, start=1):
        upcoming = min(p for p in points if p >= i)
        measured = upcoming - i < args.window
        started = time.perf_counter()
        (record,) = session.edit(req, measure=measured)
        total = time.perf_counter() - started
        parts = timers.take()
        method_s = record.stats["seconds"]
        if measured:
            window.append({"total": total, "method": method_s, "storage": parts["state"] + parts["journal"],
                           "other": total - method_s - sum(parts.values()), "measure": parts["measure"],
                           "overhead": total - method_s})
        if i not in points:
            continue
        disk, state = disk_bytes(ws), state_bytes(session)
        row = {"edits": i, **{f"{k}_s": sum(w[k] for w in window) / len(window) for k in window[0]},
               "window": len(window), "elapsed_s": time.perf_counter() - started_all,
               "disk_bytes": disk, "disk_added_per_edit": (disk - last_disk) / (i - last_point),
               "state_bytes": state, "state_added_per_edit": (state - last_state) / (i - last_point),
               "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               "checkpoints": len(session.journal.checkpoint_ids()),
               "chunk_files": len(session.chunks.files())}
        session.close()
        t0 = time.perf_counter()
        session = open_session(ws, loaded, args.method, config, host)
        row["reopen_s"] = time.perf_counter() - t0
        timers = Timers(session)
        # Rollback on a copy (the stream goes on): an edit from the middle, and a recent one.
        rollbacks = () if args.no_rollback else (("rollback_middle", max(1, i // 2)), ("rollback_recent", max(1, i - 3)))
        for label, edit_id in rollbacks:
            copy = work / "copy"
            shutil.rmtree(copy, ignore_errors=True)
            shutil.copytree(ws, copy, ignore=shutil.ignore_patterns(".lock"))
            with open_session(copy, loaded, args.method, config, host) as other:
                t0 = time.perf_counter()
                other.rollback(edit_id)
                row[f"{label}_s"] = time.perf_counter() - t0
                row[f"{label}_id"] = edit_id
            shutil.rmtree(copy, ignore_errors=True)
        rows.append(row)
        last_disk, last_state, last_point, window = disk, state, i, []
        print(json.dumps(row), flush=True)
    session.close()

    result = {"method": args.method, "config": config, "edits": args.edits, "requests": source, "window": args.window,
              "model": loaded.name, "threads": torch.get_num_threads(), "wall_s": time.perf_counter() - started_all,
              "points": rows}
    if len(rows) > 1:
        by = {r["edits"]: r for r in rows}
        ref = by.get(100) or rows[0]
        result["overhead_ratio_last_vs_100"] = rows[-1]["overhead_s"] / ref["overhead_s"]
        result["storage_ratio_last_vs_100"] = rows[-1]["storage_s"] / ref["storage_s"]
        result["method_ratio_last_vs_100"] = rows[-1]["method_s"] / ref["method_s"]
    (RESULTS / f"stream-{args.method}-{stamp}.json").write_text(json.dumps(result, indent=1))
    (RESULTS / f"stream-{args.method}-{stamp}.md").write_text(markdown(result))
    print(markdown(result))
    shutil.rmtree(ws, ignore_errors=True)


def markdown(result: dict) -> str:
    lines = [f"# Stream cost: {result['method']} {result['config'] or ''}".rstrip(), "",
             f"{result['edits']} edits through one Session on `{result['model']}` ({result['threads']} threads); "
             f"requests: {result['requests']}. Seconds per edit are means over the {result['window']} measured "
             "edits before each point; overhead = edit wall time minus the method's own = measure + storage "
             "(state chunks + journal commit) + other (validation, hooks). Disk and state added per edit: "
             "since the previous point.", "",
             "| edits | method s | overhead s | measure s | storage s | other s | disk added/edit | "
             "state added/edit | workspace MiB | chunk files | checkpoints | peak RSS MiB | reopen s | "
             "rollback middle s | rollback recent s |",
             "|" + "---|" * 15]
    for r in result["points"]:
        lines.append(
            f"| {r['edits']} | {r['method_s']:.4f} | {r['overhead_s']:.4f} | {r['measure_s']:.4f} | "
            f"{r['storage_s']:.4f} | {r['other_s']:.4f} | {r['disk_added_per_edit'] / 1024:.1f} KiB | "
            f"{r['state_added_per_edit'] / 1024:.1f} KiB | {r['disk_bytes'] / 2**20:.1f} | {r['chunk_files']} | "
            f"{r['checkpoints']} | {r['peak_rss_mib']:.0f} | {r['reopen_s']:.2f} | "
            + " | ".join(f"{r[k + '_s']:.2f} (edit {r[k + '_id']})" if k + "_s" in r else "not run"
                         for k in ("rollback_middle", "rollback_recent")) + " |")
    if "overhead_ratio_last_vs_100" in result:
        lines += ["", f"Per edit at {result['points'][-1]['edits']} edits / at 100: overhead "
                      f"{result['overhead_ratio_last_vs_100']:.2f}x, storage alone "
                      f"{result['storage_ratio_last_vs_100']:.2f}x (target: within 1.5x); the method's own "
                      f"seconds {result['method_ratio_last_vs_100']:.2f}x."]
    lines.append(f"\nWall time: {result['wall_s']:.0f} s.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
