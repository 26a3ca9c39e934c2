"""Models spread by a device map with layers offloaded (accelerate keeps their weights on the
meta device between calls): editing one gives what editing the whole model in memory gives.
Tiny models of every family with blocks 2-3 on "disk", where every method's default layer is."""

from __future__ import annotations

import pytest
import torch

from editkit.errors import InvalidRequest
from editkit.export import export
from editkit.model import load_model
from editkit.session import Session
from editkit.sites import Site

CONFIGS = {
    "ft": {"steps": 3, "lr": 0.05, "norm_constraint": 10.0, "early_stop_loss": 0.0},
    "grace": {"steps": 20},
    "wise": {"steps": 4, "n_contexts": 2, "context_lengths": [3], "lr": 0.1, "unrelated_per_edit": 2, "replay": 1},
    "nmc": {"fast_steps": 0, "slow_steps": 20, "slow_lr": 0.5, "threshold": 0.9, "gate_width": 0.05, "margin": 0.2},
}
EDIT = {"prompt": "The capital of France is", "target_new": "Rome"}
PROBES = ["The capital of France is Rome", "the quick brown fox jumps over the lazy dog"]


def disk_map(loaded, first: int) -> dict[str, str]:
    """A device map with blocks `first`.. on "disk" and every other module on the CPU."""
    offloaded = {id(b) for i, b in enumerate(loaded.adapter.blocks()) if i >= first}
    out: dict[str, str] = {}

    def walk(prefix: str, module: torch.nn.Module) -> None:
        for name, child in module.named_children():
            if id(child) in offloaded:
                out[prefix + name] = "disk"
            elif any(id(m) in offloaded for m in child.modules()):
                walk(f"{prefix}{name}.", child)
            else:
                out[prefix + name] = "cpu"

    walk("", loaded.model)
    return out


@pytest.fixture(scope="module")
def pairs(tiny_dirs):
    """(whole, offloaded) loads of each family's tiny model."""
    out = {}
    for family, path in tiny_dirs.items():
        whole = load_model(str(path), device="cpu")
        out[family] = (whole, load_model(str(path), device_map=disk_map(whole, 2)))
    return out


def logits(loaded) -> list[torch.Tensor]:
    with torch.no_grad():
        return [loaded.model(**loaded.tokenizer(p, return_tensors="pt")).logits for p in PROBES]


def test_offloaded_model_is_the_same_model(pairs, tiny_family):
    whole, off = pairs[tiny_family]
    site = Site("mlp.down", 3)
    assert off.adapter.offloaded(site) and not whole.adapter.offloaded(site)
    assert off.fingerprint == whole.fingerprint  # the same workspace opens on either
    assert torch.equal(off.adapter.weight_values(site), whole.adapter.weight(site))
    assert off.adapter.linear_features(site) == whole.adapter.linear_features(site)
    assert all(torch.equal(a, b) for a, b in zip(logits(off), logits(whole)))


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_edit_on_offloaded_layers_matches_the_whole_model(pairs, tiny_family, method, tmp_path):
    results = {}
    for which, loaded in zip(("whole", "offloaded"), pairs[tiny_family]):
        before = logits(loaded)
        with Session.open(tmp_path / which, loaded=loaded, method=method, method_config=CONFIGS[method]) as s:
            [record] = s.edit(EDIT)  # seeded by the session: the same training on both
            results[which] = logits(loaded)
            s.rollback(record.id)
            assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(logits(loaded), before))
    edited = results["whole"]
    assert not all(torch.equal(a, b) for a, b in zip(edited, logits(pairs[tiny_family][0])))  # the edit did something
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(results["offloaded"], edited))


def test_methods_that_rewrite_weights_refuse_offloaded_layers(pairs, tmp_path):
    whole, off = pairs["llama"]
    with pytest.raises(InvalidRequest, match="offload"):
        Session.open(tmp_path / "ue", loaded=off, method="ultraedit", method_config={"layers": [3]})
    assert not (tmp_path / "ue").exists()  # refused before anything was written
    with Session.open(tmp_path / "ft", loaded=off, method="ft", method_config=CONFIGS["ft"]) as s:
        s.edit(EDIT)
        with pytest.raises(InvalidRequest, match="offload"):
            export(s, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_interventions_on_offloaded_layers_match_the_whole_model(pairs, tiny_family, tmp_path):
    from editkit.plugins.reweave import reweaving

    whole = pairs[tiny_family][0]
    cfg = {"capture_layers": [0.5], "reweave_layer": -1, "heads": 2, "head_dim": 8}  # reweaves block 3
    with reweaving(whole, cfg) as rw:
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in rw.module.parameters():  # a stand-in for trained weights
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
        reweave_state = rw.state_dict()
    heads = ({"heads": torch.tensor([[2, 0], [3, 1]])}, {"k": 2, "kind": "context"})
    results = {}
    for which, loaded in zip(("whole", "offloaded"), pairs[tiny_family]):
        with Session.open(tmp_path / which, loaded=loaded, method="ft", method_config=CONFIGS["ft"]) as s:
            s.add_intervention("ph3", {"favour": "memory"}, state=heads)
            pruned = logits(loaded)
            rw = s.add_intervention("reweave", cfg, state=reweave_state)
            with rw.conversation("c"), torch.no_grad():
                loaded.model(**loaded.tokenizer("The code for the red door is 4821.", return_tensors="pt"))
                results[which] = pruned + logits(loaded)
    assert not all(torch.equal(a, b) for a, b in zip(results["whole"], logits(whole)))
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(results["offloaded"], results["whole"]))
