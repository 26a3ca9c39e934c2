"""WISE: what each departure from the paper changes, one at a time, on one edit stream.

Every variant is the default (`preset=tuned`) with one field set back to the paper's value (or
one of editkit's additions switched on), plus both presets whole; each runs `editkit eval` on
the same records (final protocol: every edit measured after the last), and the workspace it
leaves is probed for routing: how many locality probes a side memory takes (score above the
threshold of the best-scoring memory), and how many of those go to the memory that holds
the probe's own record's edit.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/wise_ablation.py --suite counterfact \\
        --data ../shared/data/counterfact/counterfact-train-10k.json --edits 30 --jobs 2

Writes benchmarks/results/wise-ablation-<suite>-<time>.json and .md. Runs sharing the machine
(--jobs > 1) inflate seconds per edit alike; compare quality, and seconds only within a run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
PROBE_LOCK = threading.Lock()

# name -> (config overrides, what it is)
VARIANTS = {
    "tuned": ({}, "the default"),
    "margin_unit=1": ({"margin_unit": 1.0}, "paper: absolute margins"),
    "beta=20": ({"beta": 20.0}, "paper: beta 20"),
    "protect_energy=0": ({"protect_energy": 0.0}, "paper: plain side copy"),
    "lr=1": ({"lr": 1.0}, "paper: lr 1.0"),
    "unrelated_per_edit=1": ({"unrelated_per_edit": 1}, "paper: one unrelated prompt per edit"),
    "replay=0": ({"replay": 0}, "no replay (EasyEdit's hparams)"),
    "replay_mode=activation": ({"replay_mode": "activation", "stream_negatives": 8},
                               "paper: activation-only replay (own memory's edits kept in scope, 8 of other memories' out)"),
    "margin_mean=violated": ({"margin_mean": "violated"}, "EasyEdit: margins over violated pairs"),
    "early_stop_flat": ({"early_stop_flat": True}, "EasyEdit's early-stop meter"),
    "subject_negatives=8": ({"subject_negatives": 8}, "editkit: the prompt about 8 other subjects out of scope"),
    "stream_negatives=8": ({"stream_negatives": 8}, "paper B.3's half: 8 of other memories' edits out of scope"),
    "preset=paper": ({"preset": "paper"}, "WISE-Merge, the paper's settings"),
    "preset=paper-retrieve": ({"preset": "paper-retrieve"}, "WISE-Retrieve as the paper defines it"),
}
METRICS = ["rel_tf", "rel_em", "gen_tf", "gen_em", "loc_tf", "loc_em"]


def run_variant(name: str, overrides: dict, args, root: Path) -> dict:
    out = root / name.replace("=", "-")
    cmd = [sys.executable, "-m", "editkit.cli", "eval", "--suite", args.suite, "--data", args.data, "--method", "wise",
           "--edits", str(args.edits), "--out", str(out)]
    if args.model:
        cmd += ["--model", args.model]
    for key, value in overrides.items():
        cmd += ["--config", f"wise.{key}={json.dumps(value)}"]
    start = time.perf_counter()
    reused = (out / "report.json").exists()  # a finished run of this variant in --work: measured already
    if not reused:
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
        if done.returncode != 0:
            return {"name": name, "error": (done.stderr or done.stdout).strip().splitlines()[-1:]}
    report = json.loads((out / "report.json").read_text())
    method = report["methods"]["wise"]
    last = method["checkpoints"][-1]
    if method["config"] != {**method["config"], **overrides} and "preset" not in overrides:
        return {"name": name, "error": [f"{out} holds a run with another config"]}
    row = {"name": name, "overrides": overrides, "reused": reused, "wall_s": time.perf_counter() - start,
           "seconds_per_edit": last["seconds_per_edit"], **{k: last["summary"][k] for k in METRICS}}
    with PROBE_LOCK:  # one probe at a time: they load the model in this process
        row.update(probe_routing(out / "methods" / "wise" / "workspace", args, report))
    return row


def probe_routing(workspace: Path, args, report: dict) -> dict:
    """Share of locality probes (prompt alone) that a side memory takes, and of those, the
    share routed to the memory holding their own record's edit."""
    import torch
    import torch.nn.functional as F

    from editkit.host import get_host
    from editkit.plugins.wise.routing import reduce_scores
    from editkit.plugins.wise.rows import make_rows
    from editkit.session import Session

    records = get_host().suite(args.suite)().read(args.data, None, skip_invalid=True).requests[:args.edits]
    with Session.open(workspace, readonly=True, create=False) as session:
        ed = session.editor
        memory_of = {e["prompt"]: e["memory"] for e in ed.edits}
        probes = [(p.prompt, memory_of.get(r.prompt)) for r in records for p in r.locality]
        rows = make_rows(ed.tokenizer, [(p, None, None) for p, _ in probes]).to(ed.loaded.device)
        with torch.no_grad():
            x = ed._project(ed._capture(rows, block_out=False)["x"].float())
            scores = torch.stack([reduce_scores(F.linear(x, m).norm(dim=-1), rows.attn, ed.config.score_reduce)
                                  for m in (ed.memories[g] for g in range(len(ed.memories)))])
        best, idx = scores.max(0)
        routed = (best > ed.thresholds[idx]).tolist()
        own = sum(r and int(i) == m for r, i, (_, m) in zip(routed, idx.tolist(), probes))
        return {"memories": len(ed.memories), "probes": len(probes),
                "probes_routed": sum(routed) / max(len(probes), 1),
                "routed_to_own_memory": own / max(sum(routed), 1)}


