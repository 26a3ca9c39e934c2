"""WISE on the default model: speed of the fast path against the full-model path, the
uncached ablation end to end, lifelong quality on zsRE, generation overhead and memory.

    .venv/bin/python benchmarks/wise.py --T 1,10 --ablation-edits 2

The end-to-end comparison is an ablation built here, not EasyEdit's procedure: EasyEdit caches
its context prefixes and stops early too (docs/wise.md quotes a measured run of EasyEdit's own
WISE instead). Only the per-step ratio (fast path vs full model, same loss) is like for like.

Writes benchmarks/results/wise-<time>.json and a readable wise-<time>.md beside it.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch

from editkit.data import shared_file
from editkit.scoring import agreement, answer_predictions, teacher_forced_accuracy
from editkit.generation import generate
from editkit.host import get_host
from editkit.model import load_model
from editkit.plugins.wise import WISEEditor
from editkit.plugins.wise.merge import ties_merge
from editkit.schemas import EditRequest

RESULTS = Path(__file__).resolve().parent / "results"
# An ablation of editkit's speed-ups together with the tuned departures: whole model every
# step, prefixes regenerated every edit, no early stopping, the paper's absolute margins, one
# unrelated prompt, no replay, plain side copy (lr and beta stay the default's).
UNCACHED_ABLATION = {"fast_path": False, "cache_contexts": False, "early_stop": False, "margin_unit": 1.0,
             "unrelated_per_edit": 1, "replay": 0, "protect_energy": 0.0}


def requests(n: int) -> list[EditRequest]:
    """The first n zsRE dev records, through the zsre suite, as this benchmark always used
    them: the prompt, the new target, one rephrase and the locality probe."""
    reqs = get_host().suite("zsre")().load(shared_file("zsre"), limit=n)
    return [EditRequest(prompt=r.prompt, target_new=r.target_new, rephrases=r.rephrases[:1],
                        locality=r.locality[:1]) for r in reqs]


def seeded(editor, req, seed):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return editor.apply(req)


def quality(loaded, reqs, before_loc) -> dict:
    rel = teacher_forced_accuracy(loaded, [r.prompt for r in reqs], [r.target_new for r in reqs])
    gen = teacher_forced_accuracy(loaded, [r.rephrases[0] for r in reqs], [r.target_new for r in reqs])
    after = answer_predictions(loaded, [r.locality[0].prompt for r in reqs], [r.locality[0].answer for r in reqs])
    loc = [agreement(b, a) for b, a in zip(before_loc, after)]
    n = len(reqs)
    return {"rel": sum(rel) / n, "gen": sum(gen) / n, "loc": sum(loc) / n}


def run_edits(loaded, config, reqs, before_loc, checkpoints=None) -> tuple[dict, WISEEditor]:
    """Apply `reqs` in order with one editor; measure quality after the last edit, and also
    after each count in `checkpoints` (edit i is seeded with i, so the first T edits of a
    longer stream are exactly a T-edit run: measuring there is the paper's protocol for T)."""
    editor = WISEEditor(loaded, config)
    editor.attach()
    times, steps, at = [], [], {}
    try:
        for i, req in enumerate(reqs):
            t = time.perf_counter()
            stats = seeded(editor, req, i)
            times.append(time.perf_counter() - t)
            steps.append(stats["steps"])
            if checkpoints and i + 1 in checkpoints and i + 1 < len(reqs):
                at[i + 1] = _measured(editor, loaded, reqs[:i + 1], before_loc[:i + 1], times, steps)
                print("T", i + 1, at[i + 1], flush=True)
        result = _measured(editor, loaded, reqs, before_loc, times, steps)
        if checkpoints:
            at[len(reqs)] = result
            return at, editor
        return result, editor
    except BaseException:
        editor.detach()
        raise


def _measured(editor, loaded, reqs, before_loc, times, steps) -> dict:
    result = quality(loaded, reqs, before_loc)
    tensors, meta = editor.state_dict()
    result.update(s_per_edit=sum(times) / len(times), s_first_edit=times[0],
                  s_per_edit_after_first=(sum(times[1:]) / (len(times) - 1)) if len(times) > 1 else None,
                  mean_steps=sum(steps) / len(steps), memories=len(editor.memories),
                  state_bytes=sum(v.numel() * v.element_size() for v in tensors.values()),
                  meta_bytes=len(json.dumps(meta)))
    return result


def step_speed(loaded, req, steps: int) -> dict:
    """s/step of the fast and the full-model path on the same edit, same seed, same loss."""
    out = {}
    for fast in (True, False):
        editor = WISEEditor(loaded, {"fast_path": fast, "early_stop": False, "steps": steps})
        editor.attach()
        try:
            editor._contexts()
            editor._margin_unit()  # session-level caches made before the clock starts
            t = time.perf_counter()
            stats = seeded(editor, req, 0)
            out["fast" if fast else "full"] = {"s_per_step": (time.perf_counter() - t) / stats["steps"],
                                               "trajectory": stats["trajectory"]}
        finally:
            editor.detach()
    a, b = out["fast"]["trajectory"], out["full"]["trajectory"]
    out["max_loss_diff"] = max(abs(x - y) for x, y in zip(a, b))
    out["ratio"] = out["full"]["s_per_step"] / out["fast"]["s_per_step"]
    return out


def gen_time(loaded, prompts, repeats=2) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        generate(loaded, prompts, max_new_tokens=24)
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", default="1,10,50,100", help="comma-separated numbers of sequential edits")
    ap.add_argument("--ablation-edits", type=int, default=2, help="edits run with the uncached whole-model ablation")
    ap.add_argument("--speed-steps", type=int, default=10, help="steps timed per path for s/step")
    ap.add_argument("--model", default=None, help="model id or directory (default: the embedded default model)")
    args = ap.parse_args()
    ts = [int(t) for t in args.T.split(",")]
    loaded = load_model(args.model, device="cpu")
    reqs_all = requests(max(ts + [args.ablation_edits]))
    before_all = answer_predictions(loaded, [r.locality[0].prompt for r in reqs_all],
                                    [r.locality[0].answer for r in reqs_all])
    report: dict = {"model": loaded.name, "threads": torch.get_num_threads(),
                    "load_average_start": list(__import__("os").getloadavg())}

    report["step_speed"] = step_speed(loaded, reqs_all[0], args.speed_steps)
    print("step speed", {k: v for k, v in report["step_speed"].items() if k in ("ratio", "max_loss_diff")}, flush=True)

    n_ref = args.ablation_edits
    ref, editor = run_edits(loaded, UNCACHED_ABLATION, reqs_all[:n_ref], before_all[:n_ref])
    editor.detach()
    ours, editor = run_edits(loaded, {}, reqs_all[:n_ref], before_all[:n_ref])
    editor.detach()
    report["end_to_end"] = {"edits": n_ref, "uncached_ablation": ref, "ours": ours,
                            "ratio": ref["s_per_edit"] / ours["s_per_edit"]}
    print("end to end", report["end_to_end"], flush=True)

    # One stream of max(T) edits, measured after each T (see run_edits).
    report["quality"], last = run_edits(loaded, {}, reqs_all[:max(ts)], before_all[:max(ts)], checkpoints=set(ts))
    prompts = [r.prompt for r in reqs_all[:4]] + [r.locality[0].prompt for r in reqs_all[:4]]
    # Generation overhead after the largest T, with and without WISE alternated, best of three
    # each (a shared machine's load swings more than the overhead itself). Retrieve: the
    # stream's own memories. Merge: the same shards TIES-merged into one memory (what merge
    # mode serves: one memory whatever the number of edits).
    tensors, meta = last.state_dict()
    stack, side_bytes = last.memories.dense(), last.memories.nbytes()
    report["generation"] = {"batch": len(prompts), "new_tokens": 24, "after_edits": max(ts),
                            "retrieve_memories": len(last.memories)}
    plain = float("inf")
    for mode in ("retrieve", "merge"):
        if mode == "merge":
            last.detach()
            last = WISEEditor(loaded, {"mode": "merge"})
            last.attach()
            merged = ties_merge(list(stack), last.config.ties_density)
            last.load_state_dict({**tensors, "memory": merged, "packed_bits": tensors["packed_bits"][:0],
                                  "packed_values": tensors["packed_values"][:0], "packed_offsets": torch.zeros(1, dtype=torch.int64),
                                  "thresholds": tensors["thresholds"].min()[None],
                                  "keys": tensors["keys"].sum(0, keepdim=True)},
                                 {**meta, "mode": "merge", "edits": [{**e, "memory": 0} for e in meta["edits"]]})
        with_wise = float("inf")
        for _ in range(3):
            with_wise = min(with_wise, gen_time(loaded, prompts, repeats=1))
            last._bypass = True
            plain = min(plain, gen_time(loaded, prompts, repeats=1))
            last._bypass = False
        report["generation"][f"{mode}_s"] = with_wise
    last.detach()
    g = report["generation"]
    g["plain_s"] = plain
    g["retrieve_overhead"], g["merge_overhead"] = g["retrieve_s"] / plain - 1, g["merge_s"] / plain - 1
    out_f, in_f = stack.shape[1:]
    report["memory"] = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                        "bytes_per_dense_memory": out_f * in_f * 4, "side_memory_bytes_after_max_T": side_bytes,
                        "state_bytes_after_max_T": sum(v.numel() * v.element_size() for v in tensors.values()),
                        "bytes_per_edit_meta": len(json.dumps(meta)) / max(1, len(meta["edits"]))}
    report["load_average_end"] = list(__import__("os").getloadavg())

    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for run in report["step_speed"].values():
        if isinstance(run, dict):
            run["trajectory"] = [round(x, 5) for x in run["trajectory"]]
    (RESULTS / f"wise-{stamp}.json").write_text(json.dumps(report, indent=2))
    s, e, gq = report["step_speed"], report["end_to_end"], report["generation"]
    lines = [f"# WISE benchmark {stamp} ({report['model']}, CPU, {report['threads']} threads, load {report['load_average_start'][0]:.1f})", "",
             f"s/step: fast {s['fast']['s_per_step']:.3f}, full model {s['full']['s_per_step']:.3f} "
             f"-> {s['ratio']:.2f}x (max loss difference {s['max_loss_diff']:.2e})",
             f"s/edit over {e['edits']} edits: ours {e['ours']['s_per_edit']:.1f}, uncached ablation {e['uncached_ablation']['s_per_edit']:.1f} "
             f"-> {e['ratio']:.2f}x; ours Rel/Gen/Loc {e['ours']['rel']:.2f}/{e['ours']['gen']:.2f}/{e['ours']['loc']:.2f}, "
             f"ablation {e['uncached_ablation']['rel']:.2f}/{e['uncached_ablation']['gen']:.2f}/"
             f"{e['uncached_ablation']['loc']:.2f}", "",
             "| T | Rel | Gen | Loc | s/edit | mean steps | memories |", "|---|---|---|---|---|---|---|"]
    for t, q in report["quality"].items():
        lines.append(f"| {t} | {q['rel']:.3f} | {q['gen']:.3f} | {q['loc']:.3f} | {q['s_per_edit']:.1f} | {q['mean_steps']:.1f} | {q['memories']} |")
    lines += ["", f"generation ({gq['batch']} prompts x {gq['new_tokens']} tokens, after {gq['after_edits']} edits): plain {gq['plain_s']:.2f}s, "
              f"merge {gq['merge_s']:.2f}s ({100 * gq['merge_overhead']:+.1f}%), retrieve/{gq['retrieve_memories']} memories "
              f"{gq['retrieve_s']:.2f}s ({100 * gq['retrieve_overhead']:+.1f}%)",
              f"memory: peak RSS {report['memory']['peak_rss_mib']:.0f} MiB, {report['memory']['bytes_per_dense_memory']} bytes per "
              f"dense side memory, {report['memory']['side_memory_bytes_after_max_T']} bytes of side memories after the "
              f"largest T (finished ones packed), "
              f"{report['memory']['bytes_per_edit_meta']:.0f} bytes of JSON per edit"]
    (RESULTS / f"wise-{stamp}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
