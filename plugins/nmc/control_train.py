"""Meta-training the learned controller on simulated streams of edits.

The facts are CounterFact records; each is seen through the memory's eyes once (the write
keys of its prompt and of its rephrase, from the editor's own key pass). A stream edits facts
(their prompt, their new target), among them other facts of an edited fact's subject (another
relation: both must hold), edits some again through the prompt or the rephrase with another
target (the second edit must win), and reverts some to the model's own answer; it can hold more facts
than the memory has slots. The simulation keeps the memory's keys as the controller's hard
decisions leave them and each slot's content as a soft mixture of answers (a write moves slot
j's content towards the edit's answer by the decision's weight w_j, as a differentiable
memory does), and reads like the editor: among the slots keyed at the query's subject token
whose subject similarity reaches the threshold, the highest of subject + CONTEXT_WEIGHT x
prompt similarity (a softmax at temperature TAU). The loss is -log P(the fact's latest answer)
over every edited fact's prompt and rephrase at the stream's end; a query that reads no slot
gets the model's own answer.

Two ways to train (`mode`):
* "true": backpropagate that loss into every decision of the stream (the controller learns
  from the stream's outcome, after the stream);
* "synthetic": decoupled, as in the paper: at each decision a synthetic-gradient module
  predicts the loss's gradient with respect to the decision's scores and the controller steps
  on it at once; at the stream's end the true gradients of those scores train the module.
Held-out measures run the same streams on other facts (the dev file) with hard decisions."""

from __future__ import annotations

import random
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from editkit.schemas import EditRequest
from editkit.scoring import normalise

from .controller import FEATURES, Candidates, ControllerNet, candidates
from .memory import CONTEXT_WEIGHT, Entry, Memory, rule_controller, with_slot

TAU = 0.05  # softmax temperature of the simulated read (subject similarities differ by ~0.1)
Progress = Callable[[str, int, int], None]


@dataclass
class Keys:
    """One prompt of a fact as the memory sees it."""

    key: torch.Tensor
    subject: torch.Tensor
    name: int
    lead: int


@dataclass
class Fact:
    variants: list[Keys]  # its prompt, then its rephrase
    own: str  # the model's answer before any edit (CounterFact's true target)
    new: str  # the requested new target
    subject: str  # facts of one subject (another relation) must not overwrite each other


def fact_table(editor, requests: list[EditRequest], progress: Progress | None = None) -> list[Fact]:
    """Write keys of each request's prompt and first rephrase (requests without one are skipped)."""
    out = []
    for i, req in enumerate(requests):
        if req.rephrases and req.target_old:
            variants = []
            for prompt in (req.prompt, req.rephrases[0]):
                entry = editor.plan(req.model_copy(update={"prompt": prompt}), "")[0].entry
                variants.append(Keys(entry.key, entry.subject, entry.name, entry.lead))
            out.append(Fact(variants, req.target_old, req.target_new, req.subject or ""))
        if progress:
            progress("write keys of the facts", i + 1, len(requests))
    return out


@dataclass
class Event:
    fact: int
    variant: int
    label: str
    kind: str  # "new" | "again" | "revert"


def make_stream(facts: list[Fact], rng: random.Random, length: int, again: float = 0.25,
                revert: float = 0.15, sibling: float = 0.3) -> list[Event]:
    """A stream of `length` edits over `facts` (see the module doc); a new fact is, with
    probability `sibling`, another fact of an edited fact's subject where there is one."""
    order = rng.sample(range(len(facts)), len(facts))
    by_subject: dict[str, list[int]] = {}
    for i, fact in enumerate(facts):
        by_subject.setdefault(fact.subject, []).append(i)
    events, edited, latest = [], [], {}
    for _ in range(length):
        u = rng.random()
        if edited and u < again + revert:
            f = rng.choice(edited)
            if u < again:
                choices = [facts[g].new for g in rng.sample(range(len(facts)), 4)]
                label = next((c for c in choices if c not in (latest[f], facts[f].own)), None)
                if label is None:
                    continue
                kind = "again"
            else:
                if latest[f] == facts[f].own:
                    continue
                label, kind = facts[f].own, "revert"
            variant = rng.randrange(2)
        elif order:
            siblings = [g for e in edited if facts[e].subject for g in by_subject[facts[e].subject]
                        if g not in latest and g in order]
            f = rng.choice(siblings) if siblings and rng.random() < sibling else order.pop()
            if f in order:
                order.remove(f)
            if facts[f].new == facts[f].own:
                continue
            label, kind, variant = facts[f].new, "new", 0
            edited.append(f)
        else:
            break
        latest[f] = label
        events.append(Event(f, variant, label, kind))
    return events


