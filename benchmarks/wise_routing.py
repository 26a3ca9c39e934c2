"""Does WISE-Retrieve's faiss prefilter pick the memory the exact scan picks?

From this many memories on (`faiss_min_memories`, 16 by default) a faiss index over the
memories' keys proposes `faiss_candidates` memories per sequence and exact activation scores
pick among them; the paper scores every memory. This opens a WISE workspace read-only (beside
a writer if one is still editing it) and routes, with the exact scan and with the prefilter at
each of `--candidates`, the in-scope prompts (each active
edit's prompt and rephrasings) and the out-of-scope ones (its locality prompts and the built-in
unrelated pool), on their prompt alone as generation sees them. Reported per kind: the share
where both ways make the same decision (same memory, or neither routes), where both route, and
where both route to the same memory; and the milliseconds per prompt each way spends in the
routing decision alone (the exact scan's cost grows with the number of memories). With
--key-gates, the same figures under each key_gate (which is meant to route fewer prompts than the
exact scan: its "routed" share is the figure to read).

    .venv/bin/python benchmarks/wise_routing.py --workspace editkit-eval/methods/wise/workspace
    .venv/bin/python benchmarks/wise_routing.py --run editkit-eval   # also Rel/Gen/Loc each way

With --run (an `editkit eval --method wise` run directory, `--sample` or not) the records the
run measured at its last point are measured again with the exact scan and with the prefilter at
each of --candidates: what the routing choice does to reliability, generalization and locality;
with --act-ratios, also under thresholds set at other act_ratio values (no edit is retrained:
a threshold is act_ratio times the lowest score of its memory's own edits); with --key-gates,
under each key_gate value ("off": activation scores alone, the workspace's prefilter); with
--own-memory, through each record's own edit's memory whatever the routing (is Gen lost to
routing, or to what the memory learnt?).

Writes benchmarks/results/wise-routing-<time>.json and .md beside it.
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from editkit.schemas import EditRequest
from editkit.scoring import ItemBaseline, measure_items, summarise
from editkit.session import Session
from editkit.unrelated import UNRELATED
from editkit.plugins.wise.rows import make_rows

RESULTS = Path(__file__).resolve().parent / "results"


@contextmanager
def routing(editor, candidates: int | None):
    """The editor routes by activation scores alone (no key_gate), with the exact scan (None) or
    with the faiss prefilter proposing `candidates` memories, until the block ends."""
    saved = editor.config
    scan = {"faiss_min_memories": None} if candidates is None else {"faiss_min_memories": 1, "faiss_candidates": candidates}
    editor.config = saved.model_copy(update={"key_gate": None, **scan})
    try:
        yield
    finally:
        editor.config = saved


@torch.no_grad()
def decisions(editor, prompts: list[str], way, batch: int = 32) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(routed (N,), memory (N,), seconds in the routing decision alone) of each prompt, routed
    the way the context manager `way()` sets up."""
    with way():
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
    return torch.cat(routed), torch.cat(memory), seconds


def agreement(editor, prompts: list[str], candidates: list[int], gates: list[float] = ()) -> dict:
    """Each routing way against the exact scan: the faiss prefilter at each of `candidates`
    (meant to decide as the exact scan does) and key_gate at each of `gates`, with the
    workspace's subject_gate (meant to route fewer prompts: the share routed, and whether both
    pick the same memory where both route)."""
    r_e, m_e, s_e = decisions(editor, prompts, lambda: routing(editor, None))
    out = {"prompts": len(prompts), "routed_exact": float(r_e.float().mean()),
           "ms_per_prompt_exact": 1000 * s_e / len(prompts), "prefilter": {}, "key_gate": {}}
    ways = [("prefilter", str(c), lambda c=c: routing(editor, c)) for c in candidates]
    subject = editor.config.subject_gate
    ways += [("key_gate", f"{g} (subject_gate {subject})", lambda g=g: key_gate(editor, g, subject)) for g in gates]
    for kind, name, way in ways:
        r_f, m_f, s_f = decisions(editor, prompts, way)
        same = (r_f == r_e) & (~r_e | (m_f == m_e))
        both = r_f & r_e
        out[kind][name] = {
            "same_decision": float(same.float().mean()), "routed": float(r_f.float().mean()),
            "same_memory_where_both_route": float((m_f == m_e)[both].float().mean()) if both.any() else None,
            "ms_per_prompt": 1000 * s_f / len(prompts)}
    return out


