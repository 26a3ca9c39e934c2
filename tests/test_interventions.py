"""Interventions through a session: attached, persisted with the head state, kept across
edits, rollbacks and reopening, removed exactly."""

import pytest
import torch
from pydantic import BaseModel, ConfigDict

from editkit import hookimpl
from editkit.components import Intervention
from editkit.errors import InvalidRequest, UnknownComponent
from editkit.host import PluginHost
from editkit.session import Session
from editkit.sites import Site

FAST = {"steps": 3, "lr": 0.05, "early_stop_loss": 0.0}


class ScaleConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    layer: int = 1


class ScaleBlock(Intervention):
    """Scales one block's output by a learned-elsewhere factor (a stand-in for real methods)."""

    name = "scale"
    Config = ScaleConfig

    def attach(self):
        self.factor = torch.ones(())
        module = self.adapter.module(Site("block", self.config.layer))
        self._handle = module.register_forward_hook(self._scale)
        self.attached = True

    def _scale(self, module, inputs, output):
        if isinstance(output, tuple):
            return (output[0] * self.factor, *output[1:])
        return output * self.factor

    def detach(self):
        self._handle.remove()
        self.attached = False

    def state_dict(self):
        return {"factor": self.factor}, {"kind": "scale"}

    def load_state_dict(self, tensors, meta):
        if meta.get("kind") != "scale" or tensors["factor"].shape != ():
            raise InvalidRequest("bad scale state")
        self.factor = tensors["factor"].clone()


class plugin:
    @staticmethod
    @hookimpl
    def register_interventions(register):
        register(ScaleBlock)


@pytest.fixture()
def host():
    h = PluginHost()
    h.add_plugin(plugin, "scale-plugin")
    return h


@torch.no_grad()
def logits(loaded):
    return loaded.model(loaded.tokenizer("The capital of Italy is Rome", return_tensors="pt").input_ids).logits


def test_intervention_lifecycle(tmp_path, tiny_loaded, host):
    loaded = tiny_loaded["gpt_neox"]
    pristine = logits(loaded)
    ws = tmp_path / "ws"
    with Session.open(ws, loaded=loaded, method="ft", method_config=FAST, host=host) as s:
        s.add_intervention("scale", {"layer": 2}, state=({"factor": torch.tensor(0.5)}, {"kind": "scale"}))
        scaled = logits(loaded)
        assert not torch.equal(scaled, pristine)
        with pytest.raises(InvalidRequest, match="already attached"):
            s.add_intervention("scale")
        s.edit([{"prompt": "The capital of France is", "target_new": "Rome"},
                {"prompt": "Who wrote Hamlet?", "target_new": "Paris"}], measure=False)
        s.rollback(1)
        both = logits(loaded)
    assert torch.equal(logits(loaded), pristine)
    with Session.open(ws, loaded=loaded, host=host) as s:
        assert list(s.interventions) == ["scale"]
        assert s.interventions["scale"].config.layer == 2
        assert torch.equal(logits(loaded), both)
        s.remove_intervention("scale")
        edited_only = logits(loaded)
        with pytest.raises(InvalidRequest, match="not attached"):
            s.remove_intervention("scale")
    with Session.open(ws, loaded=loaded, host=host) as s:
        assert s.interventions == {}
        assert torch.equal(logits(loaded), edited_only)


def test_bad_intervention_changes_nothing(tmp_path, tiny_loaded, host):
    loaded = tiny_loaded["llama"]
    with Session.open(tmp_path / "ws", loaded=loaded, method="ft", method_config=FAST, host=host) as s:
        before = logits(loaded)
        with pytest.raises(UnknownComponent, match="unknown intervention 'nope'"):
            s.add_intervention("nope")
        with pytest.raises(InvalidRequest, match="scale config: layer"):
            s.add_intervention("scale", {"layer": "top"})
        with pytest.raises(InvalidRequest, match="bad scale state"):
            s.add_intervention("scale", state=({"factor": torch.ones(3)}, {"kind": "scale"}))
        assert s.interventions == {} and torch.equal(logits(loaded), before)
