"""UltraEdit on the default model, final protocol, teacher-forced and exact-match figures:

- one CounterFact stream (the first N records of counterfact-train-10k, turns of 100), measured
  at T = 100, 1,000 and 10,000: edits accumulate, so the first T edits of the stream are exactly
  a T-edit run, and the first T records are measured on the state right after edit T;
- seconds per edit along the stream, the norm of the accumulated weight delta after every turn,
  and a perplexity check before and after the whole stream (the built-in unrelated pool, which
  the default null-space projection is estimated on, and zsRE's NQ locality probes, which it is
  not);
- zsRE dev at T = 500 (turns of 100); turns of 1 and 10 at T = 100 (CounterFact);
- ablations at T = 1,000 (CounterFact, turns of 100): each option of the default config off.

The defaults were tuned on counterfact-dev-1k only; nothing here feeds back into them. The
tuning comparisons are the same runs on that file (--data):

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ultraedit.py --shared
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ultraedit.py --data ../shared/data/counterfact/counterfact-dev-1k.json \
        --stream 1000 --checkpoints 100,1000 --zsre 0 --small-turns "" --ablations 1000

Writes benchmarks/results/ultraedit-<time>.json (after every phase) and ultraedit-<time>.md.
The unedited model's locality baselines are cached in benchmarks/results/ (by data file,
record count and model fingerprint).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from editkit.scoring import ItemBaseline, item_baselines, measure_items, summarise
from editkit.evaluation.suites import CounterFactSuite, ZsreSuite
from editkit.model import load_model
from editkit.plugins.ultraedit import UltraEditEditor
from editkit.unrelated import UNRELATED

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TRAIN = DATA / "counterfact" / "counterfact-train-10k.json"
ZSRE = DATA / "zsre" / "zsre-dev-500.json"
RESULTS = Path(__file__).resolve().parent / "results"
SHOWN = ("rel_tf", "rel_em", "gen_tf", "gen_em", "loc_tf", "loc_em")
ABLATIONS = {
    "no null space": {"null_space": False},
    "no earlier-keys term (preserve 0)": {"preserve": 0.0},
    "UltraEdit's solve (preserve 0, no null space)": {"preserve": 0.0, "null_space": False},
    "no warm-up": {"warmup": False},
    "full whitening (StableEdit)": {"whitening": True},
    "paper's lr 1e-6": {"lr": 1e-6},
}


def baselines_for(loaded, name: str, requests) -> list[ItemBaseline]:
    path = RESULTS / f"baselines-{name}-{len(requests)}-{loaded.fingerprint}.json"
    if path.exists():
        return [ItemBaseline.from_dict(b) for b in json.loads(path.read_text())]
    started = time.perf_counter()
    bases = item_baselines(loaded, requests)
    path.write_text(json.dumps([b.to_dict() for b in bases]))
    print(f"  baselines for {len(requests)} {name} records in {time.perf_counter() - started:.0f}s", flush=True)
    return bases


def measure(loaded, requests, bases) -> dict:
    started = time.perf_counter()
    s = summarise(measure_items(loaded, requests, bases))
    return {**{k: s[k] for k in SHOWN}, "items": len(requests), "measure_seconds": time.perf_counter() - started}


@torch.no_grad()
def perplexity(loaded, texts: list[str]) -> float:
    """exp(mean next-token cross-entropy) over every token after the first of each text."""
    total, count = 0.0, 0
    for start in range(0, len(texts), 32):
        enc = loaded.tokenizer(texts[start:start + 32], return_tensors="pt", padding=True)
        logits = loaded.model(**enc).logits[:, :-1].float()
        labels = enc.input_ids[:, 1:].clone()
        labels[enc.attention_mask[:, 1:] == 0] = -100
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100,
                                                 reduction="sum")
        total, count = total + float(loss), count + int((labels != -100).sum())
    return math.exp(total / count)


def run_stream(loaded, requests, bases, config: dict, turn: int, checkpoints: list[int], before: int,
               ppl_texts: dict[str, list[str]] | None = None, log: str = "") -> dict:
    """Edit `requests` in turns; at each checkpoint T measure the first T records."""
    out: dict = {"config": config, "turn": turn, "checkpoints": {}, "trace": []}
    if before:
        out["before"] = measure(loaded, requests[:before], bases[:before])
    if ppl_texts:
        out["perplexity_before"] = {k: perplexity(loaded, v) for k, v in ppl_texts.items()}
    editor = UltraEditEditor(loaded, config)
    started = time.perf_counter()
    editor.attach()
    out["attach_seconds"] = time.perf_counter() - started
    editing = 0.0
    try:
        for start in range(0, len(requests), turn):
            t0 = time.perf_counter()
            editor.apply_turn(requests[start:start + turn])
            seconds = time.perf_counter() - t0
            editing += seconds
            done = min(start + turn, len(requests))
            out["trace"].append({"edits": done, "size": done - start, "seconds": seconds,
                                 "delta_norm": editor.delta_norm()})
            if done in checkpoints:
                recent = out["trace"][-10:]
                point = measure(loaded, requests[:done], bases[:done])
                point.update(seconds_per_edit=editing / done,
                             seconds_per_edit_recent=sum(r["seconds"] for r in recent) / sum(
                                 r["size"] for r in recent),
                             delta_norm=editor.delta_norm())
                out["checkpoints"][done] = point
                print(f"  {log} T={done}: " + " ".join(f"{k}={point[k]:.3f}" for k in SHOWN)
                      + f" s/edit={point['seconds_per_edit']:.3f} measured in {point['measure_seconds']:.0f}s",
                      flush=True)
        out["editing_seconds"] = editing
        if ppl_texts:
            out["perplexity_after"] = {k: perplexity(loaded, v) for k, v in ppl_texts.items()}
    finally:
        editor.detach()
    return out


def markdown(result: dict) -> str:
    f = lambda v: "–" if v is None else f"{v:.2f}"  # noqa: E731
    pair = lambda p, k: f"{f(p[k + '_tf'])} / {f(p[k + '_em'])}"  # noqa: E731
    lines = [f"# UltraEdit benchmark {result['stamp']}", "",
             f"Default model, CPU, {result['torch_threads']} torch thread(s){', machine shared' if result['shared'] else ''}. "
             "Figures are teacher-forced / exact match; Loc is 'unchanged from the unedited model'. "
             "Defaults tuned on counterfact-dev-1k only.", ""]
    s = result.get("stream")
    if s:
        lines += [f"## CounterFact stream ({result['data']}), turns of {s['turn']} (first T records measured after "
                  "edit T)", "",
                  "| T | Rel | Gen | Loc | s/edit (cumulative) | s/edit (last 10 turns) | ‖Δ‖ | measured in |",
                  "|---|---|---|---|---|---|---|---|"]
        for t, p in s["checkpoints"].items():
            lines.append(f"| {t} | {pair(p, 'rel')} | {pair(p, 'gen')} | {pair(p, 'loc')} | "
                         f"{p['seconds_per_edit']:.3f} | {p['seconds_per_edit_recent']:.3f} | {p['delta_norm']:.0f} | "
                         f"{p['measure_seconds']:.0f} s |")
        if "before" in s:
            b = s["before"]
            lines += ["", f"Unedited model on the first {b['items']} records: Rel {pair(b, 'rel')}, "
                      f"Gen {pair(b, 'gen')}."]
        last = max(s["checkpoints"], key=int, default=None)
        if last is not None and "editing_seconds" in s:
            total = s["editing_seconds"] + s["checkpoints"][last]["measure_seconds"]
            lines += [f"Whole stream: attach {s['attach_seconds']:.0f} s, editing {s['editing_seconds']:.0f} s, "
                      f"final measurement of {last} records {s['checkpoints'][last]['measure_seconds']:.0f} s: "
                      f"{total / 60:.1f} min (baselines of the unedited model not counted)."]
        if "perplexity_after" in s:
            lines += ["", "| perplexity | before | after the stream |", "|---|---|---|"]
            for k in s["perplexity_before"]:
                lines.append(f"| {k} | {s['perplexity_before'][k]:.2f} | {s['perplexity_after'][k]:.2f} |")
        norms = [r for r in s["trace"] if r["edits"] in (100, 500, 1000, 2000, 5000, 10000)]
        if norms:
            lines += ["", "‖Δ‖ (Frobenius norm of all accumulated weight deltas) along the stream: "
                      + ", ".join(f"{r['edits']}: {r['delta_norm']:.0f}" for r in norms) + "."]
    z = result.get("zsre")
    if z:
        p = z["checkpoints"][max(z["checkpoints"], key=int)]
        lines += ["", f"## zsRE dev, T = {p['items']}, turns of {z['turn']}", "",
                  "| Rel | Gen | Loc | s/edit |", "|---|---|---|---|",
                  f"| {pair(p, 'rel')} | {pair(p, 'gen')} | {pair(p, 'loc')} | {p['seconds_per_edit']:.3f} |"]
        if "before" in z:
            lines += ["", f"Unedited: Rel {pair(z['before'], 'rel')}, Gen {pair(z['before'], 'gen')}."]
    small = result.get("small_turns")
    if small:
        lines += ["", f"## Turn size at T = 100 ({result['data']}, first 100 records)", "",
                  "| turn size | Rel | Gen | Loc | s/edit |", "|---|---|---|---|---|"]
        for size, r in small.items():
            p = r["checkpoints"][max(r["checkpoints"], key=int)]
            lines.append(f"| {size} | {pair(p, 'rel')} | {pair(p, 'gen')} | {pair(p, 'loc')} | "
                         f"{p['seconds_per_edit']:.3f} |")
    abl = result.get("ablations")
    if abl:
        lines += ["", f"## Ablations at T = {abl['T']} ({result['data']}, turns of 100)", "",
                  "| config | Rel | Gen | Loc | ‖Δ‖ |", "|---|---|---|---|---|"]
        for name, r in abl["runs"].items():
            p = r["checkpoints"][max(r["checkpoints"], key=int)]
            lines.append(f"| {name} | {pair(p, 'rel')} | {pair(p, 'gen')} | {pair(p, 'loc')} | {p['delta_norm']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(TRAIN), help="CounterFact file of the stream, turn-size and ablation runs")
    parser.add_argument("--stream", type=int, default=10_000, help="CounterFact records in the stream (0: skip)")
    parser.add_argument("--checkpoints", default="100,1000,10000")
    parser.add_argument("--turn", type=int, default=100)
    parser.add_argument("--before", type=int, default=1000, help="measure the unedited model on this many records")
    parser.add_argument("--zsre", type=int, default=500, help="zsRE dev edits (0: skip)")
    parser.add_argument("--small-turns", default="1,10", help="turn sizes measured at T=100 (empty: skip)")
    parser.add_argument("--ablations", type=int, default=1000, help="T of the ablation runs (0: skip)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--shared", action="store_true", help="note in the report that the machine was shared")
    parser.add_argument("--config", default="{}", help="JSON overrides of the default config")
    args = parser.parse_args()
    for path in (Path(args.data), ZSRE):
        if not path.is_file():
            raise SystemExit(f"{path} not found: this benchmark needs ../shared/data")
    torch.set_num_threads(args.threads)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    config = json.loads(args.config)
    loaded = load_model(None, device="cpu")
    result: dict = {"stamp": stamp, "torch_threads": torch.get_num_threads(), "shared": args.shared,
                    "args": vars(args), "config": UltraEditEditor.make_config(config).model_dump(mode="json")}

    def save() -> None:
        (RESULTS / f"ultraedit-{stamp}.json").write_text(json.dumps(result, indent=1))
        (RESULTS / f"ultraedit-{stamp}.md").write_text(markdown(result))

    need = max([args.stream, args.ablations, 100 if args.small_turns else 0])
    name = Path(args.data).stem
    result["data"] = name
    cf = CounterFactSuite().load(args.data, limit=need) if need else []
    cf_bases = baselines_for(loaded, name, cf) if cf else []
    if args.stream:
        checkpoints = [int(t) for t in args.checkpoints.split(",") if t and int(t) <= args.stream]
        zsre_loc = [f"{r['loc']} {r['loc_ans']}" for r in json.loads(ZSRE.read_text())]
        result["stream"] = run_stream(loaded, cf[:args.stream], cf_bases[:args.stream], config, args.turn,
                                      checkpoints, min(args.before, args.stream),
                                      {"unrelated pool (in-sample for null space)": list(UNRELATED),
                                       "zsRE NQ locality probes": zsre_loc}, log="stream")
        save()
    if args.zsre:
        zs = ZsreSuite().load(str(ZSRE), limit=args.zsre)
        result["zsre"] = run_stream(loaded, zs, baselines_for(loaded, "zsre-dev", zs), config, 100, [len(zs)],
                                    len(zs), log="zsre")
        save()
    if args.small_turns:
        result["small_turns"] = {}
        for size in [int(s) for s in args.small_turns.split(",") if s]:
            result["small_turns"][size] = run_stream(loaded, cf[:100], cf_bases[:100], config, size, [100], 0,
                                                     log=f"turns of {size}")
            save()
    if args.ablations:
        result["ablations"] = {"T": args.ablations, "runs": {}}
        for name, override in ABLATIONS.items():
            result["ablations"]["runs"][name] = run_stream(
                loaded, cf[:args.ablations], cf_bases[:args.ablations], {**config, **override}, 100,
                [args.ablations], 0, log=name)
            save()
    save()
    print(markdown(result))


if __name__ == "__main__":
    main()
