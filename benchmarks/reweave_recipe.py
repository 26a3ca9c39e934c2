"""Which reweave recipe: held-out recall of one training run per config variant, with the
breakdown that tells a binding failure from a copying one, and where the frozen model binds a
code to its name when it reads everything in one input.

    python benchmarks/reweave_recipe.py --data passkey --binding 0 --variant '{"value_from": "next"}' --variant '{}'
    python benchmarks/reweave_recipe.py --data counterfact --variant '{}' --reconstruction 0.1
    python benchmarks/reweave_recipe.py --binding-heads 40 --binding-content 60
    python benchmarks/reweave_recipe.py --trained reweave.safetensors --facts counterfact-dev

--data passkey: 2-digit passkeys with one distractor code per chunk, trained at one and two
chunks back, held out at both; counterfact: CounterFact fact episodes; mixed: what `editkit
reweave train --data mixed` trains on, with CounterFact facts held out by prompt. Each variant
is a JSON object of ReweaveConfig values over the defaults. Writes JSON and a Markdown summary
beside it (docs/reweave.md, "Recipe", quotes these)."""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import torch


def datasets(data: str, examples: int, held: int, digits: int, seed: int, echo: bool = False) -> tuple[list, dict]:
    from editkit.plugins.reweave import passkeys
    from editkit.plugins.reweave.data import episodes, fact_episodes

    def keys(n, s, distance):
        return passkeys(n, seed=s, distance=distance, digits=digits, distractors=1, echo=echo)

    held_keys = {"passkey, 1 back": keys(held, 101, 1), "passkey, 2 back": keys(held, 102, 2)}
    if data == "passkey":
        return keys(examples // 2, 1, 1) + keys(examples - examples // 2, 2, 2), held_keys
    if data == "counterfact":
        items = fact_episodes("counterfact", examples + held, seed=seed)
        return items[:examples], {"counterfact": items[examples:]}
    if data == "mixed":
        train = episodes("mixed", examples, seed=seed, distance=1, digits=digits)
        seen = {ep.query for ep in train}
        facts = [ep for ep in fact_episodes("counterfact", 4 * held, seed=seed + 999) if ep.query not in seen]
        return train, {"counterfact": facts[:held], **held_keys}
    raise SystemExit(f"unknown --data {data}")


@torch.no_grad()
def first_digits(rw, items, prepared) -> dict:
    """Of passkey episodes, how often the first predicted digit is the code's, a distractor's
    first digit (a binding failure), or another (a copying failure)."""
    from editkit.plugins.reweave.train import woven_forward

    counts = {"right": 0, "distractor": 0, "other": 0}
    for ep, p in zip(items, prepared):
        _, top = woven_forward(rw, [p])
        guess = rw.tokenizer.decode([int(rw.adapter.unembed(top[0, p.positions[0]]).argmax())]).strip()
        code = ep.answer.strip()
        others = [c for c in re.findall(r"is (\d+)\.", " ".join(ep.chunks)) if c != code]
        counts["right" if guess == code[0] else "distractor" if any(guess == c[0] for c in others) else "other"] += 1
    return counts


def run_variant(loaded, variant: dict, train_items, held: dict, args) -> dict:
    from editkit.plugins.reweave import prepare, reweaving, train
    from editkit.plugins.reweave.train import score

    started = time.perf_counter()
    with reweaving(loaded, variant) as rw:
        prepared = prepare(rw, train_items, teacher=args.reconstruction > 0)
        held_prepared = {k: prepare(rw, v) for k, v in held.items()}
        prepare_s = time.perf_counter() - started
        stats = train(rw, prepared, steps=args.steps, lr=args.lr, batch_size=args.batch_size, seed=args.seed,
                      reconstruction=args.reconstruction, binding=args.binding,
                      progress=lambda s, n, loss: print(f"step {s}/{n} loss {loss:.3f}", flush=True) if s % 100 == 0 else None)
        out = {"variant": variant, "config": rw.config.model_dump(mode="json"), "prepare_seconds": prepare_s,
               "train": stats, "training_episodes": score(rw, prepared[:128]), "held_out": {}}
        for name, items in held.items():
            row = {"reweave": score(rw, held_prepared[name]), "frozen": score(rw, held_prepared[name], use_memory=False)}
            if name.startswith("passkey"):
                row["first_digit"] = first_digits(rw, items, held_prepared[name])
            out["held_out"][name] = row
    return out


def measure_trained(loaded, args) -> dict:
    """A trained reweaver's recall of `--held-out` fact episodes from `--facts`, and the frozen model's."""
    from editkit.plugins.reweave import load_file, prepare, reweaving
    from editkit.plugins.reweave.data import fact_episodes
    from editkit.plugins.reweave.train import score

    tensors, doc = load_file(args.trained)
    items = fact_episodes(args.facts, args.held_out, seed=args.seed + 7)
    with reweaving(loaded, doc["config"], state=(tensors, doc.get("state", {}))) as rw:
        prepared = prepare(rw, items)
        return {"file": str(args.trained), "facts": args.facts, "reweave": score(rw, prepared),
                "frozen": score(rw, prepared, use_memory=False)}


def code_starts(tok, chunk_ids: list[int], chunk: str) -> tuple[list[int], list[str], list[str]]:
    """Of a passkey chunk's tokens: where each code's first digit is, the codes in order, and
    each token's text."""
    texts = [tok.decode([t]) for t in chunk_ids]
    starts = [i + 1 for i in range(len(chunk_ids) - 1)
              if texts[i + 1].strip().isdigit() and not texts[i].strip().isdigit()]
    return starts, re.findall(r"is (\d+)\.", chunk), texts


@torch.no_grad()
def binding_heads(loaded, n: int) -> dict:
    """The frozen model reading a passkey chunk and its question in one input: per layer, the
    head whose attention from the question's last token puts most more weight on the right
    code's first digit than on the distractor's."""
    from editkit.plugins.reweave import passkeys

    tok, model = loaded.tokenizer, loaded.model
    model.set_attn_implementation("eager")  # attention weights are returned by eager attention only
    layers, heads = model.config.num_hidden_layers, model.config.num_attention_heads
    right, wrong = torch.zeros(layers, heads), torch.zeros(layers, heads)
    hits = used = 0
    for ep in passkeys(n, seed=5, distance=1, digits=2, distractors=1):
        chunk_ids = tok(ep.chunks[0]).input_ids
        ids = tok(ep.chunks[0] + " " + ep.query + " ").input_ids  # ends at the lone space before the digits
        starts, codes, _ = code_starts(tok, chunk_ids, ep.chunks[0])
        if len(starts) != 2 or len(codes) != 2:
            continue
        out = model(torch.tensor([ids], device=loaded.device), output_attentions=True)
        used += 1
        hits += int(tok.decode([int(out.logits[0, -1].argmax())]).strip() == ep.answer.strip()[0])
        target = codes.index(ep.answer.strip())
        for layer, att in enumerate(out.attentions):
            right[layer] += att[0, :, -1, starts[target]].float().cpu()
            wrong[layer] += att[0, :, -1, starts[1 - target]].float().cpu()
    model.set_attn_implementation("sdpa")
    gap = (right - wrong) / max(1, used)
    return {"episodes": used, "whole_input_first_digit": hits / max(1, used),
            "layers": [{"layer": layer, "head": int(gap[layer].argmax()), "right_minus_distractor": float(gap[layer].max()),
                        "right": float(right[layer, int(gap[layer].argmax())] / max(1, used))} for layer in range(layers)]}


@torch.no_grad()
def binding_content(loaded, n: int, echo: bool = False) -> dict:
    """Chunk and question read in separate passes, as the memory sees them: per layer, how often
    content alone picks the right code over the distractor. 'head': the best head's query at the
    question's last token against its keys at each code's first digit (before any rotary
    position); 'last->name' / 'name->name': cosine (states centred per pass pair) of the
    question's last token / its mention of the name against the chunk's mention of each name;
    'last->code': of the question's last token against the chunk's token before each code (what
    precedes the first digit there as the last token precedes it in the answer); 'is->is': of the
    token before those (" is" before the lone space, in both). `echo`: questions
    whose answer restates the chunk's sentence up to the code."""
    from editkit.plugins.reweave import passkeys
    from editkit.sites import Site

    tok, adapter = loaded.tokenizer, loaded.adapter
    layers, heads = adapter.num_layers, adapter.num_heads
    slices = [adapter.qkv_slices(layer, h) for layer in range(layers) for h in range(heads)]
    wins = torch.zeros(layers, heads)
    cos = {name: torch.zeros(layers) for name in ("last->name", "name->name", "last->code", "is->is")}
    used = 0

    def run(ids):
        seen = {}
        hooks = [mod.register_forward_hook(lambda m, a, out, mod=mod: seen.__setitem__(mod, out[0].float()))
                 for mod in {s[part][0] for s in slices for part in ("q", "k")}]
        try:
            points = {layer: (Site("block", layer), "out") for layer in range(layers)}
            states, _ = adapter.capture({"input_ids": torch.tensor([ids], device=loaded.device)}, points)
        finally:
            for hook in hooks:
                hook.remove()
        return seen, {layer: states[layer][0].float() for layer in range(layers)}

    for ep in passkeys(n, seed=5, distance=1, digits=2, distractors=1, echo=echo):
        chunk, question = tok(ep.chunks[0]).input_ids, tok(ep.query + " ").input_ids
        starts, codes, names = code_starts(tok, chunk, ep.chunks[0])
        asked = [i for i, t in enumerate(question) if tok.decode([t]).strip() == "?"]
        if len(starts) != 2 or len(codes) != 2 or not asked:
            continue
        mentions = [max(i for i in range(s) if names[i].strip() == "is") - 1 for s in starts]
        used += 1
        right = codes.index(ep.answer.strip())
        wrong = 1 - right
        (cq, cs), (qq, qs) = run(chunk), run(question)
        for idx, sl in enumerate(slices):
            layer, h = divmod(idx, heads)
            q = qq[sl["q"][0]][-1, sl["q"][1]]
            k = cq[sl["k"][0]][:, sl["k"][1]]
            wins[layer, h] += float(k[starts[right]] @ q > k[starts[wrong]] @ q)
        for layer in range(layers):
            mean = torch.cat([cs[layer], qs[layer]]).mean(0)
            c = torch.nn.functional.normalize(cs[layer] - mean, dim=-1)
            q = torch.nn.functional.normalize(qs[layer] - mean, dim=-1)
            for name, at in (("last->name", -1), ("name->name", asked[-1] - 1)):
                cos[name][layer] += float(q[at] @ c[mentions[right]] > q[at] @ c[mentions[wrong]])
            for name, back in (("last->code", 1), ("is->is", 2)):
                cos[name][layer] += float(q[-back] @ c[starts[right] - back] > q[-back] @ c[starts[wrong] - back])
    used_ = max(1, used)
    return {"episodes": used, "layers": [
        {"layer": layer, "head": int(wins[layer].argmax()), "head_right": float(wins[layer].max() / used_),
         **{name: float(v[layer] / used_) for name, v in cos.items()}} for layer in range(layers)]}


def summary(result: dict) -> str:
    lines = [f"# Reweave recipe ({result['args']['data']}, {result['args']['steps']} steps, seed {result['args']['seed']})", ""]
    for run in result.get("runs", []):
        lines.append(f"## variant {json.dumps(run['variant'])}")
        lines.append(f"prepare {run['prepare_seconds']:.0f}s, training {run['train']['seconds']:.0f}s, "
                     f"loss {run['train']['first_loss']:.3f} -> {run['train']['last5_loss']:.3f}; "
                     f"training episodes {100 * run['training_episodes']['token_accuracy']:.1f}% "
                     f"({100 * run['training_episodes']['exact']:.1f}%)")
        lines += ["", "| held out | reweave | frozen | first digit right / distractor / other |", "|---|---|---|---|"]
        for name, row in run["held_out"].items():
            fd = row.get("first_digit")
            lines.append(f"| {name} | {100 * row['reweave']['token_accuracy']:.1f}% ({100 * row['reweave']['exact']:.1f}%) | "
                         f"{100 * row['frozen']['token_accuracy']:.1f}% ({100 * row['frozen']['exact']:.1f}%) | "
                         + (f"{fd['right']} / {fd['distractor']} / {fd['other']}" if fd else "–") + " |")
        lines.append("")
    if "trained" in result:
        t = result["trained"]
        lines += [f"## {t['file']} on {t['facts']} facts", "",
                  f"reweave {100 * t['reweave']['token_accuracy']:.1f}% ({100 * t['reweave']['exact']:.1f}%), frozen "
                  f"{100 * t['frozen']['token_accuracy']:.1f}% ({100 * t['frozen']['exact']:.1f}%) of "
                  f"{t['reweave']['items']} episodes: answer tokens (exact)", ""]
    if "binding_heads" in result:
        bh = result["binding_heads"]
        lines += [f"## Binding heads (frozen model, whole input, {bh['episodes']} episodes; first digit right "
                  f"{100 * bh['whole_input_first_digit']:.0f}%)", "", "| layer | head | attention to right - distractor | to right |",
                  "|---|---|---|---|"]
        lines += [f"| {r['layer']} | {r['head']} | {r['right_minus_distractor']:.3f} | {r['right']:.3f} |"
                  for r in bh["layers"] if r["right_minus_distractor"] > 0.01]
    if "binding_content" in result:
        bc = result["binding_content"]
        lines += ["", f"## Binding by content, separate passes ({bc['episodes']} episodes; right code picked over the "
                  "distractor, chance 0.5)", "", "| layer | best head | head q.k | last->name cosine | name->name cosine | last->code cosine | is->is cosine |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['layer']} | {r['head']} | {r['head_right']:.2f} | {r['last->name']:.2f} | {r['name->name']:.2f} | {r['last->code']:.2f} | {r['is->is']:.2f} |"
                  for r in bc["layers"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--data", default="passkey", choices=["passkey", "counterfact", "mixed"])
    parser.add_argument("--variant", action="append", default=[], help="ReweaveConfig values as JSON (repeatable)")
    parser.add_argument("--examples", type=int, default=1024)
    parser.add_argument("--held-out", type=int, default=64, help="held-out episodes per kind")
    parser.add_argument("--digits", type=int, default=2)
    parser.add_argument("--echo-question", action="store_true", help="passkey answers restate the chunk's sentence "
                        "up to the code ('Answer: the code for the red locker is'), a control: the asking token then "
                        "follows the name as the code does in the chunk")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reconstruction", type=float, default=0.0, help="weight of the reconstruction objective")
    parser.add_argument("--binding", type=float, default=1.0, help="weight of the binding objective (train.binding_loss; "
                        "0 for the rows measured before it was the default, and for values that are not token embeddings)")
    parser.add_argument("--binding-content", type=int, default=0, help="episodes for the separate-passes content "
                        "binding scan (per layer: best head's q.k, cosine of the question's last token / name mention)")
    parser.add_argument("--binding-heads", type=int, default=0, help="episodes for the frozen model's binding-head scan")
    parser.add_argument("--trained", type=Path, default=None, help="a reweaver file (`editkit reweave train --out`) "
                        "to measure on --facts")
    parser.add_argument("--facts", default="counterfact-dev", help="fact source of --trained's measurement "
                        "(counterfact-dev: facts no training reads)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "reweave_recipe.json")
    args = parser.parse_args()

    from editkit.model import load_model

    loaded = load_model(args.model, device="cpu")
    result: dict = {"model": loaded.name, "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                    "torch_threads": torch.get_num_threads(), "runs": []}
    if args.variant:
        train_items, held = datasets(args.data, args.examples, args.held_out, args.digits, args.seed, args.echo_question)
        for text in args.variant:
            result["runs"].append(run_variant(loaded, json.loads(text), train_items, held, args))
            print(summary(result), flush=True)
    if args.trained:
        result["trained"] = measure_trained(loaded, args)
    if args.binding_heads:
        result["binding_heads"] = binding_heads(loaded, args.binding_heads)
    if args.binding_content:
        result["binding_content"] = binding_content(loaded, args.binding_content, args.echo_question)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    args.out.with_suffix(".md").write_text(summary(result))
    print(summary(result))


if __name__ == "__main__":
    main()
