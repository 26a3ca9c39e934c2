"""PH3 plugin (Jin et al. 2024, "Cutting Off the Head Ends the Conflict", arXiv 2402.18154):
locate memory heads and context heads by path patching on knowledge-conflict items, then prune
one kind (mask its slice of the attention output projection's input) so the model favours its
own memory or the context, without changing a weight.

Python API: build_items, split_items, locate_heads, choose_k, evaluate_rates, random_baseline,
run_ph3, pruned, HeadPruning. CLI: `editkit ph3 locate | apply | remove`."""

from editkit.hookspecs import hookimpl

from .config import PH3Config
from .evaluate import choose_k, evaluate_rates, perplexity, random_baseline, rates_with
from .intervention import HeadPruning, pruned
from .items import ConflictItem, Fact, build_items, load_facts, split_items
from .locate import SIGN_CONVENTION, HeadScores, locate_heads
from .pipeline import heads_to_prune, read_heads, run_ph3, state_for, write_heads

__all__ = ["ConflictItem", "Fact", "HeadPruning", "HeadScores", "PH3Config", "SIGN_CONVENTION", "build_items",
           "choose_k", "evaluate_rates", "heads_to_prune", "load_facts", "locate_heads", "perplexity", "pruned",
           "random_baseline", "rates_with", "read_heads", "run_ph3", "split_items", "state_for", "write_heads"]


@hookimpl
def register_interventions(register):
    register(HeadPruning)


@hookimpl
def register_commands(register):
    from .commands import make_app

    register("ph3", make_app())
