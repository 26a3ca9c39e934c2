"""Which block's token states tell an edit's subject apart (WISE's subject_gate)?

Opens the workspace of an `editkit eval --method wise` run read-only and, for the records the run
measured (at most 100), compares each edit's subject key (the unit state of its subject's last
token in its prompt) with the token states of prompts on their own, as generation sees them, at
each block of --blocks and at the edited layer's MLP input (`x`, the states key_gate reads):

- a rephrasing against its own edit's subject key: the best cosine over its tokens (what
  subject_gate must keep);
- a neighbourhood prompt (locality probe) against every edit whose wording gate it passes
  (key_gate): the best cosine over its tokens and those edits (what subject_gate must reject).

Attention sinks (each prompt's first token, and states SINK_RATIO x the point's typical norm over
the unrelated pool) are left out as subject_gate leaves them out at its block: a sink token is never
compared, and an edit whose subject ends on one has no key there (so it passes, as the gate lets
it); --keep-sinks compares every token (the gate before 6df7ea2).

Reported per point: quantiles of both, and for each --gates value the share of rephrasings kept
and of all neighbourhood prompts that would still pass.

    .venv/bin/python benchmarks/wise_subject_keys.py --run RUN --blocks 6,12,18

Writes benchmarks/results/wise-subject-keys-<time>.json and .md beside it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from editkit.plugins.wise.routing import sink_tokens, typical_norm
from editkit.plugins.wise.rows import make_rows
from editkit.session import Session
from editkit.sites import Site
from editkit.tokens import subject_position

RESULTS = Path(__file__).resolve().parent / "results"


@torch.no_grad()
def token_states(editor, texts: list[str], blocks: list[int], typical: dict[str, float] | None = None,
                 batch: int = 32) -> list[dict]:
    """Per text: {point: (T, d) unit token states} for each block and `x`, with the tokens that are
    attention sinks at each point given its `typical` norm set to NaN (None: none left out),
    and its key_gate query `q`."""
    out = []
    points = {"x": (editor.site, "in")} | {f"block {b}": (Site("block", b), "out") for b in blocks}
    for i in range(0, len(texts), batch):
        rows = make_rows(editor.tokenizer, [(t, None, None) for t in texts[i:i + batch]]).to(editor.loaded.device)
        got = editor._capture_at(rows, points)
        q = editor._query(editor._project(got["x"].float()), rows.attn.float())
        attn = rows.attn.float()
        for b in range(rows.ids.shape[0]):
            valid = rows.attn[b].bool()
            entry = {"q": q[b]}
            for k, v in got.items():
                unit = F.normalize(v[b].float(), dim=-1)
                if typical is not None:
                    unit = unit.masked_fill(sink_tokens(v[b:b + 1].float(), attn[b:b + 1], typical[k])[0][:, None], float("nan"))
                entry[k] = unit[valid]
            out.append(entry)
    return out


def typical_norms(editor, blocks: list[int]) -> dict[str, float]:
    """Each point's typical norm over the unrelated pool (what WISEEditor._typical_subject_norm
    is at subject_layer)."""
    points = {"x": (editor.site, "in")} | {f"block {b}": (Site("block", b), "out") for b in blocks}
    rows = make_rows(editor.tokenizer, [(t, None, None) for t in editor._pool()]).to(editor.loaded.device)
    got = editor._capture_at(rows, points)
    return {k: typical_norm(v.float(), rows.attn.float()) for k, v in got.items()}


def best(states: torch.Tensor, keys: torch.Tensor) -> float:
    """The best cosine of any non-sink token with any of `keys` (a NaN key: an edit without one,
    which the gate lets pass)."""
    if torch.isnan(keys).any(-1).any():
        return 1.0
    return float(torch.nan_to_num(states @ keys.T, nan=-2.0).max())


def quantile(values: list[float], p: float) -> float | None:
    return sorted(values)[min(len(values) - 1, int(p * len(values)))] if values else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="an `editkit eval --method wise` run directory")
    parser.add_argument("--blocks", default="6,12,18", help="comma-separated block indices to compare at")
    parser.add_argument("--key-gate", type=float, default=0.6, help="the wording gate neighbours must pass")
    parser.add_argument("--gates", default="0.5,0.6,0.7,0.8,0.9", help="subject_gate values to report")
    parser.add_argument("--keep-sinks", action="store_true",
                        help="compare every token, attention sinks too (subject_gate before 6df7ea2)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    run = Path(args.run)
    blocks = [int(b) for b in args.blocks.split(",") if b]
    gates = [float(g) for g in args.gates.split(",") if g]
    plan = json.loads((run / "run.json").read_text(encoding="utf-8"))
    with Session.open(str(run / "methods" / "wise" / "workspace"), follow=True) as session:
        editor = session.editor
        requests = [r.request for r in session.history(active_only=True)]
        sampled = plan.get("sampled")
        measured = [i for i in (sampled if sampled is not None else range(len(requests))) if i < len(requests)][:100]
        typical = None if args.keep_sinks else typical_norms(editor, blocks)
        states = token_states(editor, [r["prompt"] for r in requests], blocks, typical)
        points = [k for k in states[0] if k != "q"]
        subject_keys, with_subject = {k: [] for k in points}, []
        for i, (r, st) in enumerate(zip(requests, states)):
            pos = subject_position(editor.tokenizer, r["prompt"], r.get("subject"))
            if pos is not None:
                with_subject.append(i)
                for k in points:
                    subject_keys[k].append(st[k][pos])
        if not with_subject:
            raise SystemExit(f"{run}: no edit names a subject found in its prompt")
        keys = {k: torch.stack(v) for k, v in subject_keys.items()}
        row_of = {e: j for j, e in enumerate(with_subject)}
        edit_keys = editor._edit_keys_of(editor.edits)  # (N, 2, in), as the gate compares
        rephrasings = {k: [] for k in points}
        neighbours = {k: [] for k in points}
        n_neighbours = 0
        for i in measured:
            r = requests[i]
            if i in row_of:
                for st in token_states(editor, list(r.get("rephrases", [])), blocks, typical):
                    for k in points:
                        rephrasings[k].append(best(st[k], keys[k][row_of[i]][None]))
            for st in token_states(editor, [p["prompt"] for p in r.get("locality", [])], blocks, typical):
                n_neighbours += 1
                passing = [row_of[e] for e in ((edit_keys @ st["q"]).amax(1) >= args.key_gate).nonzero().squeeze(1).tolist()
                           if e in row_of]
                for k in points:
                    if passing:
                        neighbours[k].append(max(best(st[k], keys[k][j][None]) for j in passing))
    result = {"run": str(run), "sinks_left_out": not args.keep_sinks, "edits": len(requests), "with_subject": len(with_subject), "records": len(measured),
              "neighbourhood_prompts": n_neighbours, "key_gate": args.key_gate, "points": {}}
    for k in points:
        rv, nv = rephrasings[k], neighbours[k]
        result["points"][k] = {
            "rephrasings": len(rv), "rephrasing_q10": quantile(rv, 0.1), "rephrasing_median": quantile(rv, 0.5),
            "neighbours_passing_key_gate": len(nv), "neighbour_median": quantile(nv, 0.5),
            "neighbour_q90": quantile(nv, 0.9),
            "gates": {str(g): {"rephrasings_kept": sum(v >= g for v in rv) / max(1, len(rv)),
                               "neighbours_passing": sum(v >= g for v in nv) / max(1, n_neighbours)} for g in gates}}
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"wise-subject-keys-{time.strftime('%Y%m%d-%H%M%S')}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    stem.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


def fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def markdown(r: dict) -> str:
    lines = ["# WISE subject keys: rephrasings against neighbourhood prompts", "",
             f"{r['run']}: {r['edits']} edits ({r['with_subject']} with a subject in their prompt), "
             f"{r['records']} measured records, {r['neighbourhood_prompts']} neighbourhood prompts; "
             f"neighbours compared with the edits whose wording gate (key_gate {r['key_gate']}) they pass; "
             f"attention sinks {'left out' if r['sinks_left_out'] else 'compared too (--keep-sinks)'}.", "",
             "| point | rephrasings: q10 / median cosine | neighbours passing key_gate | their median / q90 | "
             + " | ".join(f"gate {g}: kept / passing" for g in next(iter(r["points"].values()))["gates"]) + " |",
             "|---|---|---|---|" + "---|" * len(next(iter(r["points"].values()))["gates"])]
    for k, p in r["points"].items():
        gates = " | ".join(f"{g['rephrasings_kept']:.2f} / {g['neighbours_passing']:.2f}" for g in p["gates"].values())
        lines.append(f"| {k} | {fmt(p['rephrasing_q10'])} / {fmt(p['rephrasing_median'])} | "
                     f"{p['neighbours_passing_key_gate']} / {r['neighbourhood_prompts']} | "
                     f"{fmt(p['neighbour_median'])} / {fmt(p['neighbour_q90'])} | {gates} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
