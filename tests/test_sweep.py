"""Evaluation sweeps on tiny models: cells run one after another or as Ray tasks with the
same figures; a failing cell is retried once and reported while the others finish; a Ray
worker killed mid-cell is replaced and the cell resumes from its journal; an interrupted
driver resumes without redoing finished cells."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from editkit.errors import InvalidRequest
from editkit.evaluation.sweep import Sweep, grid_points, read_spec


def write_spec(folder, model, **extra) -> object:
    spec = {"suites": [{"name": "builtin"}], "methods": {"ft": {"steps": {"grid": [2, 3]}}, "grace": {"steps": 3}},
            "seeds": [0], "edits": 2, "model": str(model), **extra}
    path = folder / "spec.json"
    path.write_text(json.dumps(spec))
    return path


def figures(result) -> dict:
    return {c["id"]: c.get("summary") for c in result["cells"]}


def test_grids_and_spec_errors(tmp_path):
    assert grid_points({"a": {"grid": [1, 2]}, "b": {"grid": ["x", "y"]}, "c": [5, 10]}) == [
        {"c": [5, 10], "a": 1, "b": "x"}, {"c": [5, 10], "a": 1, "b": "y"},
        {"c": [5, 10], "a": 2, "b": "x"}, {"c": [5, 10], "a": 2, "b": "y"}]
    bad = tmp_path / "bad.yaml"
    bad.write_text("suites: [{name: builtin}]\nmethods: {ft: {}}\nedits: 0\n")
    with pytest.raises(InvalidRequest, match="sweep spec .*edits"):
        read_spec(bad)
    bad.write_text("suites: [{name: builtin\n")
    with pytest.raises(InvalidRequest, match="not valid YAML"):
        read_spec(bad)


def test_local_sweep_resumes_and_reports_a_failing_cell(tmp_path, tiny_dirs):
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "only a prompt"}\n')
    spec = read_spec(write_spec(tmp_path, tiny_dirs["gpt2"]))
    spec.suites.append(type(spec.suites[0])(name="jsonl", data=str(broken)))
    notes = []
    result = Sweep(spec, tmp_path / "out").run(progress=lambda c, w: notes.append((c, w)))
    failed = [c for c in result["cells"] if c["status"] == "failed"]
    assert len(result["cells"]) == 6 and len(failed) == 3 and all(c["suite"] == "jsonl" for c in failed)
    told = [w for c, w in notes if c == failed[0]["id"]]
    assert told[:2] == ["running (attempt 1)", "running (attempt 2)"] and told[2].startswith("failed: ")
    assert "target_new" in failed[0]["error"]
    assert all(c["status"] == "complete" and c["attempts"] == 1 for c in result["cells"] if c["suite"] == "builtin")
    text = (tmp_path / "out" / "sweep.md").read_text()
    assert "Mean ± std over seeds" in text and "failed" in text and (tmp_path / "out" / "compare-builtin" / "compare.md").exists()
    again = Sweep(spec, tmp_path / "out").run(progress=lambda c, w: notes.append((c, w)))
    assert figures(again) == figures(result)
    assert sum(w == "done before: skipped" for _, w in notes) == 3
    other = read_spec(write_spec(tmp_path, tiny_dirs["gpt2"], seeds=[1]))
    from editkit.errors import WorkspaceError

    with pytest.raises(WorkspaceError, match="another sweep"):
        Sweep(other, tmp_path / "out").run()


@pytest.fixture(scope="module")
def ray_runtime():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_ray_cells_equal_local_cells_and_survive_a_killed_worker(tmp_path, tiny_dirs, ray_runtime):
    path = write_spec(tmp_path, tiny_dirs["gpt2"], edits=6, methods={"grace": {"steps": {"grid": [40, 60]}}})
    local = Sweep(read_spec(path), tmp_path / "local").run()
    job = Sweep(read_spec(path), tmp_path / "ray")
    victim = job.folder(job.cells[1]) / "attempts.jsonl"
    done = {}
    runner = threading.Thread(target=lambda: done.setdefault("result", job.run(ray_address="local")))
    runner.start()
    deadline = time.time() + 600  # Ray's workers start slowly on a loaded 2-core machine
    while not victim.exists() and time.time() < deadline:
        time.sleep(0.05)
    assert victim.exists(), "the Ray cell never started within 10 minutes"
    time.sleep(1.0)  # inside the cell: model loaded, edits under way
    os.kill(json.loads(victim.read_text().splitlines()[0])["pid"], signal.SIGKILL)
    runner.join(timeout=300)
    result = done["result"]
    assert [c["status"] for c in result["cells"]] == ["complete", "complete"]
    assert result["cells"][1]["attempts"] == 2  # the killed worker's cell ran again, resuming its journal
    assert figures(result) == figures(local)


def test_an_interrupted_driver_resumes(tmp_path, tiny_dirs):
    path = write_spec(tmp_path, tiny_dirs["gpt2"])
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "editkit.cli", "sweep", str(path), "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    first = None
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        reports = sorted(out.glob("cells/*/report.json"))
        if reports:
            first = reports[0]
            break
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert first is not None
    stamp = first.stat().st_mtime_ns
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "sweep.json").read_text())
    assert [c["status"] for c in summary["cells"]] == ["complete"] * 3
    assert first.stat().st_mtime_ns == stamp  # the finished cell was not run again
