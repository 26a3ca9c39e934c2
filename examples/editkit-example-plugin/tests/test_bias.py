"""How a plugin author tests a plugin: tiny from-config models from editkit.testing (no
downloads, seconds on a CPU), and a PluginHost given this plugin explicitly, so the tests run
whether or not the package is installed.

    pip install -e . && pytest tests
"""

import pytest
import torch

import editkit_example_plugin
from editkit.errors import EditVetoed
from editkit.host import Candidate, PluginHost, builtin_candidates
from editkit.model import load_model
from editkit.session import Session
from editkit.testing import FAMILIES, save_tiny_model

FAST = {"steps": 12, "lr": 0.5}


@pytest.fixture(scope="module")
def host():
    me = Candidate("example", editkit_example_plugin.__version__, "test", lambda: editkit_example_plugin)
    return PluginHost(candidates=builtin_candidates() + [me], env={})


@pytest.mark.parametrize("family", FAMILIES)
def test_edit_lands_and_detach_restores(tmp_path, host, family, monkeypatch):
    monkeypatch.delenv("EDITKIT_EXAMPLE_MAX_TARGET_CHARS", raising=False)
    loaded = load_model(str(save_tiny_model(family, tmp_path / "model")), device="cpu", host=host)
    ids = loaded.tokenizer("The capital of Italy is", return_tensors="pt").input_ids
    before = loaded.model(input_ids=ids).logits
    with Session.open(tmp_path / "ws", method="bias", method_config=FAST, loaded=loaded, host=host) as s:
        (record,) = s.edit({"prompt": "The capital of Italy is", "target_new": "Paris"})
        assert record.metrics["reliability"] == 1.0
        assert s.generate("The capital of Italy is", max_new_tokens=1) == [" Paris"]
    assert torch.equal(loaded.model(input_ids=ids).logits, before)


def test_long_targets_are_vetoed(tmp_path, host, monkeypatch):
    monkeypatch.setenv("EDITKIT_EXAMPLE_MAX_TARGET_CHARS", "3")
    loaded = load_model(str(save_tiny_model("gpt2", tmp_path / "model")), device="cpu", host=host)
    with Session.open(tmp_path / "ws", method="bias", loaded=loaded, host=host) as s:
        with pytest.raises(EditVetoed, match="more than the 3"):
            s.edit({"prompt": "The capital of Italy is", "target_new": "Paris"})
        assert s.history() == []