class SimMemory:
    """The memory of a simulated stream: keys as decided, contents as soft answer mixtures."""

    def __init__(self, hidden: int, device):
        self.memory = Memory.empty(hidden, device)
        self.contents: list[dict[str, torch.Tensor]] = []  # per slot: answer -> weight

    def read_hard(self, k: Keys, threshold: float, width: float) -> tuple[int, float] | None:
        score, readable = self._scores(k, threshold)
        if score is None or not bool(readable.any()):
            return None
        j = int(score.masked_fill(~readable, float("-inf")).argmax())
        subj = float(self.memory.subjects[j] @ k.subject)
        return j, min(max((subj - threshold) / width, 0.0), 1.0)

    def _scores(self, k: Keys, threshold: float):
        m = self.memory
        if not len(m):
            return None, None
        subj = m.subjects @ k.subject
        same = (m.names == k.name) & ((m.leads == k.lead) | (m.leads < 0))
        readable = same & (subj >= threshold)
        return subj + CONTEXT_WEIGHT * (m.keys @ k.key), readable

    def p_answer(self, k: Keys, answer: str, own: str, threshold: float) -> torch.Tensor | None:
        """P(the read gives `answer`) (None: no slot is read, the model's own answer stands)."""
        score, readable = self._scores(k, threshold)
        if score is None or not bool(readable.any()):
            return None
        r = torch.softmax(score.masked_fill(~readable, float("-inf")) / TAU, dim=0)
        weights = torch.stack([c.get(answer, r.new_zeros(())) for c in self.contents])
        return (r * weights).sum()

    def write(self, cands: Candidates, w: torch.Tensor, choice: int, event_keys: Keys, label: str,
              usage_decay: float) -> None:
        """The hard decision moves keys; every candidate's weight moves its slot's content."""
        n = len(self.memory)
        slot = cands.slots[choice]
        new_occupant = cands.fresh[choice]
        for i, j in enumerate(cands.slots):
            if j < n:
                self.contents[j] = mix(self.contents[j], label, w[i])
        if slot == n:
            self.contents.append({label: w[choice]})
        entry = Entry(event_keys.key, event_keys.subject, event_keys.name, event_keys.lead,
                      torch.zeros_like(event_keys.key), -1, normalise(label))
        self.memory = with_slot(self.memory, slot, entry, usage_decay, new_occupant=new_occupant)


def mix(content: dict[str, torch.Tensor], label: str, w: torch.Tensor) -> dict[str, torch.Tensor]:
    out = {k: v * (1 - w) for k, v in content.items()}
    out[label] = out.get(label, w.new_zeros(())) + w
    return out


@dataclass
class Settings:
    threshold: float
    width: float
    usage_decay: float
    match_threshold: float
    match_context: float


def settings_of(cfg) -> Settings:
    return Settings(cfg.threshold, cfg.gate_width, cfg.usage_decay, cfg.match_threshold, cfg.match_context)


def run_stream(facts: list[Fact], events: list[Event], capacity: int, s: Settings, decide) -> tuple[SimMemory, list]:
    """Play a stream. `decide(cands, event_keys, label, memory) -> (logits or None, choice)`;
    with logits the soft weights are their softmax, without them the decision is hard."""
    hidden = facts[0].variants[0].key.shape[0]
    sim = SimMemory(hidden, facts[0].variants[0].key.device)
    decisions = []
    for ev in events:
        k = facts[ev.fact].variants[ev.variant]
        label = normalise(ev.label)  # as the editor labels its slots
        cands = candidates(sim.memory, k.key, k.subject, k.name, k.lead, label, capacity,
                           sim.read_hard(k, s.threshold, s.width))
        logits, choice = decide(cands, k, label, sim.memory)
        w = torch.softmax(logits, dim=0) if logits is not None else F.one_hot(
            torch.tensor(choice), len(cands.slots)).to(torch.float32)
        sim.write(cands, w, choice, k, ev.label, s.usage_decay)
        decisions.append((cands, logits))
    return sim, decisions


def final_truth(facts: list[Fact], events: list[Event]) -> dict[int, tuple[str, str]]:
    """fact -> (its latest answer, the kind of its last edit)."""
    out = {}
    for ev in events:
        out[ev.fact] = (ev.label, ev.kind)
    return out


def stream_loss(sim: SimMemory, facts: list[Fact], events: list[Event], s: Settings) -> torch.Tensor:
    terms = []
    for f, (answer, _) in final_truth(facts, events).items():
        for k in facts[f].variants:
            p = sim.p_answer(k, answer, facts[f].own, s.threshold)
            if p is None:
                p = torch.tensor(1.0 if answer == facts[f].own else 0.0)
            terms.append(-torch.log(p.clamp_min(1e-4)))
    return torch.stack(terms).mean() if terms else torch.zeros(())


