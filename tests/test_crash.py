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
    from editkit.session import Session
    from editkit.store import Journal, StateStore

    model_dir, ws, crash_at = sys.argv[1], sys.argv[2], sys.argv[3]
    calls = {"n": 0}

    def die_on_third(original):
        def wrapper(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 3:
                os.kill(os.getpid(), signal.SIGKILL)
            return original(*args, **kwargs)
        return wrapper

    if crash_at == "before-commit":  # state written, journal not yet committed
        Journal.commit_edit = die_on_third(Journal.commit_edit)
    elif crash_at == "mid-state-write":  # in the middle of writing the state files
        import safetensors.torch as st
        import editkit.store as store
        store.save_file = die_on_third(st.save_file)

    s = Session.open(ws, model=model_dir, method="ft", device="cpu",
                     method_config={"steps": 30, "early_stop_loss": 0.0}, checkpoint_every=2)
    for i in range(50):
        (record,) = s.edit({"prompt": f"The capital of France is number {i}", "target_new": "Rome"},
                           measure=False)
        print("committed", record.id, flush=True)
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
        live = {p.name for p in (ws / "state").iterdir()}
        assert live == s.journal.referenced_states()  # interrupted state was swept
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


@pytest.mark.parametrize("crash_at", ["before-commit", "mid-state-write"])
def test_kill_at_the_worst_moments(tmp_path, tiny_dirs, tiny_loaded, crash_at):
    ws = tmp_path / "ws"
    proc = run_child(tmp_path, tiny_dirs["gpt2"], ws, crash_at)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, err
    committed = [int(line.split()[1]) for line in out.splitlines() if line.startswith("committed")]
    assert committed == [1, 2]
    check_consistent(ws, tiny_loaded["gpt2"], committed)


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
