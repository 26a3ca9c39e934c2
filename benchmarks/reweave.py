"""Contextual memory reweaving on the default model: held-out cross-chunk recall against the
distance (1..N chunks back) for the frozen model and the trained reweaver, the milliseconds the
plugin adds per token (prefill and greedy decoding, buffer full), and the buffer's memory.

    python benchmarks/reweave.py [--steps 400] [--seeds 0,1,2] [--max-distance 4] [--out benchmarks/results/reweave.json]

Training is repeated for each seed (initialisation and batch order) on the same captured
episodes: one run says little when runs differ this much. Training is deterministic for a
given seed and thread count (train() runs under torch's deterministic algorithms).
Writes JSON and a Markdown summary beside it. Everything reported is measured in this run."""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch


def timed(fn, repeat: int) -> float:
    """Median seconds of `repeat` calls (one warm-up call first)."""
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--examples", type=int, default=512, help="training episodes (distances 1 and 2 mixed)")
    parser.add_argument("--seeds", default="0,1,2", help="training seeds (comma-separated); recall is reported per seed")
    parser.add_argument("--held-out", type=int, default=32, help="held-out episodes per distance")
    parser.add_argument("--max-distance", type=int, default=3)
    parser.add_argument("--digits", type=int, default=2)
    parser.add_argument("--distractors", type=int, default=0, help="other codes per chunk")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--binding", type=float, default=1.0, help="weight of the binding objective (train's default)")
    parser.add_argument("--config", default="{}", help="ReweaveConfig values as JSON")
    parser.add_argument("--repeat", type=int, default=5, help="timing repeats (median)")
    parser.add_argument("--long-inputs", default="4,16,64",
                        help="passkey recall in one input this many times --chunk-tokens long (comma-separated; '' skips)")
    parser.add_argument("--chunk-tokens", type=int, default=32, help="chunk length for the long inputs")
    parser.add_argument("--long-items", type=int, default=32, help="held-out long inputs per length")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "reweave.json")
    args = parser.parse_args()

    from editkit.model import load_model
    from editkit.plugins.reweave import evaluate, passkeys, prepare, reweaving, train

    loaded = load_model(args.model, device="cpu")
    config = json.loads(args.config)
    half = args.examples // 2
    train_items = passkeys(half, seed=1, distance=1, digits=args.digits, distractors=args.distractors) + \
        passkeys(args.examples - half, seed=2, distance=2, digits=args.digits, distractors=args.distractors)
    result: dict = {"model": loaded.name, "fingerprint": loaded.fingerprint, "config_overrides": config,
                    "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                    "torch_threads": torch.get_num_threads(), "platform": platform.platform()}
    seeds = [int(x) for x in args.seeds.split(",")]
    held_out = {d: passkeys(args.held_out, seed=100 + d, distance=d, digits=args.digits, distractors=args.distractors)
                for d in range(1, args.max_distance + 1)}
    result["runs"], result["chance_token_accuracy"] = [], 0.1
    prepared = None
    for n, seed in enumerate(seeds):
        with reweaving(loaded, {**config, "seed": seed}) as rw:  # seed: the reweaver's initialisation
            if prepared is None or rw.config.scorer == "learned":  # 'norm' capture does not depend on the seed
                started = time.perf_counter()
                prepared = prepare(rw, train_items)
                result["prepare_seconds"] = time.perf_counter() - started
            stats = train(rw, prepared, steps=args.steps, lr=args.lr, batch_size=args.batch_size, seed=seed,
                          binding=args.binding,
                          progress=lambda s, n, loss: print(f"seed {seed} step {s}/{n} loss {loss:.3f}", flush=True)
                          if s % 50 == 0 else None)
            if "baseline" not in result:  # the frozen model: no conversation, the plugin is inert
                result["baseline"] = {d: evaluate(rw, items, use_memory=False) for d, items in held_out.items()}
            recall = {d: evaluate(rw, items, use_memory=True) for d, items in held_out.items()}
            result["runs"].append({"seed": seed, "train": stats, "recall": recall})
            print(f"seed {seed}: {stats} {recall}", flush=True)
            if n == len(seeds) - 1:
                result["config"] = rw.config.model_dump(mode="json")
                result["resolved"] = {"capture_layers": rw.capture_ids, "reweave_layer": rw.reweave_id,
                                      "layers": rw.adapter.num_layers,
                                      "parameters": sum(p.numel() for p in rw.module.parameters())}
                measure_cost(rw, loaded, args, result)
                if args.long_inputs:
                    measure_long_inputs(rw, loaded, args, result)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    args.out.with_suffix(".md").write_text(summary(result))
    print(summary(result))


def measure_cost(rw, loaded, args, result: dict) -> None:
    """Added time per token and the buffer's memory with a full buffer."""
    from editkit.plugins.reweave import passkeys

    # Cost: a full buffer (capacity states per capture layer), 64-token prefill and 32 greedy tokens.
    tok = loaded.tokenizer
    filler = passkeys(40, seed=7, distance=1, digits=args.digits)
    with rw.conversation("bench") as buf:
        for ep in filler:
            for chunk in ep.chunks:
                with torch.no_grad():
                    loaded.model(tok(chunk, return_tensors="pt").input_ids)
        result["buffer"] = {"states": len(buf), "bytes": buf.nbytes(), "chunks_fed": buf.chunks,
                            "bound_states": len(rw.capture_ids) * rw.config.capacity}
    prompt = " ".join(ep.chunks[0] for ep in filler[:4])
    ids = tok(prompt, return_tensors="pt").input_ids[:, :64]
    snapshot = rw.buffers["bench"]

    def prefill():
        with torch.no_grad():
            loaded.model(ids)

    def decode():
        with torch.no_grad():
            loaded.model.generate(ids, max_new_tokens=32, min_new_tokens=32, do_sample=False,
                                  pad_token_id=tok.pad_token_id, temperature=None, top_p=None, top_k=None)

    def in_conversation(fn):
        def run():
            rw.buffers["bench"] = snapshot  # full: new captures evict, the size stays at the bound
            with rw.conversation("bench"):
                fn()
        return run

    base_prefill = timed(prefill, args.repeat)
    rw_prefill = timed(in_conversation(prefill), args.repeat)
    base_decode = timed(decode, args.repeat)
    rw_decode = timed(in_conversation(decode), args.repeat)
    rw.cache_projections = False  # the same decoding, projecting every buffered state at every step
    rw_decode_uncached = timed(in_conversation(decode), args.repeat)
    rw.cache_projections = True
    result["cost"] = {
        "prefill_tokens": ids.shape[1], "decode_tokens": 32, "memory_states": len(snapshot),
        "prefill_ms_base": 1e3 * base_prefill, "prefill_ms_reweave": 1e3 * rw_prefill,
        "prefill_added_ms_per_token": 1e3 * (rw_prefill - base_prefill) / ids.shape[1],
        "decode_ms_per_token_base": 1e3 * base_decode / 32, "decode_ms_per_token_reweave": 1e3 * rw_decode / 32,
        "decode_added_ms_per_token": 1e3 * (rw_decode - base_decode) / 32,
        "decode_ms_per_token_reweave_uncached": 1e3 * rw_decode_uncached / 32}
    print(result["cost"], flush=True)


def long_input(rng, tok, n_tokens: int, chunk: int, digits: int) -> tuple[str, str, str]:
    """(context, query, answer): filler sentences of about n_tokens tokens in all with one
    passkey sentence somewhere before the last chunk, then the question."""
    from editkit.plugins.reweave.data import ADJECTIVES, FILLER, OBJECTS

    name = f"{rng.choice(ADJECTIVES)} {rng.choice(OBJECTS)}"
    code = "".join(rng.choice("0123456789") for _ in range(digits))
    query = f" Question: what is the code for the {name}? Answer: it is"
    room = n_tokens - len(tok(query).input_ids)
    sentences, used = [], 0
    while used < room:
        sentences.append(rng.choice(FILLER))
        used += len(tok(" " + sentences[-1]).input_ids)
    # the fact goes before the last chunk, so only the memory can bring it back
    cut, before = 0, 0
    while cut < len(sentences) and before + len(tok(" " + sentences[cut]).input_ids) < room - chunk:
        before += len(tok(" " + sentences[cut]).input_ids)
        cut += 1
    sentences.insert(rng.randrange(0, max(1, cut)), f"The code for the {name} is {code}.")
    return " ".join(sentences), query, " " + code


@torch.no_grad()
def measure_long_inputs(rw, loaded, args, result: dict) -> None:
    """Passkey recall from one long input read chunk by chunk (editkit.generation.read_ahead,
    what Session.generate does in a conversation with chunk_tokens set), teacher-forced on the
    code's digits; against the frozen model reading only the last chunk (what it has without
    the memory) and reading the whole input at once (full attention, where it fits)."""
    import random

    from editkit.generation import Row, read_ahead
    from editkit.plugins.reweave.train import encode

    tok, size = loaded.tokenizer, args.chunk_tokens
    out = {"chunk_tokens": size, "items": args.long_items, "capacity": rw.config.capacity,
           "keep_per_chunk": rw.config.keep_per_chunk, "lengths": {}}

    def digits_right(ids: list[int], start: int, conversation: str | None) -> tuple[int, int]:
        rw.set_conversation(conversation)
        try:
            logits = loaded.model(torch.tensor([ids[:-1]])).logits[0, start - 1:]
        finally:
            rw.set_conversation(None)
        hits = logits.argmax(-1) == torch.tensor(ids[start:])
        return int(hits.sum()), int(hits.all())

    for times in [int(x) for x in args.long_inputs.split(",") if x.strip()]:
        rng = random.Random(500 + times)
        tally = {k: [0, 0] for k in ("reweave", "frozen_last_chunk", "frozen_whole")}
        tokens = 0
        started = time.perf_counter()
        for i in range(args.long_items):
            context, query, answer = long_input(rng, tok, times * size, size, args.digits)
            full, start = encode(tok, context + query, answer)
            answer_ids, prompt_ids = full[start:], full[:start]
            conv = f"__long__{i}"
            rw.set_conversation(conv)
            try:
                (row,) = read_ahead(loaded, [Row("", 1, prompt_ids=prompt_ids)], size)
            finally:
                rw.set_conversation(None)
            tail = row.prompt_ids
            for key, ids, conversation in (("reweave", tail, conv), ("frozen_last_chunk", tail, None),
                                           ("frozen_whole", prompt_ids, None)):
                got = digits_right(ids + answer_ids, len(ids), conversation)
                tally[key][0] += got[0]
                tally[key][1] += got[1]
            rw.clear(conv)
            tokens += len(answer_ids)
        out["lengths"][times] = {"input_tokens": times * size, "seconds": time.perf_counter() - started,
                                 **{k: {"digit_accuracy": v[0] / tokens, "exact": v[1] / args.long_items}
                                    for k, v in tally.items()}}
        print(f"long input {times}x{size}: {out['lengths'][times]}", flush=True)
    result["long_inputs"] = out


def summary(r: dict) -> str:
    c, b, runs = r["cost"], r["buffer"], r["runs"]
    t0 = runs[0]["train"]
    lines = [
        f"# Contextual memory reweaving — {r['model']} (measured)", "",
        f"Model {r['model']} ({r['resolved']['layers']} layers); capture layers {r['resolved']['capture_layers']}, "
        f"reweave after block {r['resolved']['reweave_layer']}; {r['resolved']['parameters']:,} trained parameters. "
        f"CPU, {r['torch_threads']} torch threads. Command: `python benchmarks/reweave.py "
        + " ".join(f"--{k.replace('_', '-')} {json.dumps(v) if k == 'config' else v}" for k, v in r["args"].items()
                   if k not in ("out", "model")) + "`", "",
        f"Training: {t0['examples']} passkey episodes (half 1, half 2 chunks back, "
        f"{r['args']['distractors']} distractor code(s) per chunk), {t0['steps']} steps, batch {t0['batch_size']}, "
        f"peak lr {t0['lr']} (warm-up, cosine decay), one run per seed on the same episodes "
        f"(capture {r['prepare_seconds']:.1f} s):", ""]
    for run in runs:
        t = run["train"]
        lines.append(f"- seed {run['seed']}: loss {t['first_loss']:.3f} -> {t['last5_loss']:.3f} (mean of last 5) "
                     f"in {t['seconds']:.1f} s")
    seeds = " | ".join(f"seed {run['seed']}" for run in runs)
    lines += ["", "## Held-out recall against distance", "",
              "Digit accuracy, teacher-forced on the code's digits, through the serving path; chance is 10% per "
              "digit. The frozen model never sees the earlier chunks.", "",
              f"| chunks back | frozen | {seeds} | mean | frozen exact | mean exact | frozen log-prob | mean log-prob |",
              "|---" * (7 + len(runs)) + "|"]
    for d, f in r["baseline"].items():
        got = [run["recall"][d] for run in runs]
        mean = {k: sum(g[k] for g in got) / len(got) for k in ("token_accuracy", "exact", "answer_logprob")}
        lines.append(f"| {d} | {100 * f['token_accuracy']:.1f}% | "
                     + " | ".join(f"{100 * g['token_accuracy']:.1f}%" for g in got)
                     + f" | {100 * mean['token_accuracy']:.1f}% | {100 * f['exact']:.1f}% | {100 * mean['exact']:.1f}% | "
                     f"{f['answer_logprob']:.3f} | {mean['answer_logprob']:.3f} |")
    lines += ["", "## Cost (the last seed's reweaver)", "",
              f"- Buffer after {b['chunks_fed']} chunks: {b['states']} states (bound {b['bound_states']}), "
              f"{b['bytes'] / 1024:.0f} KiB.",
              f"- Prefill of {c['prefill_tokens']} tokens: {c['prefill_ms_base']:.1f} ms without memory, "
              f"{c['prefill_ms_reweave']:.1f} ms with a full buffer: "
              f"{c['prefill_added_ms_per_token']:+.3f} ms per token.",
              f"- Greedy decoding: {c['decode_ms_per_token_base']:.2f} ms per token without memory, "
              f"{c['decode_ms_per_token_reweave']:.2f} ms with: {c['decode_added_ms_per_token']:+.3f} ms per token "
              f"({c['decode_ms_per_token_reweave_uncached']:.2f} ms per token when every buffered state is "
              "projected again at every step instead of once).",
              "", f"Timings are medians of {r['args']['repeat']} runs on the machine as it was (torch threads "
              f"{r['torch_threads']}; other jobs may share it). Where the 'added' time is negative or the "
              "baseline itself swings, the plugin's cost is below the run-to-run noise of that machine and "
              "this run does not measure it; rerun on an idle machine.", ""]
    if "long_inputs" in r:
        li = r["long_inputs"]
        lines += ["## One long input, read chunk by chunk (the last seed's reweaver)", "",
                  f"The input holds one passkey sentence somewhere before its last chunk of {li['chunk_tokens']} "
                  f"tokens, then the question; {li['items']} held-out inputs per length. `reweave`: read chunk by "
                  "chunk in a conversation (what `generate` does with `chunk_tokens` set); `frozen, last chunk`: "
                  "the model without memory sees only what generation continues from; `frozen, whole`: the "
                  f"model reads everything at once (full attention). Memory: capacity {li['capacity']} states "
                  f"per capture layer, {li['keep_per_chunk']} kept per chunk. Digit accuracy (exact).", "",
                  "| input | tokens | reweave | frozen, last chunk | frozen, whole | seconds |", "|---|---|---|---|---|---|"]
        for times, row in li["lengths"].items():
            cells = " | ".join(f"{100 * row[k]['digit_accuracy']:.1f}% ({100 * row[k]['exact']:.1f}%)"
                               for k in ("reweave", "frozen_last_chunk", "frozen_whole"))
            lines.append(f"| {times}x chunk | {row['input_tokens']} | {cells} | {row['seconds']:.1f} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