@contextmanager
def act_ratio(editor, ratio: float):
    """Every memory's routing threshold as if it had been set with `ratio` (thresholds are
    act_ratio times the lowest score of the memory's own edits), until the block ends."""
    saved = editor.thresholds
    editor.thresholds = saved * (ratio / editor.config.act_ratio)
    editor._route = None
    try:
        yield
    finally:
        editor.thresholds = saved
        editor._route = None


@contextmanager
def key_gate(editor, gate: float | None, subject: float | None = None):
    """The editor routes under config.key_gate = `gate` and subject_gate = `subject` until the
    block ends."""
    saved = editor.config
    editor.config = saved.model_copy(update={"key_gate": gate, "subject_gate": subject})
    editor._route = None
    try:
        yield
    finally:
        editor.config = saved
        editor._route = None


@contextmanager
def own_memory(editor, m: int):
    """Every sequence routed to memory m whatever its scores, until the block ends: what an
    edit's own memory answers when routing is not the question."""
    def decide(xf, valid):
        idx = torch.full((xf.shape[0],), m, dtype=torch.long, device=xf.device)
        route = torch.ones_like(idx, dtype=torch.bool)
        return route, idx, editor._memory_outputs(xf, idx, route)
    editor._decide, editor._route = decide, None
    try:
        yield
    finally:
        del editor._decide
        editor._route = None


def own_memory_quality(editor, requests: list[EditRequest], baselines: list[ItemBaseline]) -> dict:
    """Rel and Gen of each record through its own edit's memory (routing aside), and the share of
    its rephrasings the workspace's routing sends there (on the prompt alone): whether Gen is lost
    to routing or to what the memory learnt."""
    memory_of = {(e["prompt"], e["target"]): e["memory"] for e in editor.edits}
    groups: dict[int, list] = {}
    for r, b in zip(requests, baselines):
        groups.setdefault(memory_of[(r.prompt, r.target_new)], []).append((r, b))
    rows = []
    for m, items in groups.items():
        with own_memory(editor, m):
            rows += measure_items(editor.loaded, [r for r, _ in items], [b for _, b in items])
    out = summarise(rows)
    rephrases = [(p, memory_of[(r.prompt, r.target_new)]) for r in requests for p in r.rephrases]
    routed, idx, _ = decisions(editor, [p for p, _ in rephrases], nullcontext)
    own = torch.tensor([m for _, m in rephrases])
    out["rephrases_routed"] = float(routed.float().mean())
    out["rephrases_routed_to_own_memory"] = float((routed & (idx == own)).float().mean())
    return out