def accuracy(sim: SimMemory, facts: list[Fact], events: list[Event], s: Settings) -> dict[str, list[float]]:
    """Per kind of last edit: whether each of the fact's prompts reads its latest answer."""
    out: dict[str, list[float]] = {}
    for f, (answer, kind) in final_truth(facts, events).items():
        for k in facts[f].variants:
            read = sim.read_hard(k, s.threshold, s.width)
            if read is None:
                got = facts[f].own
            else:
                c = sim.contents[read[0]]
                got = max(c, key=lambda a: float(c[a]))
            out.setdefault(kind, []).append(float(got == answer))
    return out


class DecisionFeedback(nn.Module):
    """Synthetic gradient of the stream's loss with respect to a decision's scores: per
    candidate, from its features, its weight, whether it was the one taken and how far along
    the stream the decision is (without the taken flag it could not tell a rewrite that will
    pay from a fresh slot that is neutral: measured, the controller then drifted)."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(len(FEATURES) + 3, width), nn.GELU(), nn.Linear(width, 1))
        with torch.no_grad():  # predicts zero until true gradients have taught it: no early drift
            self.mlp[2].weight.zero_()
            self.mlp[2].bias.zero_()

    def forward(self, features: torch.Tensor, weights: torch.Tensor, choice: int, progress: float) -> torch.Tensor:
        taken = F.one_hot(torch.tensor(choice), len(weights)).to(weights)
        x = torch.cat([features, weights[:, None], taken[:, None], torch.full_like(weights[:, None], progress)], dim=1)
        return self.mlp(x).squeeze(-1)


def train_controller(facts: list[Fact], s: Settings, mode: str = "synthetic", streams: int = 300,
                     length: int = 48, seed: int = 0, lr: float = 3e-3, progress: Progress | None = None,
                     width: int = 32) -> tuple[ControllerNet, dict]:
    """Train a controller on simulated streams (see the module doc); returns it and the losses."""
    if mode not in ("true", "synthetic"):
        raise ValueError(f"mode must be 'true' or 'synthetic', not {mode!r}")
    torch.manual_seed(seed)
    rng, draw = random.Random(seed), torch.Generator().manual_seed(seed)
    net = ControllerNet(width)
    # synthetic gradients step the controller at every decision, true ones once per stream
    opt = torch.optim.Adam(net.parameters(), lr=lr if mode == "true" else lr / length)
    feedback = DecisionFeedback()
    fb_opt = torch.optim.Adam(feedback.parameters(), lr=3 * lr)
    probes = fixed_streams(facts, seed + 10_000, 10, length)
    loss_before, fb_errors, rms = probe_loss(net, facts, probes, s), [], 0.0
    for n in range(streams):
        events = make_stream(facts, rng, length)
        capacity = rng.choice([10_000, max(4, length // 2)])
        if not events:  # too few facts left to edit: nothing to learn from
            continue
        leaves = []

        def decide(cands, k, label, memory):
            logits = net(cands.features)
            # the hard decision is sampled while training: a decision never taken would get no credit
            choice = int(torch.multinomial(torch.softmax(logits.detach(), 0), 1, generator=draw))
            if mode == "true":
                return logits, choice
            leaf = logits.detach().requires_grad_(True)
            with torch.no_grad():  # the decision's predicted gradient, used at once
                predicted = feedback(cands.features, torch.softmax(leaf, 0), choice, len(leaves) / length)
            opt.zero_grad()
            logits.backward(predicted)
            opt.step()
            leaves.append((cands.features, leaf, choice, len(leaves) / length))
            return leaf, choice

        sim, _ = run_stream(facts, events, capacity, s, decide)
        loss = stream_loss(sim, facts, events, s)
        if mode == "true":
            opt.zero_grad()
            loss.backward()
            opt.step()
        else:  # the true gradients arrive: they train the feedback module
            loss.backward()
            fb_opt.zero_grad()
            true = [true_gradient(leaf) for _, leaf, _, _ in leaves]
            # regress in units of the true gradients' running RMS: they are small (a decision
            # moves a mean over many reads) and would teach a module that predicts zero
            rms = 0.9 * rms + 0.1 * float(torch.cat(true).pow(2).mean().sqrt()) if rms else float(
                torch.cat(true).pow(2).mean().sqrt())
            err = torch.stack([F.mse_loss(feedback(x, torch.softmax(leaf.detach(), 0), c, t), g / max(rms, 1e-12))
                               for (x, leaf, c, t), g in zip(leaves, true)]).mean()
            err.backward()
            fb_opt.step()
            fb_errors.append(float(err.detach()))
        if progress:
            progress(f"train the controller ({mode} gradients)", n + 1, streams)
    tail = max(1, streams // 10)
    return net, {"mode": mode, "streams": streams, "length": length, "facts": len(facts),
                 "loss_before": loss_before, "loss_after": probe_loss(net, facts, probes, s),
                 "feedback_error_first": statistics.mean(fb_errors[:tail]) if fb_errors else None,
                 "feedback_error_last": statistics.mean(fb_errors[-tail:]) if fb_errors else None}


def true_gradient(leaf: torch.Tensor) -> torch.Tensor:
    """A decision's true gradient (zero where none of the scored reads depends on it)."""
    return leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)


