"""Where NMC's locality goes: with N CounterFact *training* edits written (their subject keys;
values do not matter for who reads what), the share of neighbourhood prompts (same relation,
another subject) that read some slot at their last token, and the share of rephrases that read
their own fact's slot there, for several deferral thresholds. A neighbour that reads a slot is
a locality failure unless it names an edited subject (counted apart). Tune here, on training
records; measure on the dev stream with `editkit eval`.

    .venv/bin/python benchmarks/nmc_threshold.py --records 1000 --thresholds 0.5,0.6,0.7,0.8,0.9

Writes benchmarks/results/nmc-threshold-<time>.json and .md."""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from editkit.data import shared_file
from editkit.model import load_model
from editkit.plugins.nmc import NMCEditor
from editkit.plugins.nmc.memory import write_slot
from editkit.plugins.nmc.pretrain import counterfact_requests

RESULTS = Path(__file__).resolve().parent / "results"


def queries(editor: NMCEditor, text: str):
    enc = editor.tokenizer([text], return_tensors="pt")
    _, tokens, context = editor._capture(enc.input_ids, enc.attention_mask)
    return tokens[None], context[None], editor.canonical(enc.input_ids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1000)
    parser.add_argument("--thresholds", default="0.5,0.6,0.7,0.8,0.9")
    args = parser.parse_args()
    loaded = load_model(None, device="cpu")
    reqs = [r for r in counterfact_requests(shared_file("counterfact-train"), args.records) if r.rephrases and r.locality]
    editor = NMCEditor(loaded, {})
    editor.attach()
    try:
        memory, subjects = editor.memory, []
        for i, req in enumerate(reqs):  # every edit gets its own slot, as in a stream of new facts
            entry = editor.plan(req, str(i))[0].entry
            memory = write_slot(memory, len(memory), replace(entry, value=torch.ones_like(entry.value)), 1.0)
            subjects.append(req.subject.lower())
        probes = [(i, "rephrase", queries(editor, r.rephrases[0])) for i, r in enumerate(reqs)]
        probes += [(i, "neighbour", queries(editor, r.locality[0].prompt)) for i, r in enumerate(reqs)]
    finally:
        editor.detach()
    rows = []
    for t in [float(x) for x in args.thresholds.split(",")]:
        own = neighbour = naming = 0
        for i, kind, (tokens, context, ids) in probes:
            index, gate, _ = memory.address(tokens, context, ids, t, editor.config.gate_width)
            read = float(gate[0, -1]) > 0
            if kind == "rephrase":
                own += read and int(index[0, -1]) == i
            elif read:
                text = reqs[i].locality[0].prompt.lower()
                names = any(s and s in text for s in subjects)
                neighbour += not names
                naming += names
        n = len(reqs)
        rows.append({"threshold": t, "rephrase_reads_own_slot": own / n, "neighbour_reads_a_slot": neighbour / n,
                     "neighbour_naming_an_edited_subject_reads": naming / n})
        print(json.dumps(rows[-1]))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"nmc-threshold-{stamp}.json").write_text(json.dumps({"records": len(reqs), "rows": rows}, indent=2))
    lines = [f"# NMC deferral threshold on {len(reqs)} CounterFact training edits (all written)", "",
             "| threshold | rephrase reads its own slot | neighbour reads a slot (locality failure) | "
             "neighbour naming an edited subject reads one |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['threshold']} | {r['rephrase_reads_own_slot']:.3f} | {r['neighbour_reads_a_slot']:.3f} | "
                     f"{r['neighbour_naming_an_edited_subject_reads']:.3f} |")
    (RESULTS / f"nmc-threshold-{stamp}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