def quality(editor, run: Path, applied: int, candidates: list[int], ratios: list[float] = (),
            gates: list[float | None] = (), subjects: list[float] = (), own: bool = False) -> dict:
    """Rel/Gen/Loc (TF and EM) of the run's last-point records under each routing, under the
    workspace's own routing with each act_ratio of `ratios`, under each key_gate of `gates`, and
    under the workspace's key_gate (0.6 where it has none) with each subject_gate of `subjects`;
    with `own`, through each record's own edit's memory (own_memory_quality)."""
    plan = json.loads((run / "run.json").read_text(encoding="utf-8"))
    base = json.loads((run / "baseline.json").read_text(encoding="utf-8"))["items"]
    sampled = plan.get("sampled")
    indices = [i for i in (sampled if sampled is not None else range(len(plan["cases"]))) if i < applied]
    requests = [EditRequest(**plan["cases"][i]["request"]) for i in indices]
    baselines = [ItemBaseline.from_dict(base[i]["baseline"]) for i in indices]
    out = {"records": len(indices)}
    for name, c in [("exact", None)] + [(f"prefilter {c}", c) for c in candidates]:
        with routing(editor, c):
            out[name] = summarise(measure_items(editor.loaded, requests, baselines))
    for r in ratios:
        with act_ratio(editor, r):
            out[f"act_ratio {r} (the workspace's routing)"] = summarise(measure_items(editor.loaded, requests, baselines))
    for g in gates:
        with key_gate(editor, g):
            out[f"key_gate {'off' if g is None else g}"] = summarise(measure_items(editor.loaded, requests, baselines))
    gate = editor.config.key_gate if editor.config.key_gate is not None else 0.6
    for sg in subjects:
        with key_gate(editor, gate, sg):
            out[f"key_gate {gate}, subject_gate {sg}"] = summarise(measure_items(editor.loaded, requests, baselines))
    if own:
        out["own memory"] = own_memory_quality(editor, requests, baselines)
    return out


