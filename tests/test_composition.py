"""Composition on the real default model: one workspace with NMC edits, PH3 pruning that
favours the context, and memory reweaving, attached together; each still does its job with
the others attached."""

from __future__ import annotations

import pytest
import torch

from editkit.plugins.ph3 import choose_k, evaluate_rates
from editkit.plugins.reweave import evaluate
from editkit.schemas import EditRequest
from editkit.session import Session

EDITS = [EditRequest(prompt="The Eiffel Tower is located in the city of", target_new="Rome", subject="The Eiffel Tower"),
         EditRequest(prompt="The mother tongue of Michel Denisot is", target_new="Russian", subject="Michel Denisot"),
         EditRequest(prompt="Porsche 911 is produced by", target_new="Honda", subject="Porsche 911")]


def held(session) -> list[bool]:
    """Whether each edit's prompt now continues with its new target (greedy)."""
    out = session.generate([e.prompt for e in EDITS], max_new_tokens=4)
    return [text.strip().startswith(e.target_new) for text, e in zip(out, EDITS)]


@pytest.mark.model
@pytest.mark.shared
def test_edits_ph3_and_reweave_work_together(default_model, tmp_path, located_ph3, trained_reweave):
    loaded = default_model
    parts, scores = located_ph3["parts"], located_ph3["scores"]
    with Session.open(tmp_path / "ws", loaded=loaded, method="nmc") as session:
        session.edit(EDITS, measure=False)
        assert all(held(session))
        context_before = evaluate_rates(loaded, parts["test"])["context_rate"]

        # PH3 favouring the context: prune the memory heads, k chosen on validation
        k = choose_k(loaded, scores, "context", parts["validation"], ks=(1, 2, 4),
                     baseline=located_ph3["base_validation"])["k"]
        assert k >= 1
        heads = scores.top("memory", k)
        session.add_intervention("ph3", {"favour": "context"},
                                 state=({"heads": torch.tensor(heads)}, {"k": k, "kind": "memory"}))
        session.add_intervention("reweave", trained_reweave["config"], state=trained_reweave["state"])
        rw = session.interventions["reweave"]

        # everything attached: the edits hold, the context wins conflicts, recall works
        assert all(held(session)), "an edit stopped holding with PH3 and reweave attached"
        context_after = evaluate_rates(loaded, parts["test"])["context_rate"]
        woven = evaluate(rw, trained_reweave["held_out"], use_memory=True)
        print(f"\ncomposition: k={k} heads={heads} context rate {context_before:.2f} -> {context_after:.2f}; "
              f"recall {woven} (alone {trained_reweave['woven']}, frozen {trained_reweave['base']})")
        assert context_after >= context_before + 0.1
        assert woven["token_accuracy"] > trained_reweave["base"]["token_accuracy"] + 0.5
        assert woven["exact"] > 0.5

        session.remove_intervention("reweave")
        session.remove_intervention("ph3")
        assert all(held(session))
