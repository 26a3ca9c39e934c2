"""Contextual memory reweaving ("Contextual Memory Reweaving in Large Language Models Using
Layered Latent State Reconstruction", arXiv 2502.02046): hidden states of earlier chunks are
captured at several layers into a bounded per-conversation buffer and woven back into a later
layer by a zero-initialised gated cross-attention, so a served model remembers earlier chunks
or turns without putting them back into its context. Identity until trained; trained with the
base model frozen. See intervention.py and docs/reweave.md for the concrete choices.

Python API: MemoryReweaving (the intervention: conversation(id), set_conversation, clear),
reweaving (a context manager without a session), ReweaveConfig, episodes / passkeys /
fact_episodes, prepare, train, evaluate, save_file / load_file.
CLI: `editkit reweave train | apply | remove`."""

from editkit.hookspecs import hookimpl

from .config import ReweaveConfig
from .data import Episode, episodes, fact_episodes, passkeys
from .files import load_file, save_file
from .intervention import MemoryBuffer, MemoryReweaving, Reweaver, reweaving
from .train import evaluate, prepare, train

__all__ = ["Episode", "MemoryBuffer", "MemoryReweaving", "ReweaveConfig", "Reweaver", "episodes", "evaluate",
           "fact_episodes", "load_file", "passkeys", "prepare", "reweaving", "save_file", "train"]


@hookimpl
def register_interventions(register):
    register(MemoryReweaving)


@hookimpl
def register_commands(register):
    from .commands import make_app

    register("reweave", make_app())
