"""Read replicas: a session that follows a workspace switches to each head its writer commits
(reading only the changed chunks); over HTTP, a writer and two replicas on loopback, where
every replica serves an acknowledged edit within its poll interval, one killed with kill -9
and restarted catches up, and no replica writes the journal."""

from __future__ import annotations

import signal
import time

import httpx
import torch

from conftest import TOKEN
from editkit.model import load_model
from editkit.session import Session
from editkit.errors import WorkspaceError
from test_serve import AUTH, EDIT, Served, Server

FAST = {"steps": 3, "lr": 0.05, "norm_constraint": 10.0, "early_stop_loss": 0.0}


@torch.no_grad()
def logits(loaded, text="The capital of France is Paris. Who wrote Hamlet?"):
    return loaded.model(loaded.tokenizer(text, return_tensors="pt").input_ids).logits


def test_a_following_session_switches_to_the_writers_heads(tmp_path, tiny_dirs):
    writer_model = load_model(str(tiny_dirs["llama"]), device="cpu")
    replica_model = load_model(str(tiny_dirs["llama"]), device="cpu")  # its own copy: its own hooks
    ws = tmp_path / "ws"
    with Session.open(ws, loaded=writer_model, method="ft", method_config=FAST) as writer:
        writer.edit(EDIT, measure=False)
        with Session.open(ws, loaded=replica_model, follow=True) as replica:
            assert torch.equal(logits(replica_model), logits(writer_model))
            assert replica.poll() is None  # nothing new
            writer.edit({"prompt": "Who wrote Hamlet?", "target_new": "Paris"}, measure=False)
            polled = replica.poll()
            assert polled is not None and replica.chunks.fetched < 10  # only what the edit changed was read
            replica.switch(polled)
            assert torch.equal(logits(replica_model), logits(writer_model))
            writer.add_intervention("ph3", {"favour": "memory"},
                                    state=({"heads": torch.tensor([[1, 0]])}, {"k": 1, "kind": "context"}))
            replica.switch(replica.poll())
            assert "ph3" in replica.interventions and torch.equal(logits(replica_model), logits(writer_model))
            try:
                replica.edit(EDIT)
            except WorkspaceError as exc:
                assert "read-only" in str(exc)
            else:
                raise AssertionError("a following session edited")
    assert torch.equal(logits(replica_model), logits(load_model(str(tiny_dirs["llama"]), device="cpu")))


class Replica(Served):
    """A read replica following `workspace`, sending writers' requests to `writer_url`."""

    def __init__(self, model_dir, workspace, writer_url, port=None):
        super().__init__(["--follow", str(workspace), "--model", str(model_dir), "--writer", writer_url,
                          "--poll-interval", "0.2", "--token", TOKEN], port)

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=10).json()


def wait_for_head(replicas, head, timeout=10.0) -> float:
    started = time.time()
    while time.time() - started < timeout:
        if all(r.health()["head"] == head for r in replicas):
            return time.time() - started
        time.sleep(0.02)
    raise AssertionError(f"replicas still at {[r.health()['head'] for r in replicas]}, writer at {head}")


def test_writer_and_two_replicas(tmp_path, tiny_dirs):
    ws = tmp_path / "ws"
    writer = Server(tiny_dirs["gpt2"], ws, steps=3)
    replicas = []
    try:
        httpx.post(writer.url + "/v1/edits", json={"edits": [EDIT]}, headers=AUTH, timeout=120).raise_for_status()
        replicas = [Replica(tiny_dirs["gpt2"], ws, writer.url) for _ in range(2)]
        head = writer.generate()
        assert [r.generate() for r in replicas] == [head, head]
        edit = {"prompt": "Who wrote Hamlet?", "target_new": "the lazy dog"}
        httpx.post(writer.url + "/v1/edits", json={"edits": [edit]}, headers=AUTH, timeout=120).raise_for_status()
        lag = wait_for_head(replicas, httpx.get(writer.url + "/health").json()["journal_head"])
        assert lag < 0.2 + 1.5  # the poll interval and the time to read the changed chunks
        assert all(r.health()["role"] == "replica" for r in replicas)
        expected = httpx.post(writer.url + "/v1/generate", json={"prompts": [edit["prompt"]], "max_new_tokens": 4}
                              ).json()["completions"]
        for r in replicas:
            got = httpx.post(r.url + "/v1/generate", json={"prompts": [edit["prompt"]], "max_new_tokens": 4}).json()
            assert got["completions"] == expected
        # Nothing on a replica writes the journal: edits and rollbacks are sent to the writer.
        count = len(httpx.get(writer.url + "/v1/edits").json()["edits"])
        for r in replicas:
            refused = httpx.post(r.url + "/v1/edits", json={"edits": [EDIT]}, headers=AUTH)
            assert refused.status_code == 409 and writer.url in refused.json()["error"]["reason"]
            assert httpx.delete(r.url + "/v1/edits/1", headers=AUTH).status_code == 409
        assert len(httpx.get(writer.url + "/v1/edits").json()["edits"]) == count
        # A replica killed with kill -9 and started again catches up with what it missed.
        port = replicas[0].port
        replicas[0].stop(signal.SIGKILL)
        httpx.delete(writer.url + "/v1/edits/1", headers=AUTH, timeout=120).raise_for_status()
        replicas[0] = Replica(tiny_dirs["gpt2"], ws, writer.url, port=port)
        wait_for_head(replicas, httpx.get(writer.url + "/health").json()["journal_head"])
        assert [r.generate() for r in replicas] == [writer.generate()] * 2
    finally:
        for r in replicas:
            r.stop()
        writer.stop()
