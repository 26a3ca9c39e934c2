"""One synthetic-gradient module shared by NMC memories at two layers, against a module per
memory (issue 19's feedback path shared among memory networks). On the default model:

1. collect (features, true gradient) pairs along the slow path of CounterFact training edits
   for a memory at each layer (`--layers`, default 0.6 and 0.7 of depth; the same edits);
2. fit a separate module per layer on its own pairs, and one shared module on both layers'
   pairs (same epochs, so the shared one sees twice the pairs);
3. on held-out edits (the dev file's first records), per layer: cosine(predicted, true
   gradient) at v = 0 and the share of edits one fast step absorbs (one batched forward of the
   line search), for the layer's own module, the shared module, the other layer's module
   (transfer) and the untrained module (the lens gradient alone).

    .venv/bin/python benchmarks/nmc_shared_feedback.py --records 256 --held-out 64

Writes benchmarks/results/nmc-shared-feedback-<time>.json and .md."""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from editkit.data import shared_file
from editkit.model import load_model
from editkit.plugins.nmc import NMCEditor
from editkit.plugins.nmc.pretrain import Samples, collect, counterfact_requests, edit_problem, fit

RESULTS = Path(__file__).resolve().parent / "results"


def measure(editor: NMCEditor, module, requests) -> dict:
    """Cosine to the true gradient at v = 0 and one-fast-step success with `module`."""
    own = editor.feedback
    editor.feedback = module
    cos, one = [], []
    try:
        for req in requests:
            problem = edit_problem(editor, req)
            v0 = torch.zeros(editor.hidden, device=editor.device)
            scored, grad = editor.true_gradient(problem, v0)
            with torch.no_grad():
                pred = editor.predicted_gradient(problem, scored, v0[None])[0]
            cos.append(float(F.cosine_similarity(pred, grad, dim=0)))
            _, s = editor.fast_step(problem, v0, scored)
            one.append(float(float(s.margin[0]) >= editor.config.margin))
    finally:
        editor.feedback = own
    return {"cosine_mean": statistics.mean(cos), "one_step_success": statistics.mean(one)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default="0.6,0.7")
    parser.add_argument("--records", type=int, default=256)
    parser.add_argument("--held-out", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=60)
    args = parser.parse_args()
    torch.manual_seed(0)
    loaded = load_model(None, device="cpu")
    layers = [float(x) for x in args.layers.split(",")]
    train = counterfact_requests(shared_file("counterfact-train"), args.records)
    held = counterfact_requests(shared_file("counterfact"), args.held_out)
    editors, samples, seconds = {}, {}, {}
    for layer in layers:
        editor = NMCEditor(loaded, {"layer": layer})
        editor.attach()
        started = time.perf_counter()
        samples[layer] = collect(editor, train, args.steps)
        seconds[layer] = time.perf_counter() - started
        editor.detach()
        editors[layer] = editor
    modules, fit_seconds = {}, {}
    for layer in layers:
        editor = editors[layer]
        editor.attach()
        untrained = copy.deepcopy(editor.feedback)
        started = time.perf_counter()
        fit(editor, samples[layer], epochs=args.epochs)
        fit_seconds[layer] = time.perf_counter() - started
        modules[layer] = copy.deepcopy(editor.feedback)
        editor.feedback = copy.deepcopy(untrained)
        if "shared" not in modules:
            started = time.perf_counter()
            fit(editor, Samples([row for x in layers for row in samples[x].rows]), epochs=args.epochs)
            fit_seconds["shared"] = time.perf_counter() - started
            modules["shared"] = copy.deepcopy(editor.feedback)
        modules[f"untrained@{layer}"] = untrained
        editor.detach()
    result = {"benchmark": "nmc-shared-feedback", "args": vars(args), "pairs": {str(k): len(v.rows) for k, v in samples.items()},
              "collect_seconds": {str(k): v for k, v in seconds.items()},
              "fit_seconds": {str(k): v for k, v in fit_seconds.items()}, "held_out": {}}
    for layer in layers:
        editor = editors[layer]
        editor.attach()
        other = next(x for x in layers if x != layer)
        rows = {"own module": modules[layer], "shared module": modules["shared"],
                f"module of layer {other} (transfer)": modules[other], "untrained (lens gradient)": modules[f"untrained@{layer}"]}
        result["held_out"][str(layer)] = {name: measure(editor, m, held) for name, m in rows.items()}
        result["held_out"][str(layer)]["block"] = editor.layer
        editor.detach()
        print(json.dumps({layer: result["held_out"][str(layer)]}))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"nmc-shared-feedback-{stamp}.json").write_text(json.dumps(result, indent=2))
    lines = ["# One synthetic-gradient module for NMC memories at two layers (default model)", "",
             f"{args.records} CounterFact training edits per layer ({args.steps} slow-path points each), "
             f"{args.held_out} held-out dev edits.", "",
             "| memory at | module | cosine(pred, true) | one fast step absorbs |", "|---|---|---|---|"]
    for layer, rows in result["held_out"].items():
        for name, r in rows.items():
            if name != "block":
                lines.append(f"| {layer} (block {rows['block']}) | {name} | {r['cosine_mean']:.3f} | {r['one_step_success']:.2f} |")
    (RESULTS / f"nmc-shared-feedback-{stamp}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