def fixed_streams(facts: list[Fact], seed: int, n: int, length: int) -> list[tuple[list[Event], int]]:
    """n streams with their memory sizes (every other one with fewer slots than edits)."""
    rng = random.Random(seed)
    return [(make_stream(facts, rng, length), 10_000 if i % 2 == 0 else max(4, length // 2)) for i in range(n)]


@torch.no_grad()
def probe_loss(net: ControllerNet, facts: list[Fact], probes, s: Settings) -> float:
    """The training loss (soft decisions) on fixed streams: before and after training."""
    def decide(cands, k, label, memory):
        logits = net(cands.features)
        return logits, int(logits.argmax())

    return statistics.mean(float(stream_loss(run_stream(facts, events, capacity, s, decide)[0], facts, events, s))
                           for events, capacity in probes)


def evaluate_controllers(facts: list[Fact], s: Settings, controllers: dict[str, ControllerNet | None],
                         streams: int = 40, length: int = 48, seed: int = 1) -> dict[str, dict]:
    """Hard decisions on the same held-out streams for each controller (None: the rule);
    returns per controller the share of prompts reading their latest answer, overall and per
    kind of last edit, with and without a full memory."""
    out = {}
    for name, net in controllers.items():
        scores: dict[str, list[float]] = {}
        for events, capacity in fixed_streams(facts, seed, streams, length):
            def decide(cands, k, label, memory):
                if net is None:
                    plan = rule_controller(memory, k.key, k.subject, label, capacity, s.match_threshold,
                                           s.match_context)
                    fresh = plan.action in ("new", "evict")
                    pick = next(i for i, (j, f) in enumerate(zip(cands.slots, cands.fresh))
                                if j == plan.slot and f == fresh) if any(
                        j == plan.slot and f == fresh for j, f in zip(cands.slots, cands.fresh)) else None
                    if pick is None:  # the rule chose a slot outside the candidates: add it
                        cands.slots.append(plan.slot), cands.fresh.append(fresh)
                        cands.features = torch.cat([cands.features, cands.features[-1:]])
                        pick = len(cands.slots) - 1
                    return None, pick
                with torch.no_grad():
                    return None, int(net(cands.features).argmax())

            sim, _ = run_stream(facts, events, capacity, s, decide)
            for kind, values in accuracy(sim, facts, events, s).items():
                suffix = "" if capacity == 10_000 else " (full memory)"
                scores.setdefault(kind + suffix, []).extend(values)
                scores.setdefault("all" + suffix, []).extend(values)
        out[name] = {k: statistics.mean(v) for k, v in sorted(scores.items())}
        out[name]["prompts"] = {k: len(v) for k, v in sorted(scores.items())}
    return out


def sibling_groups(requests: list[EditRequest]) -> tuple[list[EditRequest], list[EditRequest]]:
    """Requests whose subject has other requests, split by subject into two halves (alternating
    subjects): facts of one subject for training, others for measuring."""
    by_subject: dict[str, list[EditRequest]] = {}
    for req in requests:
        if req.subject:
            by_subject.setdefault(req.subject, []).append(req)
    groups = [g for _, g in sorted(by_subject.items()) if len(g) > 1]
    return [r for g in groups[0::2] for r in g], [r for g in groups[1::2] for r in g]


def controller_requests(train_file, held_out_file, records: int, held_out: int) -> tuple[list[EditRequest], list[EditRequest]]:
    """The training facts (the training file's first `records`, plus half of its facts that
    share a subject) and the held-out ones (the held-out file's first `held_out`, plus the
    other half, less any among the training records)."""
    from .pretrain import counterfact_requests

    everything = counterfact_requests(train_file, 10**9)
    first = everything[:records]
    train_siblings, test_siblings = sibling_groups(everything)
    train = first + [r for r in train_siblings if r not in first]
    test = counterfact_requests(held_out_file, held_out) + [r for r in test_siblings if r not in first]
    return train, test