def evenly(items: list, n: int) -> list:
    """At most n of `items`, spread evenly over them."""
    k = min(n, len(items))
    return [items[i * len(items) // k] for i in range(k)]


def fill_subjects(editor, requests: list[dict]) -> None:
    """Subject keys for a workspace edited before editkit kept edits' subjects: from the
    journal's requests (the active ones, in the editor's order)."""
    if bool(editor.subject_known.any()) or len(requests) != len(editor.edits):
        return
    for e, r in zip(editor.edits, requests):
        if e["prompt"] != r["prompt"]:
            raise SystemExit("the journal's active requests do not match the editor's edits")
        e["subject"] = r.get("subject")
    editor.subject_keys, editor.subject_known = editor._subject_keys_of(editor.edits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--workspace", help="a WISE workspace (e.g. an eval run's methods/wise/workspace)")
    where.add_argument("--run", help="an `editkit eval --method wise` run directory: its workspace, and its "
                                     "measured records again under each routing")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--candidates", default="4,8,16",
                        help="comma-separated faiss_candidates values to compare with the exact scan")
    parser.add_argument("--quality-only", action="store_true",
                        help="with --run: skip the agreement pass over every edit's prompts (the exact scan of all of them)")
    parser.add_argument("--act-ratios", default="",
                        help="with --run: also measure the records with thresholds set at these act_ratio values "
                             "(comma-separated; the workspace's routing)")
    parser.add_argument("--key-gates", default="",
                        help="also route under these key_gate values (comma-separated): the share routed and ms "
                             "per routing decision beside the exact scan's; with --run, the records measured under each "
                             "('off' = activation scores alone)")
    parser.add_argument("--limit", type=int, default=0,
                        help="route at most this many prompts of each kind (in scope, out of scope), spread evenly "
                             "over the stream; 0 = all")
    parser.add_argument("--subject-gates", default="",
                        help="with --run: also measure the records under these subject_gate values (comma-separated), "
                             "with the workspace's key_gate (0.6 where it has none)")
    parser.add_argument("--own-memory", action="store_true",
                        help="with --run: also measure each record through its own edit's memory, routing aside "
                             "(Rel and Gen only), and the share of rephrasings the workspace routes there")
    parser.add_argument("--packed-dtype", choices=["float32", "float16"],
                        help="repack the finished memories in this dtype first (what packed_dtype changes)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    candidates = [int(c) for c in args.candidates.split(",") if c]
    workspace = args.workspace or str(Path(args.run) / "methods" / "wise" / "workspace")
    with Session.open(workspace, follow=True) as session:
        editor = session.editor
        if editor.name != "wise" or editor.config.mode != "retrieve":
            raise SystemExit(f"{workspace}: not a WISE-Retrieve workspace")
        if args.packed_dtype:  # a fresh bank in that dtype takes the state (values converted)
            tensors, meta = editor.state_dict()
            tensors = {k: v.clone() for k, v in tensors.items()}
            editor.config = editor.config.model_copy(update={"packed_dtype": args.packed_dtype})
            editor.load_state_dict(tensors, meta)
        requests = [r.request for r in session.history(active_only=True)]
        fill_subjects(editor, requests)
        in_scope = [p for r in requests for p in [r["prompt"], *r.get("rephrases", [])]]
        out = [probe["prompt"] for r in requests for probe in r.get("locality", [])] + list(UNRELATED)
        if args.limit:
            in_scope, out = (evenly(p, args.limit) for p in (in_scope, out))
        result = {"workspace": workspace, "edits": len(requests),
                  "memories": len(editor.memories), "memory_bytes": editor.memories.nbytes(),
                  "packed_dtype": editor.config.packed_dtype,
                  "faiss_min_memories": editor.config.faiss_min_memories,
                  "faiss_candidates": editor.config.faiss_candidates}
        gates = [None if g == "off" else float(g) for g in args.key_gates.split(",") if g]
        if not (args.quality_only and args.run):
            on = [g for g in gates if g is not None]
            result.update(in_scope=agreement(editor, in_scope, candidates, on),
                          out_of_scope=agreement(editor, out, candidates, on))
        if args.run:
            ratios = [float(r) for r in args.act_ratios.split(",") if r]
            subjects = [float(v) for v in args.subject_gates.split(",") if v]
            result["quality"] = quality(editor, Path(args.run), len(requests), candidates, ratios, gates, subjects,
                                        args.own_memory)
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"wise-routing-{time.strftime('%Y%m%d-%H%M%S')}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    stem.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


def markdown(r: dict) -> str:
    lines = ["# WISE-Retrieve routing: faiss prefilter and key_gate against the exact scan",
             "", f"{r['edits']} edits, {r['memories']} memories ({r['memory_bytes'] / 2**20:.1f} MiB, "
             f"finished ones packed in {r['packed_dtype']}); the workspace's config: prefilter from "
             f"{r['faiss_min_memories']} memories on, {r['faiss_candidates']} candidates", "",
             "| prompts | n | routing (faiss candidates, or key_gate) | same decision | routed (exact) "
             "| routed (this way) | same memory where both route | ms per prompt (this way / exact) |",
             "|---|---|---|---|---|---|---|---|"]
    for kind in ("in_scope", "out_of_scope"):
        a = r.get(kind)
        if a is None:
            continue
        for way, found in (("", a["prefilter"]), ("key_gate ", a.get("key_gate", {}))):
            for c, p in found.items():
                both = "-" if p["same_memory_where_both_route"] is None else f"{p['same_memory_where_both_route']:.3f}"
                lines.append(f"| {kind.replace('_', ' ')} | {a['prompts']} | {way}{c} | {p['same_decision']:.3f} | "
                             f"{a['routed_exact']:.3f} | {p['routed']:.3f} | {both} | "
                             f"{p['ms_per_prompt']:.2f} / {a['ms_per_prompt_exact']:.2f} |")
    q = r.get("quality")
    if q:
        lines += ["", f"Quality of the run's {q['records']} measured records under each routing (TF / EM):", "",
                  "| routing | Rel | Gen | Loc unchanged |", "|---|---|---|---|"]
        for name, m in q.items():
            if name == "own memory":
                lines.append(f"| each record through its own edit's memory, routing aside | {m['rel_tf']:.3f} / "
                             f"{m['rel_em']:.3f} | {m['gen_tf']:.3f} / {m['gen_em']:.3f} | - |")
                lines += ["", f"Rephrasings the workspace's routing sends anywhere: {m['rephrases_routed']:.3f}; "
                          f"to their own edit's memory: {m['rephrases_routed_to_own_memory']:.3f} (prompt alone)."]
            elif name != "records":
                lines.append(f"| {name} | {m['rel_tf']:.3f} / {m['rel_em']:.3f} | {m['gen_tf']:.3f} / "
                             f"{m['gen_em']:.3f} | {m['loc_tf']:.3f} / {m['loc_em']:.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
