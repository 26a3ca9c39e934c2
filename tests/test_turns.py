"""Editors that edit in turns: a Session.edit call is one turn, each request journaled as its
own entry; rolling one back solves its turn again without it; the evaluation runner hands
edits over in turns cut at its measurement points."""

from __future__ import annotations

import json

import pytest
import torch

from editkit.evaluation.runner import run_eval
from editkit.session import Session
from editkit.testing import stand_in_host

REQ = [{"prompt": f"fact {i}", "target_new": f"t{i}"} for i in range(9)]


def rows(session) -> torch.Tensor:
    return session.editor.state_dict()[0]["rows"]


def open_ws(path, loaded, **kw):
    return Session.open(path, loaded=loaded, method="append-turns-test", method_config={"width": 3},
                        host=stand_in_host(), **kw)


def test_a_call_is_one_turn_journaled_per_edit(tmp_path, tiny_loaded):
    loaded = tiny_loaded["gpt2"]
    with open_ws(tmp_path / "ws", loaded, checkpoint_every=2) as s:
        first = s.edit(REQ[:4], measure=False)
        second = s.edit(REQ[4:6], measure=False)
        assert [r.id for r in first + second] == [1, 2, 3, 4, 5, 6]
        assert [r.turn for r in s.history()] == [1, 1, 1, 1, 5, 5]
        assert s.journal.checkpoint_ids() == [4, 6]  # checkpoints fall on turn ends
        state = rows(s)
        s.rollback(2)  # turn 1 is solved again without edit 2; turn 5 replayed after it
        after = rows(s)
    with open_ws(tmp_path / "ref", loaded) as ref:
        ref.edit([REQ[0], REQ[2], REQ[3]], measure=False)
        ref.edit(REQ[4:6], measure=False)
        assert torch.equal(rows(ref), after)
        assert not torch.equal(after[:3], state[[0, 2, 3]])  # the turn really changed
    with open_ws(tmp_path / "ws", loaded) as s:
        assert torch.equal(rows(s), after)
        assert [r.status for r in s.history()] == ["applied", "rolled_back"] + ["applied"] * 4


def test_the_runner_applies_turns_cut_at_measurement_points(tmp_path, tiny_loaded):
    loaded = tiny_loaded["gpt2"]
    data = tmp_path / "edits.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in REQ) + "\n")
    report = run_eval(tmp_path / "run", suite="jsonl", data=str(data), methods=["append-turns-test"], edits=9,
                      at=[2, 5], turn_size=4, configs={"append-turns-test": {"width": 3}}, loaded=loaded,
                      host=stand_in_host(), plots=False)
    m = report["methods"]["append-turns-test"]
    assert [cp["step"] for cp in m["checkpoints"]] == [2, 5, 9]
    assert [cp["measured"] for cp in m["checkpoints"]] == [2, 5, 9]
    ws = tmp_path / "run" / "methods" / "append-turns-test" / "workspace"
    with open_ws(ws, loaded) as s:
        assert [r.turn for r in s.history()] == [1, 1, 3, 3, 3, 6, 6, 6, 6]
    assert report["turn_size"] == 4 and "turns of 4" in (tmp_path / "run" / "report.md").read_text()


def test_at_points_equal_shorter_runs_and_sample_limits_measurement(tmp_path, tiny_loaded):
    loaded = tiny_loaded["gpt2"]
    data = tmp_path / "edits.jsonl"
    records = [{"prompt": p, "target_new": t, "rephrases": [p.lower()]}
               for p, t in [("The capital of France is", "Rome"), ("The largest planet is", "Paris"),
                            ("Who wrote Hamlet?", "Berlin"), ("The capital of Italy is", "Jupiter"),
                            ("The quick brown fox jumps over", "Hamlet"), ("The capital of Germany is", "fox")]]
    data.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    common = dict(suite="jsonl", data=str(data), methods=["grace"], configs={"grace": {"steps": 3}},
                  loaded=loaded, plots=False)
    long = run_eval(tmp_path / "long", edits=6, at=[3], **common)
    short = run_eval(tmp_path / "short", edits=3, **common)
    at3 = next(cp for cp in long["methods"]["grace"]["checkpoints"] if cp["step"] == 3)
    assert at3["items"] == {str(i): m for i, m in enumerate(e["metrics"] for e in short["methods"]["grace"]["per_edit"])}
    assert "Figures at each measurement point" in (tmp_path / "long" / "report.md").read_text()
    sampled = run_eval(tmp_path / "sampled", edits=6, protocol="retention", every=2, sample=2, seed=1, **common)
    points = sampled["methods"]["grace"]["checkpoints"]
    chosen = json.loads((tmp_path / "sampled" / "run.json").read_text())["sampled"]
    assert len(chosen) == 2
    for cp in points:
        assert sorted(int(i) for i in cp["items"]) == [i for i in chosen if i < cp["step"]]
    base = json.loads((tmp_path / "sampled" / "baseline.json").read_text())["items"]
    assert [i for i, item in enumerate(base) if item] == sorted(chosen)  # the unedited model: only what is measured
    assert sampled["baseline"]["records"] == 2 and "the 2 records some point measures" in \
        (tmp_path / "sampled" / "report.md").read_text()
    from editkit.errors import InvalidRequest

    with pytest.raises(InvalidRequest, match="--at"):
        run_eval(tmp_path / "bad", edits=3, at=[7], **common)
    with pytest.raises(InvalidRequest, match="--protocol final"):
        run_eval(tmp_path / "bad", edits=3, at=[1], protocol="retention", **common)
