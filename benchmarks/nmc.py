"""Neural memory controller on the default model: the synthetic-gradient module meta-trained on
CounterFact training records and measured on held-out edits, then lifelong streams through the
evaluation runner beside WISE and GRACE (Rel/Gen/Loc and seconds per edit), on zsRE and on
CounterFact's dev file. `--records 0` skips pretraining: the streams then run nmc as a user gets
it (no --config: an untrained module that learns online).

    .venv/bin/python benchmarks/nmc.py --records 512 --held-out 64 --T 50
    .venv/bin/python benchmarks/nmc.py --records 0 --held-out 0 --T 1000 --methods nmc --suites counterfact

The lifelong runs go to benchmarks/results/lifelong-<suite>-T<T>/<method>/ (nmc: nmc-<feedback file>)
and resume there: a method whose T edits are journaled is not rerun (delete its folder to
measure it again). Writes
benchmarks/results/nmc-<time>.json and a readable nmc-<time>.md beside it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from editkit.evaluation.runner import run_eval
from editkit.model import load_model
from editkit.plugins.nmc import NMCEditor, save_feedback
from editkit.data import shared_file
from editkit.plugins.nmc.pretrain import counterfact_requests, evaluate_feedback, pretrain, sgd_rate

RESULTS = Path(__file__).resolve().parent / "results"


def feedback_phase(loaded, args, stamp: str) -> tuple[dict, str | None]:
    if not args.records and not args.feedback:
        return {}, None
    editor = NMCEditor(loaded, {})
    editor.attach()
    try:
        report: dict = {}
        train = counterfact_requests(shared_file("counterfact-train"), args.records)
        if args.feedback:
            editor.load_feedback(args.feedback)
            path = args.feedback
        else:
            started = time.perf_counter()
            report["pretrain"] = pretrain(editor, train, steps=args.steps, epochs=args.epochs)
            report["pretrain"]["seconds"] = time.perf_counter() - started
            path = str(RESULTS / f"nmc-feedback-{stamp}.safetensors")
            save_feedback(path, editor.feedback, {**editor.feedback_info(), "pretrain": report["pretrain"]})
        if args.held_out:
            started = time.perf_counter()
            held = evaluate_feedback(editor, counterfact_requests(shared_file("counterfact"), args.held_out),
                                     sgd_rate(editor, train[:32]))
            held["seconds"] = time.perf_counter() - started
            report["held_out"] = held
        return report, path
    finally:
        editor.detach()


def lifelong_phase(loaded, args, feedback: str | None, suite: str) -> dict:
    """One stream of T edits of `suite` (zsRE; CounterFact's dev file, held out from the training
    records the key layer and thresholds were chosen on). One run folder per method (and per
    feedback file for nmc), so a method is measured once and reused by later runs with other
    methods: benchmarks/results/lifelong-<suite>-T<T>/<name>/."""
    rows = {}
    for method in [m for m in args.methods.split(",") if m]:
        config, name = {}, method
        if method == "nmc" and feedback:
            config, name = {"feedback": feedback}, f"nmc-{Path(feedback).stem}"
        out = RESULTS / f"lifelong-{suite}-T{args.T}" / name
        report = run_eval(out, suite=suite, data=str(shared_file(suite)), methods=[method], edits=args.T,
                          loaded=loaded, configs={method: config}, plots=False,
                          progress=lambda m, d, n, what: print(f"  {m} {d}/{n}: {what}", flush=True))
        m = report["methods"][method]
        s = m["summary"]
        rows[method] = {"rel_tf": s["rel_tf"], "gen_tf": s["gen_tf"], "loc_tf": s["loc_tf"],
                        "rel_em": s["rel_em"], "gen_em": s["gen_em"], "loc_em": s["loc_em"],
                        "seconds_per_edit": m["seconds_per_edit"], "complete": m["complete"], "run_dir": str(out)}
    return {"T": args.T, "suite": suite, "methods": rows}


def markdown(result: dict) -> str:
    lines = [f"# NMC benchmark {result['stamp']}", ""]
    held = result.get("held_out")
    if held:
        lines += [f"## Synthetic-gradient module on {held['edits']} held-out CounterFact edits", "",
                  "| measure | value |", "|---|---|",
                  f"| cosine(predicted, true), mean / median | {held['cosine_mean']:.3f} / {held['cosine_median']:.3f} |",
                  f"| cosine, untrained module | {held['cosine_untrained_mean']:.3f} |",
                  f"| one-step success (trained / untrained / true gradient) | {held['one_step_success']:.2f} / "
                  f"{held['one_step_success_untrained']:.2f} / {held['one_step_success_true_gradient']:.2f} |",
                  f"| median steps to the margin: nmc / Adam / SGD (lr {held['sgd_lr']:.3g}) | "
                  f"{held['median_steps_nmc']} / {held['median_steps_adam']} / {held['median_steps_sgd']} |", ""]
    if result.get("pretrain"):
        p = result["pretrain"]
        lines += [f"Pretrained on {p['records']} edits ({p['samples']} gradients) in {p['seconds']:.0f} s.", ""]
    for life in result.get("lifelong", []):
        lines += [f"## Lifelong {life['suite']}, T = {life['T']} (measured after all edits; teacher-forced / "
                  "exact match)", "", "| method | Rel | Gen | Loc | s/edit |", "|---|---|---|---|---|"]
        for name, r in life["methods"].items():
            f = lambda k: "–" if r[k] is None else f"{r[k]:.2f}"  # noqa: E731
            lines.append(f"| {name} | {f('rel_tf')} / {f('rel_em')} | {f('gen_tf')} / {f('gen_em')} | "
                         f"{f('loc_tf')} / {f('loc_em')} | {f('seconds_per_edit')} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=512, help="CounterFact training edits for pretraining")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--held-out", type=int, default=64)
    parser.add_argument("--feedback", help="use this pretrained module instead of pretraining")
    parser.add_argument("--T", type=int, default=50, help="edits of each lifelong stream (0: skip)")
    parser.add_argument("--suites", default="zsre,counterfact", help="lifelong streams: zsre, counterfact (dev file)")
    parser.add_argument("--methods", default="nmc,grace,wise")
    args = parser.parse_args()
    for name in ("counterfact-train", "counterfact", "zsre"):
        shared_file(name)  # all three are there, or a clear error before any work
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    torch.manual_seed(0)
    loaded = load_model(None, device="cpu")
    result: dict = {"stamp": stamp, "torch_threads": torch.get_num_threads(), "args": vars(args)}
    phase, feedback = feedback_phase(loaded, args, stamp)
    result.update(phase, feedback_file=feedback)
    (RESULTS / f"nmc-{stamp}.json").write_text(json.dumps(result, indent=1, default=str))  # kept if later fails
    if args.T:
        result["lifelong"] = [lifelong_phase(loaded, args, feedback, suite) for suite in args.suites.split(",") if suite]
    (RESULTS / f"nmc-{stamp}.json").write_text(json.dumps(result, indent=1, default=str))
    (RESULTS / f"nmc-{stamp}.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
