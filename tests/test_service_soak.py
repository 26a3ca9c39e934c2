"""A bounded concurrency soak of the service: several client threads send generations,
completions, edits and rollbacks to one app (uvicorn on loopback, a tiny model) for
EDITKIT_SOAK_SECONDS (default 20). Afterwards the journal holds exactly the acknowledged
edits and rollbacks, and a serial replay of them in journal order on a fresh workspace gives
bit-identical logits, the state the workspace reopens with, and every generation a client saw."""

from __future__ import annotations

import os
import random
import socket
import threading
import time

import httpx
import torch
import uvicorn
from conftest import FAST_FT, TOKEN, served

from editkit.schemas import EditRequest
from editkit.session import Session

SECONDS = float(os.environ.get("EDITKIT_SOAK_SECONDS", "20"))
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PROMPT = "The capital of France is"
PROMPTS = [PROMPT, "The largest planet is", "Who wrote Hamlet?", "The Eiffel Tower is located in the city of"]
TARGETS = ["Rome", "Berlin", "Paris", "Jupiter", "the lazy dog"]
PROBE = "The capital of Germany is Berlin. The quick brown fox"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@torch.no_grad()
def logits(loaded) -> torch.Tensor:
    return loaded.model(loaded.tokenizer(PROBE, return_tensors="pt").input_ids).logits


class Clients:
    """The client threads and what the server acknowledged to them."""

    def __init__(self, url: str, deadline: float):
        self.url, self.deadline = url, deadline
        self.edits: dict[int, dict] = {}  # acknowledged edit id -> request
        self.rollbacks: list[int] = []  # acknowledged rollbacks
        self.generations: list[str] = []
        self.problems: list[str] = []
        self.lock = threading.Lock()

    def run(self, work, seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(base_url=self.url, timeout=300) as http:
            while time.monotonic() < self.deadline:
                try:
                    work(http, rng)
                except Exception as exc:  # noqa: BLE001 - every failure is reported, none lost
                    with self.lock:
                        self.problems.append(f"{work.__name__}: {type(exc).__name__}: {exc}")

    def generate(self, http, rng) -> None:
        r = http.post("/v1/generate", json={"prompts": [PROMPT], "max_new_tokens": 4})
        assert r.status_code == 200, r.text
        with self.lock:
            self.generations.append(r.json()["completions"][0])

    def complete(self, http, rng) -> None:
        r = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200, r.text
        with self.lock:
            self.generations.append(r.json()["choices"][0]["text"])

    def edit(self, http, rng) -> None:
        request = {"prompt": rng.choice(PROMPTS), "target_new": rng.choice(TARGETS)}
        r = http.post("/v1/edits", json={"edits": [request]}, headers=AUTH)
        assert r.status_code == 200, r.text
        with self.lock:
            self.edits[r.json()["edits"][0]["id"]] = request

    def roll_back(self, http, rng) -> None:
        time.sleep(rng.uniform(0, 0.3))  # about one rollback for every two edits
        applied = http.get("/v1/edits", params={"status": "applied", "limit": 1000}).json()["edits"]
        if not applied:
            time.sleep(0.05)
            return
        edit_id = rng.choice(applied)["id"]
        r = http.delete(f"/v1/edits/{edit_id}", headers=AUTH)
        # two roll-back threads may pick the same edit: the second is refused and changes nothing
        assert r.status_code == 200 or (r.status_code == 422 and "already rolled back" in r.text), r.text
        if r.status_code == 200:
            with self.lock:
                self.rollbacks.append(edit_id)


def test_concurrent_clients_agree_with_a_serial_replay(tiny_loaded, tmp_path):
    loaded = tiny_loaded["gpt2"]
    pristine = logits(loaded)
    with served(tmp_path / "ws", loaded) as (app, session):
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
        serving = threading.Thread(target=server.run, daemon=True)
        serving.start()
        while not server.started:
            assert serving.is_alive(), "uvicorn did not start"
            time.sleep(0.05)
        clients = Clients(f"http://127.0.0.1:{server.config.port}", time.monotonic() + SECONDS)
        work = [clients.generate, clients.generate, clients.complete, clients.edit, clients.roll_back,
                clients.roll_back]
        threads = [threading.Thread(target=clients.run, args=(w, i)) for i, w in enumerate(work)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        served_logits = logits(loaded)
        server.should_exit = True
        serving.join(timeout=60)
        journal = session.history()

    assert not clients.problems, clients.problems[:5]
    assert len(clients.edits) >= 3 and clients.rollbacks and len(clients.generations) >= 10, (
        len(clients.edits), len(clients.rollbacks), len(clients.generations))
    # The journal holds exactly what was acknowledged.
    assert {r.id: r.request for r in journal} == {i: EditRequest.model_validate(q).model_dump(mode="json")
                                                  for i, q in clients.edits.items()}
    assert sorted(r.id for r in journal if r.status == "rolled_back") == sorted(clients.rollbacks)
    assert len(set(clients.rollbacks)) == len(clients.rollbacks)

    # A serial replay in journal order, noting what greedy generation gives in each state.
    events = sorted([(r.created_at, "edit", r) for r in journal] +
                    [(r.rolled_back_at, "rollback", r) for r in journal if r.status == "rolled_back"],
                    key=lambda e: e[0])
    with Session.open(tmp_path / "replay", loaded=loaded, method="ft", method_config=FAST_FT) as replay:
        seen_states = {replay.generate(PROMPT, max_new_tokens=4)[0]}
        for _, kind, record in events:
            if kind == "edit":
                (new,) = replay.edit(EditRequest.model_validate(record.request), measure=False)
                assert new.id == record.id
            else:
                replay.rollback(record.id)
            seen_states.add(replay.generate(PROMPT, max_new_tokens=4)[0])
        assert torch.equal(logits(loaded), served_logits), "the served state differs from the serial replay"
    assert set(clients.generations) <= seen_states, set(clients.generations) - seen_states
    with Session.open(tmp_path / "ws", loaded=loaded) as reopened:  # the state on disk agrees too
        assert torch.equal(logits(loaded), served_logits)
        assert [(r.id, r.status) for r in reopened.history()] == [(r.id, r.status) for r in journal]
    assert torch.equal(logits(loaded), pristine)  # the shared tiny model is left as found
    print(f"\nsoak: {SECONDS:g} s, {len(clients.edits)} edits, {len(clients.rollbacks)} rollbacks, "
          f"{len(clients.generations)} generations, {len(seen_states)} distinct states' generations")
