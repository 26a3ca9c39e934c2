"""The evaluation runner and reports: every protocol on a tiny model, resumption after an
interruption, determinism, the CLI commands, and (with the real default model and ../shared
zsRE) a 10-edit comparison of the built-in methods."""

from __future__ import annotations

import json
import time

import pytest

from editkit.errors import InvalidRequest, WorkspaceError
from editkit.evaluation.report import markdown
from editkit.evaluation.runner import parse_method_configs, run_eval
from editkit.host import get_host

from conftest import shared_path

FAST = {"ft": {"steps": 3}, "grace": {"steps": 5}}


@pytest.fixture(scope="module")
def gpt2(tiny_loaded):
    return tiny_loaded["gpt2"]


def run(out, loaded, protocol="final", methods=("ft", "grace"), **kw):
    return run_eval(out, suite="builtin", data=None, methods=list(methods), edits=3, protocol=protocol,
                    configs={m: FAST[m] for m in methods}, loaded=loaded, plots=kw.pop("plots", False), **kw)


@pytest.mark.parametrize("protocol", ["final", "immediate", "retention", "groups"])
def test_protocols_write_a_report(gpt2, tmp_path, protocol):
    report = run(tmp_path, gpt2, protocol, every=2, group_size=2)
    assert report["protocol"] == protocol and report["edits"] == 3
    assert set(report["definitions"]) >= {"tf", "em", "loc_tf", "loc_em", "loc_acc"}
    for name in ("ft", "grace"):
        m = report["methods"][name]
        assert m["complete"] and m["edits_applied"] == 3 and m["seconds_per_edit"] > 0
        assert all(e["metrics"] is not None and e["stats"]["seconds"] > 0 for e in m["per_edit"])
        for key in ("rel_tf", "rel_em", "gen_tf", "gen_em", "loc_tf", "loc_em", "loc_acc_tf", "loc_acc_em"):
            assert 0.0 <= m["summary"][key] <= 1.0
    steps = [cp["step"] for cp in report["methods"]["grace"]["checkpoints"]]
    assert steps == {"final": [3], "immediate": [1, 2, 3], "retention": [2, 3], "groups": [2, 3]}[protocol]
    text = (tmp_path / "report.md").read_text()
    assert f"protocol `{protocol}`" in text and "teacher-forced" in text and "exact match" in text
    assert "| grace |" in text and "| ft |" in text and "| unedited |" in text
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk["methods"]["ft"]["per_edit"][0]["metrics"] == report["methods"]["ft"]["per_edit"][0]["metrics"]


