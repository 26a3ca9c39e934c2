"""Kill -9 in the middle of an edit, then open the workspace: it is consistent and holds
every edit that completed, and nothing of the interrupted one."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from editkit.session import Session

CHILD = textwrap.dedent("""
    import os, signal, sys
    import editkit.chunks as chunks
    from editkit.session import Session
    from editkit.store import Journal

    model_dir, ws, crash_at = sys.argv[1], sys.argv[2], sys.argv[3]
    armed = {"on": False}  # set once two edits are committed: the third edit is the one killed

    def kill_when_armed(original):
        def wrapper(*args, **kwargs):
            if armed["on"]:
                os.kill(os.getpid(), signal.SIGKILL)
            return original(*args, **kwargs)
        return wrapper

    real_point = chunks.crash_point

    def point(name):
        if name == crash_at and armed["on"]:
            os.kill(os.getpid(), signal.SIGKILL)
        real_point(name)

    chunks.crash_point = point  # chunk-written: temporary file written; chunk-renamed: in place
    if crash_at == "before-commit":  # every chunk written, the journal transaction not begun
        Journal.commit_turn = kill_when_armed(Journal.commit_turn)
    elif crash_at == "mid-commit":  # inside the transaction, before COMMIT
        Journal._apply = kill_when_armed(Journal._apply)
    elif crash_at == "after-commit":  # committed; superseded chunks not yet deleted
        Session._saved = kill_when_armed(Session._saved)

    s = Session.open(ws, model=model_dir, method="ft", device="cpu",
                     method_config={"steps": 30, "early_stop_loss": 0.0}, checkpoint_every=2)
    for i in range(50):
        (record,) = s.edit({"prompt": f"The capital of France is number {i}", "target_new": "Rome"},
                           measure=False)
        print("committed", record.id, flush=True)
        armed["on"] = record.id >= 2
""")


def run_child(tmp_path, model_dir, ws, crash_at):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    return subprocess.Popen([sys.executable, str(script), str(model_dir), str(ws), crash_at],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def check_consistent(ws, loaded, committed: list[int]):
    with Session.open(ws, loaded=loaded) as s:
        ids = [r.id for r in s.history()]
        # Every acknowledged edit is present; at most one more finished its commit unannounced.
        assert ids[: len(committed)] == committed
        assert len(ids) - len(committed) <= 1
        assert ids == list(range(1, len(ids) + 1))
        files = {p.name for p in (ws / "state").rglob("*") if p.is_file()}
        assert files == s.journal.live_chunks()  # what the interrupted edit left was swept
        with torch.no_grad():
            edited = loaded.model(loaded.tokenizer("The capital of France is", return_tensors="pt").input_ids).logits
        requests = [r.request for r in s.history()]
    # The recovered state equals a clean replay of the journaled edits.
    with Session.open(ws.parent / "replay", loaded=loaded, method="ft",
                      method_config={"steps": 30, "early_stop_loss": 0.0}) as ref:
        ref.edit(requests, measure=False)
        with torch.no_grad():
            replayed = loaded.model(loaded.tokenizer("The capital of France is", return_tensors="pt").input_ids).logits
    assert torch.equal(edited, replayed)


@pytest.mark.parametrize("crash_at", ["chunk-written", "chunk-renamed", "before-commit", "mid-commit",
                                      "after-commit"])
def test_kill_at_each_step_of_a_state_write(tmp_path, tiny_dirs, tiny_loaded, crash_at):
    ws = tmp_path / "ws"
    proc = run_child(tmp_path, tiny_dirs["gpt2"], ws, crash_at)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, err
    committed = [int(line.split()[1]) for line in out.splitlines() if line.startswith("committed")]
    assert committed == [1, 2]
    check_consistent(ws, tiny_loaded["gpt2"], committed)
    with Session.open(ws, loaded=tiny_loaded["gpt2"]) as s:  # the third edit: in only once committed
        assert len(s.history()) == (3 if crash_at == "after-commit" else 2)


def test_kill_at_a_random_moment(tmp_path, tiny_dirs, tiny_loaded):
    ws = tmp_path / "ws"
    proc = run_child(tmp_path, tiny_dirs["gpt2"], ws, "none")
    committed = []
    for line in proc.stdout:
        committed.append(int(line.split()[1]))
        if len(committed) == 3:
            time.sleep(0.05)  # somewhere inside the fourth edit
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=60)
    committed += [int(line.split()[1]) for line in proc.stdout.read().splitlines() if line.startswith("committed")]
    check_consistent(ws, tiny_loaded["gpt2"], committed)
