"""The service's scheduler batches concurrent generations: batched text equals each request
alone (greedy) whatever the editor, edited and unedited rows route on their own, a seeded
request samples the same alone or batched, an edit waits for the batch in flight and the
next batch sees it, a cancelled request frees its row."""

from __future__ import annotations

import threading
import time

import pytest

from editkit.generation import Row
from editkit.rwlock import RWLock
from editkit.service.scheduler import Scheduler
from editkit.service.telemetry import Telemetry
from editkit.session import Session

EDIT = {"prompt": "The capital of France is", "target_new": "Rome"}
PROMPTS = ["The capital of France is", "Who wrote Hamlet?", "the quick brown fox jumps over the lazy",
           "The largest planet is", "The capital of France is"]
CONFIGS = {
    "ft": {"steps": 3, "lr": 0.05, "norm_constraint": 10.0, "early_stop_loss": 0.0},
    "grace": {"steps": 20},
    "wise": {"steps": 6, "n_contexts": 2, "context_lengths": [3], "lr": 0.1, "unrelated_per_edit": 2, "replay": 1},
    "nmc": {"fast_steps": 0, "slow_steps": 40, "slow_lr": 0.5, "threshold": 0.9, "gate_width": 0.05, "margin": 0.2},
}


def batched(scheduler: Scheduler, jobs: list[list[Row]], conversation=None):
    """Submit every job at once (they share batches) and wait for all."""
    submitted = [scheduler.submit(rows, conversation) for rows in jobs]
    return [[d.text for d in job.wait()] for job in submitted]


@pytest.fixture
def scheduler_for():
    made = []

    def make(session, window=0.3, rows=32):
        lock, telemetry = RWLock(), Telemetry()
        s = Scheduler(session, lock, telemetry, max_rows=rows, window=window)
        made.append(s)
        return s, lock, telemetry

    yield make
    for s in made:
        s.close()


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_batched_text_equals_each_request_alone(tmp_path, tiny_loaded, scheduler_for, method):
    loaded = tiny_loaded["llama"]
    with Session.open(tmp_path / "ws", loaded=loaded, method=method, method_config=CONFIGS[method]) as s:
        s.edit(EDIT, measure=False)
        alone = [s.generate([p], max_new_tokens=8)[0] for p in PROMPTS]
        scheduler, _, telemetry = scheduler_for(s)
        together = batched(scheduler, [[Row(p, 8)] for p in PROMPTS])
        assert [t[0] for t in together] == alone
        assert telemetry.value("editkit_batch_rows_count") < len(PROMPTS)  # they did share batches
        assert telemetry.value("editkit_generated_tokens_total") > 0


def test_seeded_sampling_is_the_same_alone_or_batched(tmp_path, tiny_loaded, scheduler_for):
    loaded = tiny_loaded["gpt2"]
    with Session.open(tmp_path / "ws", loaded=loaded, method="ft", method_config=CONFIGS["ft"]) as s:
        scheduler, _, _ = scheduler_for(s)
        seeded = [Row("The capital of France is", 10, temperature=1.0, top_p=0.9, seed=42)]
        (alone,) = batched(scheduler, [seeded])
        others = [[Row(p, 6, temperature=0.7)] for p in PROMPTS[1:]]
        together = batched(scheduler, [*others[:2], seeded, *others[2:]])
        assert together[2] == alone
        assert alone == s.generate(["The capital of France is"], max_new_tokens=10, temperature=1.0, top_p=0.9,
                                   seed=42)  # the library's one-stream call gives it too


def test_an_edit_waits_for_the_batch_in_flight(tmp_path, tiny_loaded, scheduler_for):
    loaded = tiny_loaded["gpt2"]
    with Session.open(tmp_path / "ws", loaded=loaded, method="ft", method_config=CONFIGS["ft"]) as s:
        before = s.generate([EDIT["prompt"]], max_new_tokens=30)[0]
        scheduler, lock, telemetry = scheduler_for(s, window=0.0)
        job = scheduler.submit([Row(EDIT["prompt"], 30)])
        while telemetry.value("editkit_generations_in_flight") < 1:  # the batch is decoding
            time.sleep(0.001)
        done = {}

        def edit():
            with telemetry.edit(lock):
                done["records"] = s.edit(EDIT, measure=False)
                done["at"] = time.perf_counter()

        editor = threading.Thread(target=edit)
        editor.start()
        (result,) = job.wait()
        finished = time.perf_counter()
        editor.join()
        assert result.text == before  # the batch finished on the state it started with
        assert done["at"] > finished - 0.05 and telemetry.value("editkit_edit_wait_seconds_count") == 1
        after = batched(scheduler, [[Row(EDIT["prompt"], 30)]])[0][0]
        assert after == s.generate([EDIT["prompt"]], max_new_tokens=30)[0] != before  # the next batch sees it


def test_a_cancelled_request_frees_its_row(tmp_path, tiny_loaded, scheduler_for):
    loaded = tiny_loaded["gpt2"]
    with Session.open(tmp_path / "ws", loaded=loaded, method="ft", method_config=CONFIGS["ft"]) as s:
        scheduler, _, _ = scheduler_for(s, window=0.0)
        seen = []
        job = scheduler.submit([Row("The capital of France is", 100, temperature=1.0, seed=1)],
                               on_token=lambda j, tok, text: seen.append(tok))
        while len(seen) < 3:
            time.sleep(0.001)
        job.cancelled = True
        (result,) = job.wait()
        assert result.finish == "cancelled" and len(result.ids) < 100