def test_plots(gpt2, tmp_path):
    run(tmp_path, gpt2, "retention", methods=("grace",), every=1, plots=True)
    for name in ("metrics_vs_edits.png", "retention.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


def test_resume_after_interruption(gpt2, tmp_path):
    class Stop(Exception):
        pass

    def interrupt(method, done, total, note):
        if method == "grace" and done == 2 and note.startswith("edit"):
            raise Stop

    with pytest.raises(Stop):
        run(tmp_path, gpt2, "immediate", progress=interrupt)
    notes = []
    report = run(tmp_path, gpt2, "immediate", progress=lambda m, d, t, n: notes.append((m, d, n)))
    # ft finished before the interruption; grace had journaled 2 edits: only its third is applied.
    applied = [(m, d) for m, d, n in notes if n.startswith("edit")]
    assert applied == [("grace", 3)]
    assert report["methods"]["grace"]["complete"] and report["methods"]["grace"]["edits_applied"] == 3
    assert [cp["step"] for cp in report["methods"]["grace"]["checkpoints"]] == [1, 2, 3]


def test_deterministic_and_refuses_another_run(gpt2, tmp_path):
    a = run(tmp_path / "a", gpt2, "final", methods=("grace",), seed=3, select="random")
    b = run(tmp_path / "b", gpt2, "final", methods=("grace",), seed=3, select="random")
    assert [e["metrics"] for e in a["methods"]["grace"]["per_edit"]] == \
        [e["metrics"] for e in b["methods"]["grace"]["per_edit"]]
    assert [e["prompt"] for e in a["methods"]["grace"]["per_edit"]] == \
        [e["prompt"] for e in b["methods"]["grace"]["per_edit"]]
    with pytest.raises(WorkspaceError, match="different run"):
        run(tmp_path / "a", gpt2, "immediate", methods=("grace",), seed=3, select="random")
    with pytest.raises(WorkspaceError, match="config"):
        run_eval(tmp_path / "a", suite="builtin", data=None, methods=["grace"], edits=3, seed=3,
                 select="random", configs={"grace": {"steps": 6}}, loaded=gpt2, plots=False)


def test_bad_arguments(gpt2, tmp_path):
    with pytest.raises(InvalidRequest, match="protocol"):
        run(tmp_path, gpt2, "sometimes")
    with pytest.raises(InvalidRequest, match="METHOD.KEY=VALUE"):
        parse_method_configs(["steps=3"], ["ft"])
    with pytest.raises(InvalidRequest, match="not among"):
        parse_method_configs(["wise.steps=3"], ["ft"])
    assert parse_method_configs(["ft.steps=3", "ft.layer=0.5", "grace.component=block.out"], ["ft", "grace"]) == \
        {"ft": {"steps": 3, "layer": 0.5}, "grace": {"component": "block.out"}}


def test_cli_eval_and_report(tiny_dirs, tmp_path):
    from typer.testing import CliRunner

    from editkit.cli.main import build_app

    data = tmp_path / "edits.jsonl"
    rows = [{"prompt": "The capital of Germany is", "target_new": "Paris",
             "locality": [{"prompt": "Who wrote Hamlet?", "answer": "William Shakespeare"}]},
            {"prompt": "bad record"},
            {"prompt": "The quick brown fox jumps over", "target_new": "capital", "rephrases": ["A fox jumps over"]}]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "run"
    app = build_app(get_host())
    args = ["eval", "--suite", "jsonl", "--data", str(data), "--method", "grace", "--method", "ft", "--edits", "5",
            "--out", str(out), "--model", str(tiny_dirs["gpt2"]), "--device", "cpu", "--config", "ft.steps=2",
            "--config", "grace.steps=3"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1 and "record 1" in result.output and "target_new" in result.output
    result = CliRunner().invoke(app, args + ["--skip-invalid"])
    assert result.exit_code == 0, result.output
    assert "| grace |" in result.output and "skipped 1 invalid record" in result.output
    assert (out / "metrics_vs_edits.png").exists()
    (out / "report.md").unlink()
    result = CliRunner().invoke(app, ["report", str(out), "--no-plots"])
    assert result.exit_code == 0, result.output
    assert "| ft |" in (out / "report.md").read_text()
    result = CliRunner().invoke(app, ["report", str(tmp_path / "nothing")])
    assert result.exit_code == 1 and "not an evaluation run" in result.output


@pytest.mark.model
@pytest.mark.shared
def test_ten_zsre_edits_on_the_default_model(default_model, tmp_path):
    """10 sequential zsRE dev edits per baseline (final protocol) end in a report; GRACE keeps
    its edits and leaves the unrelated probes alone. WISE (~10x the seconds per edit) is measured
    by benchmarks/wise.py and its own default-model test, keeping this suite's time bounded."""
    data = shared_path("zsre")
    methods = ["ft", "grace"]
    started = time.perf_counter()
    report = run_eval(tmp_path, suite="zsre", data=str(data), methods=methods, edits=10, protocol="final",
                      loaded=default_model, plots=True)
    elapsed = time.perf_counter() - started
    print(f"\n{markdown(report)}\n({elapsed:.0f} s for {', '.join(methods)})")
    assert (tmp_path / "report.md").exists() and (tmp_path / "metrics_vs_edits.png").exists()
    for m in methods:
        assert report["methods"][m]["complete"]
    g = report["methods"]["grace"]["summary"]
    assert g["rel_tf"] >= 0.95 and g["rel_em"] >= 0.9
    assert g["loc_tf"] >= 0.98 and g["loc_em"] >= 0.98


def test_compare_runs_and_per_edit_csv(gpt2, tmp_path):
    import csv

    from editkit.evaluation.compare import compare_runs, render_comparison

    a = run(tmp_path / "a", gpt2, "final", methods=("grace",))
    run(tmp_path / "b", gpt2, "final", methods=("ft",))
    rows = list(csv.DictReader((tmp_path / "a" / "per_edit.csv").open()))
    assert [r["edit"] for r in rows] == ["1", "2", "3"] and rows[0]["method"] == "grace"
    assert float(rows[0]["rel_tf"]) == pytest.approx(a["methods"]["grace"]["per_edit"][0]["metrics"]["rel_tf"], abs=1e-6)
    merged = compare_runs([tmp_path / "a", tmp_path / "b"])
    assert list(merged["methods"]) == ["a/grace", "b/ft"] and merged["differences"] == []
    render_comparison(merged, tmp_path / "cmp", plots=False)
    text = (tmp_path / "cmp" / "compare.md").read_text()
    assert "| a/grace |" in text and "| b/ft |" in text
    run(tmp_path / "c", gpt2, "final", methods=("ft",), seed=5)
    with pytest.raises(InvalidRequest, match="not comparable.*seed"):
        compare_runs([tmp_path / "a", tmp_path / "c"])
    forced = compare_runs([tmp_path / "a", tmp_path / "c"], force=True)
    render_comparison(forced, tmp_path / "cmp2", plots=False)
    assert "Not like for like" in (tmp_path / "cmp2" / "compare.md").read_text()


def test_log_to_trackers_offline(gpt2, tmp_path, monkeypatch):
    """wandb in offline mode, mlflow to a SQLite store in the run folder, tensorboard event files:
    each holds the figures of every measurement point with the number of edits as the step."""
    from editkit.evaluation.tracking import check_trackers, log_report

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    report = run(tmp_path / "r", gpt2, "retention", methods=("grace",), every=1)
    log_report(report, tmp_path / "r", ["wandb", "mlflow", "tensorboard"], name="tiny")
    assert list((tmp_path / "r" / "wandb").glob("offline-run-*/run-*.wandb"))

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{(tmp_path / 'r' / 'mlflow.db').resolve()}")
    (mlrun,) = client.search_runs([client.get_experiment_by_name("editkit").experiment_id])
    history = client.get_metric_history(mlrun.info.run_id, "grace.rel_tf")
    assert sorted(m.step for m in history) == [1, 2, 3]
    assert mlrun.data.params["protocol"] == "retention" and mlrun.data.params["grace.steps"] == "5"

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "r" / "tensorboard" / "tiny"))
    events.Reload()
    steps = [e.step for e in events.Scalars("grace/rel_tf")]
    assert steps == [1, 2, 3]
    with pytest.raises(InvalidRequest, match="use one of wandb, mlflow, tensorboard"):
        check_trackers(["neptune"])
