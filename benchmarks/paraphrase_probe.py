"""Can the edited model write its own training paraphrases of an edit? (issue 18: WISE's Gen)

WISE learns an edit from its prompt (with generated context prefixes) and CounterFact's
rephrasings word the relation differently, so one way to carry an edit to them would be to train
on paraphrases of the edited sentence. editkit cannot download a paraphraser, so they would have
to come from the model being edited. This asks it, greedily, for three paraphrases of each
record's sentence (prompt + new target) through its chat template, and counts the lines that
would be usable training text: they differ from the sentence (case, spaces and the final period
aside), name the subject and still end on the target.

    .venv/bin/python benchmarks/paraphrase_probe.py --records 40

Writes benchmarks/results/paraphrase-probe-<time>.json and .md beside it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from editkit.data import shared_file
from editkit.model import load_model

RESULTS = Path(__file__).resolve().parent / "results"
ASK = "Paraphrase this sentence in three different ways, one per line:\n{sentence}"


def normal(text: str) -> str:
    return " ".join(text.lower().strip().rstrip(".").split())


def usable(line: str, sentence: str, subject: str, target: str) -> bool:
    """A line that could train the edit: another wording that names the subject and ends on the target."""
    n = normal(line)
    return bool(n) and n != normal(sentence) and subject.lower() in n and n.endswith(normal(target))


@torch.no_grad()
def paraphrases(loaded, sentence: str, max_new_tokens: int) -> list[str]:
    tok = loaded.tokenizer
    ids = tok.apply_chat_template([{"role": "user", "content": ASK.format(sentence=sentence)}],
                                  add_generation_prompt=True, return_tensors="pt")
    ids = (ids if isinstance(ids, torch.Tensor) else ids["input_ids"]).to(loaded.device)
    out = loaded.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                do_sample=False, pad_token_id=tok.pad_token_id or tok.eos_token_id)
    text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    return [line.strip(" -*0123456789.)") for line in text.splitlines() if line.strip()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="counterfact-train", help="shared data set (editkit.data.SHARED_FILES)")
    ap.add_argument("--records", type=int, default=40)
    ap.add_argument("--model", default=None, help="default: the default model")
    ap.add_argument("--max-new-tokens", type=int, default=80)
    args = ap.parse_args()
    records = json.loads(shared_file(args.data).read_text())[:args.records]
    loaded = load_model(args.model)
    rows = []
    for r in records:
        sentence = f"{r['prompt']} {r['target_new']}."
        lines = paraphrases(loaded, sentence, args.max_new_tokens)
        rows.append({"sentence": sentence, "lines": lines,
                     "usable": [ln for ln in lines if usable(ln, sentence, r["subject"], r["target_new"])],
                     "echoes": sum(normal(ln) == normal(sentence) for ln in lines)})
    n = max(1, len(rows))
    result = {"data": args.data, "records": len(rows), "model": loaded.name,
              "records_with_a_usable_line": sum(bool(x["usable"]) for x in rows) / n,
              "usable_lines_per_record": sum(len(x["usable"]) for x in rows) / n,
              "records_echoed": sum(x["echoes"] > 0 for x in rows) / n, "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"paraphrase-probe-{time.strftime('%Y%m%d-%H%M%S')}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    stem.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


def markdown(r: dict) -> str:
    lines = ["# Paraphrases the model writes of its own edits", "",
             f"{r['model']}, the first {r['records']} records of {r['data']}, greedy: records with at least one "
             f"usable line **{r['records_with_a_usable_line']:.2f}**, usable lines per record "
             f"{r['usable_lines_per_record']:.2f}, records whose answer repeats the sentence {r['records_echoed']:.2f}.",
             "", "| sentence | usable lines | all lines |", "|---|---|---|"]
    for x in r["rows"][:10]:
        lines.append(f"| {x['sentence']} | {' / '.join(x['usable']) or '-'} | {' / '.join(x['lines'])[:200]} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
