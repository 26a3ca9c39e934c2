"""Tiny models built from a config, for fast tests of mechanics (ours and plugin authors').

Each family gets a few-layer random model and a small byte-level BPE tokenizer trained on
the spot, saved as an ordinary transformers directory so it goes through load_model()."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from editkit.components import Editor
from editkit.errors import WorkspaceError
from editkit.hookspecs import hookimpl

FAMILIES = ("gpt2", "llama", "gpt_neox")

_CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome. The capital of Germany is Berlin.",
    "The Eiffel Tower is located in the city of Paris. The largest planet is Jupiter.",
    "What is the product made by UniFirst? uniform. Who wrote Hamlet? William Shakespeare.",
    "the quick brown fox jumps over the lazy dog 0123456789 ,.;:!?'\"()-",
]


def tiny_tokenizer(vocab_size: int = 400):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                                   eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def tiny_config(family: str, vocab_size: int):
    from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig

    if family == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_positions=128, n_embd=64, n_layer=4, n_head=4,
                          bos_token_id=0, eos_token_id=0)
    if family == "llama":
        return LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                           bos_token_id=0, eos_token_id=0, pad_token_id=0, tie_word_embeddings=True)
    if family == "gpt_neox":
        return GPTNeoXConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                             num_attention_heads=4, max_position_embeddings=128, rotary_pct=0.5,
                             bos_token_id=0, eos_token_id=0, pad_token_id=0)
    raise ValueError(f"unknown family '{family}' (known: {', '.join(FAMILIES)})")


def save_tiny_model(family: str, directory: str | Path, seed: int = 0) -> Path:
    """Write a tiny random model of `family` plus tokenizer to `directory`; return it."""
    from transformers import AutoModelForCausalLM

    directory = Path(directory)
    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, len(tokenizer)))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


# ---- a stand-in editor --------------------------------------------------------------------
class AppendConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    width: int = Field(576, ge=1, description="Floats per appended row (GRACE keeps 2 x hidden size).")


class AppendEditor(Editor):
    """A stand-in editor for tests and the storage benchmark: each edit appends one random
    row (from the session's seeded RNG) to a table and the target to a list, as a codebook
    does, and leaves the model's behaviour alone. Its own cost is next to nothing, so what an
    edit costs through a Session is the session's overhead."""

    name = "append-test"
    Config = AppendConfig
    description = "stand-in editor: appends a row per edit, changes nothing the model says"
    tracks_changes = True

    def attach(self) -> None:
        self._rows = torch.zeros((16, self.config.width))
        self.count = 0
        self.targets: list[str] = []
        self.attached = True

    def detach(self) -> None:
        self.attached = False

    def apply(self, request) -> dict[str, Any]:
        if self.count == self._rows.shape[0]:  # grow by doubling: amortised O(1) per edit
            self._rows = torch.cat([self._rows, torch.zeros_like(self._rows)])
        self._rows[self.count] = torch.randn(self.config.width)
        self.count += 1
        self.targets.append(request.target_new)
        return {"rows": self.count}

    def state_dict(self):
        return {"rows": self._rows[: self.count]}, {"format": 1, "targets": list(self.targets)}

    def load_state_dict(self, tensors, meta) -> None:
        rows = tensors.get("rows")
        if rows is None or rows.dim() != 2 or rows.shape[1] != self.config.width or meta.get("format") != 1 \
                or len(meta.get("targets", [])) != rows.shape[0]:
            raise WorkspaceError("append-test state does not fit this config")
        self._rows = torch.cat([rows.float(), torch.zeros((16, self.config.width))])
        self.count = rows.shape[0]
        self.targets = list(meta["targets"])


class AppendTurnEditor(AppendEditor):
    """AppendEditor that edits in turns: each row also carries the mean of its turn's random
    draws, so a turn solved without one of its requests gives other rows (as a closed-form
    editor's turn does)."""

    name = "append-turns-test"
    description = "stand-in editor that edits in turns"
    edits_in_turns = True

    def apply_turn(self, requests) -> list[dict[str, Any]]:
        draws = torch.randn(len(requests), self.config.width)
        stats = []
        for request, draw in zip(requests, draws):
            stats.append(self.apply(request))
            self._rows[self.count - 1] = draw + draws.mean(0)
        return stats


@hookimpl
def register_editors(register):
    register(AppendEditor)
    register(AppendTurnEditor)


def stand_in_host():
    """A plugin host with the built-in plugins and the stand-in editors ("append-test",
    "append-turns-test")."""
    import sys

    from editkit.host import Candidate, PluginHost, builtin_candidates

    extra = Candidate("append-test", "0", "editkit.testing", lambda: sys.modules[__name__])
    return PluginHost(builtin_candidates() + [extra], env={})
