"""Does WISE-Retrieve's faiss prefilter pick the memory the exact scan picks?

From this many memories on (`faiss_min_memories`, 16 by default) a faiss index over the
memories' keys proposes `faiss_candidates` memories per sequence and exact activation scores
pick among them; the paper scores every memory. This opens a WISE workspace read-only (beside
a writer if one is still editing it) and routes, both ways, the in-scope prompts (each active
edit's prompt and rephrasings) and the out-of-scope ones (its locality prompts and the built-in
unrelated pool), on their prompt alone as generation sees them. Reported per kind: the share
where both ways make the same decision (same memory, or neither routes), where both route, and
where both route to the same memory; and the milliseconds per prompt each way spends in the
routing decision alone (the exact scan's cost grows with the number of memories).

    .venv/bin/python benchmarks/wise_routing.py --workspace editkit-eval/methods/wise/workspace

Writes benchmarks/results/wise-routing-<time>.json and .md beside it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from editkit.session import Session
from editkit.unrelated import UNRELATED
from editkit.plugins.wise.rows import make_rows

RESULTS = Path(__file__).resolve().parent / "results"


@torch.no_grad()
def decisions(editor, prompts: list[str], exact: bool, batch: int = 32) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(routed (N,), memory (N,), seconds in the routing decision alone) of each prompt, with
    the faiss prefilter or the exact scan."""
    saved = editor.config
    if exact:
        editor.config = saved.model_copy(update={"faiss_min_memories": None})
    try:
        routed, memory, seconds = [], [], 0.0
        for i in range(0, len(prompts), batch):
            rows = make_rows(editor.tokenizer, [(p, None, None) for p in prompts[i:i + batch]])
            rows = rows.to(editor.loaded.device)
            x = editor._project(editor._capture(rows, block_out=False)["x"].to(torch.float32))
            started = time.perf_counter()
            route, idx, _ = editor._decide(x, rows.attn.to(torch.float32))
            seconds += time.perf_counter() - started
            routed.append(route.cpu())
            memory.append(idx.cpu())
    finally:
        editor.config = saved
    return torch.cat(routed), torch.cat(memory), seconds


def agreement(editor, prompts: list[str]) -> dict:
    r_f, m_f, s_f = decisions(editor, prompts, exact=False)
    r_e, m_e, s_e = decisions(editor, prompts, exact=True)
    same = (r_f == r_e) & (~r_e | (m_f == m_e))
    both = r_f & r_e
    return {"prompts": len(prompts), "same_decision": float(same.float().mean()),
            "routed_exact": float(r_e.float().mean()), "routed_prefilter": float(r_f.float().mean()),
            "same_memory_where_both_route": float((m_f == m_e)[both].float().mean()) if both.any() else None,
            "ms_per_prompt_prefilter": 1000 * s_f / len(prompts), "ms_per_prompt_exact": 1000 * s_e / len(prompts)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workspace", required=True, help="a WISE workspace (e.g. an eval run's methods/wise/workspace)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with Session.open(args.workspace, follow=True) as session:
        editor = session.editor
        if editor.name != "wise" or editor.config.mode != "retrieve":
            raise SystemExit(f"{args.workspace}: not a WISE-Retrieve workspace")
        requests = [r.request for r in session.history(active_only=True)]
        in_scope = [p for r in requests for p in [r["prompt"], *r.get("rephrases", [])]]
        out = [probe["prompt"] for r in requests for probe in r.get("locality", [])] + list(UNRELATED)
        result = {"workspace": str(args.workspace), "edits": len(requests),
                  "memories": int(editor.memories.shape[0]),
                  "faiss_min_memories": editor.config.faiss_min_memories,
                  "faiss_candidates": editor.config.faiss_candidates,
                  "in_scope": agreement(editor, in_scope), "out_of_scope": agreement(editor, out)}
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"wise-routing-{time.strftime('%Y%m%d-%H%M%S')}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    stem.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


def markdown(r: dict) -> str:
    lines = ["# WISE-Retrieve routing: faiss prefilter against the exact scan",
             "", f"{r['edits']} edits, {r['memories']} memories; prefilter from {r['faiss_min_memories']} memories on, "
             f"{r['faiss_candidates']} candidates", "",
             "| prompts | n | same decision | routed (exact) | routed (prefilter) | same memory where both route "
             "| ms per prompt (prefilter / exact) |",
             "|---|---|---|---|---|---|---|"]
    for kind in ("in_scope", "out_of_scope"):
        a = r[kind]
        both = "-" if a["same_memory_where_both_route"] is None else f"{a['same_memory_where_both_route']:.3f}"
        lines.append(f"| {kind.replace('_', ' ')} | {a['prompts']} | {a['same_decision']:.3f} | "
                     f"{a['routed_exact']:.3f} | {a['routed_prefilter']:.3f} | {both} | "
                     f"{a['ms_per_prompt_prefilter']:.2f} / {a['ms_per_prompt_exact']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