def summary(result: dict) -> str:
    lines = [f"# WISE ablation: {result['suite']}, {result['edits']} edits, one stream",
             "", f"Data `{result['data']}` (first {result['edits']} records), default model, final protocol; "
             f"`{result['command']}`. Each row is the default with one change.", "",
             "| variant | what | Rel TF / EM | Gen TF / EM | Loc unchanged TF / EM | loc probes routed | of those, to own record's memory | memories | s/edit |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        if "error" in row:
            lines.append(f"| {row['name']} | {VARIANTS[row['name']][1]} | error: {row['error']} |  |  |  |  |  |  |")
            continue
        lines.append(f"| {row['name']} | {VARIANTS[row['name']][1]} | {row['rel_tf']:.3f} / {row['rel_em']:.3f} | "
                     f"{row['gen_tf']:.3f} / {row['gen_em']:.3f} | {row['loc_tf']:.3f} / {row['loc_em']:.3f} | "
                     f"{row['probes_routed']:.2f} | {row['routed_to_own_memory']:.2f} | {row['memories']} | "
                     f"{row['seconds_per_edit']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", default="counterfact")
    parser.add_argument("--data", required=True)
    parser.add_argument("--edits", type=int, default=30)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names (default: all)")
    parser.add_argument("--jobs", type=int, default=1, help="variants run at once (each on its own process)")
    parser.add_argument("--model", default=None)
    parser.add_argument("--work", type=Path, default=None, help="where the eval runs are kept (default: a new folder under /tmp)")
    args = parser.parse_args()
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    root = args.work or Path(f"/tmp/wise-ablation-{stamp}")
    root.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        rows = list(pool.map(lambda n: run_variant(n, VARIANTS[n][0], args, root), names))
    result = {"suite": args.suite, "data": args.data, "edits": args.edits, "rows": rows, "jobs": args.jobs,
              "threads": os.environ.get("OMP_NUM_THREADS"), "command": " ".join(["benchmarks/wise_ablation.py", *sys.argv[1:]])}
    RESULTS.mkdir(exist_ok=True)
    base = RESULTS / f"wise-ablation-{args.suite}-{stamp}"
    base.with_suffix(".json").write_text(json.dumps(result, indent=1))
    base.with_suffix(".md").write_text(summary(result))
    print(summary(result))
    print(f"wrote {base}.json and .md")


if __name__ == "__main__":
    main()
