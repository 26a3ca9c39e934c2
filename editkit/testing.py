"""Tiny models built from a config, for fast tests of mechanics (ours and plugin authors').

Each family gets a few-layer random model and a small byte-level BPE tokenizer trained on
the spot, saved as an ordinary transformers directory so it goes through load_model()."""

from __future__ import annotations

from pathlib import Path

import torch

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
