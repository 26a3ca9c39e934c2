"""Seconds per NMC edit against the memory's size, through a workspace (write + journal +
state save), on the default model: a memory pre-filled with N slots (random subject keys at
token ids no prompt uses, so they are never read), then the same few CounterFact edits timed
at each N. Shows what an edit costs once thousands of edits are in: the per-edit save writes
only the changed slot (tracks_changes), the read's similarity with every slot is the part
that grows (one (tokens x N) product per forward).

    .venv/bin/python benchmarks/nmc_scale.py --sizes 0,1000,10000,50000 --edits 5 [--whole-saves]

Writes benchmarks/results/nmc-scale-<time>.json and .md."""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from editkit.data import shared_file
from editkit.model import load_model
from editkit.plugins.nmc.pretrain import counterfact_requests
from editkit.session import Session

RESULTS = Path(__file__).resolve().parent / "results"


def prefilled(editor, n: int) -> tuple[dict, dict]:
    """The editor's state with n random slots keyed at canonical ids beyond the vocabulary."""
    tensors, meta = editor.state_dict()
    h, gen = editor.hidden, torch.Generator().manual_seed(n)
    unit = lambda: F.normalize(torch.randn(n, h, generator=gen), dim=-1)  # noqa: E731
    never = torch.arange(n, dtype=torch.long) + 10**9  # ids no input has
    tensors = {**tensors, "keys": unit(), "subjects": unit(), "names": never, "leads": never,
               "values": torch.randn(n, h, generator=gen) * 0.1, "ends": never, "usage": torch.ones(n)}
    return tensors, {**meta, "labels": [f"filler {i}" for i in range(n)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="0,1000,10000,50000")
    parser.add_argument("--edits", type=int, default=5)
    parser.add_argument("--whole-saves", action="store_true",
                        help="save the whole state at every edit, as before NMC tracked its changes (the ablation)")
    args = parser.parse_args()
    loaded = load_model(None, device="cpu")
    reqs = counterfact_requests(shared_file("counterfact"), args.edits)
    rows = []
    for n in [int(x) for x in args.sizes.split(",")]:
        root = Path(tempfile.mkdtemp(prefix="editkit-nmc-scale-"))
        with Session.open(root / "ws", loaded=loaded, method="nmc", method_config={"slots": n + 1000}) as session:
            if args.whole_saves:
                session.editor.tracks_changes = False
            if n:
                session.editor.load_state_dict(*prefilled(session.editor, n))
                session.editor.changes.mark_all()
            seconds, saves = [], []
            for req in reqs:
                started = time.perf_counter()
                record = session.edit(req, measure=False)[0]
                seconds.append(time.perf_counter() - started)
                saves.append(seconds[-1] - record.stats["seconds"])
            size = sum(f.stat().st_size for f in (root / "ws").rglob("*") if f.is_file())
        rows.append({"slots": n, "seconds_per_edit": seconds, "median": statistics.median(seconds[1:] or seconds),
                     "first_edit_seconds": seconds[0], "median_outside_write": statistics.median(saves[1:] or saves),
                     "workspace_bytes": size})
        print(json.dumps(rows[-1]))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"nmc-scale-{stamp}.json").write_text(json.dumps({"benchmark": "nmc-scale", "args": vars(args),
                                                                "rows": rows}, indent=2))
    saves = "whole state saved at every edit (ablation)" if args.whole_saves else "only the changes saved (default)"
    lines = [f"# NMC: seconds per edit against the memory's size (default model, workspace with journal; {saves})", "",
             "The first edit after pre-filling saves the whole memory once; the median is over the edits after it.", "",
             "| slots in memory | median s/edit | of which outside the write (journal, save) | first edit s | workspace MB |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['slots']} | {r['median']:.3f} | {r['median_outside_write']:.3f} | "
                     f"{r['first_edit_seconds']:.2f} | {r['workspace_bytes'] / 1e6:.1f} |")
    (RESULTS / f"nmc-scale-{stamp}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
