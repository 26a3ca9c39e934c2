"""Rule vs learned NMC controller on the default model, on streams that need the controller's
decisions: CounterFact facts edited, other facts of an edited fact's subject edited (both must
hold), facts edited again through their prompt or their rephrase with another target (the
second must win), facts reverted to the model's own answer, and the same streams with fewer
slots than facts. Held-out facts: the dev file's, plus training-file facts that share a subject
and were left out of the controller's training (control_train.sibling_groups, second half).

Each stream is played through the real editor (fast and slow writes, the real reads); at the
end every edited fact's prompt and rephrase is scored against its latest answer, teacher
forced (TF: all target tokens greedy) and by exact match of the greedy continuation (EM),
per kind of last edit. The learned controller is trained first (`--mode synthetic|true`) on
the training file's facts unless `--controller FILE` is given.

    .venv/bin/python benchmarks/nmc_controller.py --facts 300 --length 120 --streams 2

Writes benchmarks/results/nmc-controller-<time>.json and .md."""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch

from editkit.data import shared_file
from editkit.model import load_model
from editkit.plugins.nmc import NMCEditor
from editkit.plugins.nmc.control_train import (Fact, controller_requests, evaluate_controllers, fact_table,
                                               make_stream, settings_of, train_controller)
from editkit.plugins.nmc.controller import load_controller, save_controller
from editkit.schemas import EditRequest
from editkit.scoring import exact_match, greedy_token_ids, teacher_forced_accuracy
from editkit.tokens import encode_pair

RESULTS = Path(__file__).resolve().parent / "results"


def requests_of(args) -> tuple[list[EditRequest], list[EditRequest]]:
    train, test = controller_requests(shared_file("counterfact-train"), shared_file("counterfact"),
                                      args.train_records, args.facts)
    return train, [r for r in test if r.rephrases and r.target_old and r.subject]


def play(loaded, reqs: list[EditRequest], events, config: dict) -> dict:
    editor = NMCEditor(loaded, config)
    editor.attach()
    started = time.perf_counter()
    actions: dict[str, int] = {}
    try:
        for ev in events:
            req = reqs[ev.fact]
            prompt = req.prompt if ev.variant == 0 else req.rephrases[0]
            stats = editor.apply(EditRequest(prompt=prompt, target_new=ev.label, subject=req.subject))
            actions[stats["action"]] = actions.get(stats["action"], 0) + 1
        seconds = time.perf_counter() - started
        latest = {}
        for ev in events:
            latest[ev.fact] = ev
        prompts, targets, kinds = [], [], []
        for f, ev in latest.items():
            for p in (reqs[f].prompt, reqs[f].rephrases[0]):
                prompts.append(p), targets.append(ev.label), kinds.append(ev.kind)
        tf = teacher_forced_accuracy(loaded, prompts, targets)
        lengths = [len(encode_pair(loaded.tokenizer, p, t)[1]) for p, t in zip(prompts, targets)]
        em = [exact_match(loaded.tokenizer.decode(ids, skip_special_tokens=True), t)
              for ids, t in zip(greedy_token_ids(loaded, prompts, lengths), targets)]
    finally:
        editor.detach()
    out = {"seconds_per_edit": seconds / len(events), "actions": actions}
    for kind in sorted(set(kinds)) + ["all"]:
        pick = [i for i, k in enumerate(kinds) if kind == "all" or k == kind]
        out[kind] = {"prompts": len(pick), "tf": statistics.mean(float(tf[i] == 1.0) for i in pick),
                     "em": statistics.mean(em[i] for i in pick)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--facts", type=int, default=300, help="dev-file facts in the held-out pool")
    parser.add_argument("--train-records", type=int, default=600)
    parser.add_argument("--length", type=int, default=120, help="edits per stream")
    parser.add_argument("--streams", type=int, default=2, help="streams per memory size")
    parser.add_argument("--train-streams", type=int, default=300)
    parser.add_argument("--mode", default="synthetic", choices=["synthetic", "true"])
    parser.add_argument("--controller", help="a trained controller file (skips training)")
    args = parser.parse_args()
    torch.manual_seed(0)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    loaded = load_model(None, device="cpu")
    train_reqs, test_reqs = requests_of(args)
    probe = NMCEditor(loaded, {})
    probe.attach()
    try:
        s = settings_of(probe.config)
        result: dict = {"benchmark": "nmc-controller", "args": vars(args)}
        test_facts = fact_table(probe, test_reqs)
        if args.controller:
            path, net = args.controller, load_controller(args.controller, "cpu")
        else:
            started = time.perf_counter()
            train_facts = fact_table(probe, train_reqs)
            net, result["train"] = train_controller(train_facts, s, mode=args.mode, streams=args.train_streams)
            result["train"]["seconds"] = time.perf_counter() - started
            path = str(RESULTS / f"nmc-controller-{args.mode}-{stamp}.safetensors")
            save_controller(path, net, {**probe.feedback_info(), "train": result["train"]})
        result["controller_file"] = path
        result["simulated_held_out"] = evaluate_controllers(test_facts, s, {"rule": None, "learned": net},
                                                            length=args.length)
    finally:
        probe.detach()
    facts = [Fact([], f.own, f.new, f.subject) for f in test_facts]
    rng = random.Random(7)
    runs = []
    for n in range(args.streams):
        events = make_stream(facts, rng, args.length)
        for slots in (4096, args.length // 3):
            for name, config in (("rule", {"slots": slots}),
                                 ("learned", {"slots": slots, "controller": "learned", "controller_file": path})):
                row = play(loaded, test_reqs, events, config)
                runs.append({"stream": n, "slots": slots, "controller": name, **row})
                print(json.dumps(runs[-1]))
    result["streams"] = runs
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"nmc-controller-{stamp}.json").write_text(json.dumps(result, indent=2))
    (RESULTS / f"nmc-controller-{stamp}.md").write_text(markdown(result))
    print(markdown(result))


def markdown(result: dict) -> str:
    lines = ["# NMC controllers on streams that need decisions (default model)", "",
             f"Controller file: {result['controller_file']}", "",
             "| slots | controller | last edit | prompts | TF | EM |", "|---|---|---|---|---|---|"]
    groups: dict[tuple, list] = {}
    for r in result["streams"]:
        for kind in ("new", "again", "revert", "all"):
            if kind in r:
                groups.setdefault((r["slots"], r["controller"], kind), []).append(r[kind])
    for (slots, name, kind), rows in sorted(groups.items(), key=lambda x: (-x[0][0], x[0][2], x[0][1])):
        n = sum(r["prompts"] for r in rows)
        tf = sum(r["tf"] * r["prompts"] for r in rows) / n
        em = sum(r["em"] * r["prompts"] for r in rows) / n
        lines.append(f"| {slots} | {name} | {kind} | {n} | {tf:.3f} | {em:.3f} |")
    lines += ["", "Seconds per edit and actions:"]
    for r in result["streams"]:
        lines.append(f"- stream {r['stream']}, {r['slots']} slots, {r['controller']}: "
                     f"{r['seconds_per_edit']:.2f} s/edit, {r['actions']}")
    lines += ["", "Simulated reads on the held-out facts (share of prompts reading their latest answer):", ""]
    for name, scores in result["simulated_held_out"].items():
        lines.append(f"- {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items() if k != "prompts"))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
