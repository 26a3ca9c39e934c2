"""The HTTP service, for real: uvicorn in a subprocess on loopback, a real HTTP client."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

TOKEN = "s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PROMPT = "The capital of France is"
EDIT = {"prompt": PROMPT, "target_new": "Rome"}
# Big steps on a tiny random model so the edit shows in greedy generation; no early stop so
# an edit takes long enough for requests to overlap it.
FT_CONFIG = ["--config", "lr=0.05", "--config", "norm_constraint=10", "--config", "early_stop_loss=0.0"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_serving(args: list[str], port: int) -> subprocess.Popen:
    """`editkit serve ARGS --port PORT` in a subprocess, once /health answers."""
    cmd = [sys.executable, "-m", "editkit.cli", "serve", "--port", str(port), "--device", "cpu", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not start within 120 s")


class Served:
    """`editkit serve ARGS` running in a subprocess on a port of its own."""

    def __init__(self, args: list[str], port: int | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = start_serving(args, self.port)

    def generate(self, prompt=PROMPT, **kw):
        r = httpx.post(self.url + "/v1/generate", json={"prompts": [prompt], "max_new_tokens": 4, **kw}, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()["completions"][0]

    def stop(self, sig=signal.SIGTERM):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=60)


class Server(Served):
    """A writer on an FT workspace."""

    def __init__(self, model_dir, workspace, steps: int, extra=()):
        super().__init__(["--workspace", str(workspace), "--model", str(model_dir), "--method", "ft",
                          "--token", TOKEN, "--max-body-bytes", "20000", "--max-prompt-chars", "500",
                          "--max-new-tokens", "64", *FT_CONFIG, "--config", f"steps={steps}", *extra])


@pytest.fixture(scope="module")
def server(tiny_dirs, tmp_path_factory):
    # 150 steps without early stopping: an edit lasts long enough for requests to overlap it.
    srv = Server(tiny_dirs["gpt2"], tmp_path_factory.mktemp("serve") / "ws", steps=150)
    yield srv
    srv.stop()


def test_edit_then_generate_then_rollback(server):
    before = server.generate()
    r = httpx.post(server.url + "/v1/edits", json={"edits": [EDIT]}, headers=AUTH, timeout=300)
    assert r.status_code == 200, r.text
    (edit,) = r.json()["edits"]
    assert edit["reliability"] == 1.0 and edit["status"] == "applied"
    after = server.generate()
    assert after.startswith(" Rome") and after != before

    listing = httpx.get(server.url + "/v1/edits", params={"limit": 1}).json()
    assert listing["total"] >= 1 and listing["edits"][-1]["id"] == edit["id"]

    r = httpx.delete(f"{server.url}/v1/edits/{edit['id']}", headers=AUTH, timeout=300)
    assert r.status_code == 200 and r.json()["status"] == "rolled_back"
    assert server.generate() == before

    completion = httpx.post(server.url + "/v1/completions",
                            json={"model": "x", "prompt": PROMPT, "max_tokens": 4, "temperature": 0}).json()
    assert completion["object"] == "text_completion"
    assert completion["choices"][0]["text"] == before
    assert completion["usage"]["completion_tokens"] >= 1


def test_concurrent_generations_see_one_state(server):
    before = server.generate()
    result = {}

    def do_edit():
        result["response"] = httpx.post(server.url + "/v1/edits", json={"edits": [EDIT]}, headers=AUTH, timeout=300)

    editing = threading.Thread(target=do_edit)
    editing.start()
    # /health answers while the edit runs (it takes no lock): wait until it reports the edit.
    deadline = time.monotonic() + 60
    while httpx.get(server.url + "/health", timeout=10).json()["queue_depth"] < 1:
        assert time.monotonic() < deadline and editing.is_alive(), "never saw the edit in flight"
        time.sleep(0.02)
    with ThreadPoolExecutor(20) as pool:
        outputs = list(pool.map(lambda _: server.generate(), range(20)))
    editing.join()
    assert result["response"].status_code == 200
    after = server.generate()
    assert after != before
    assert set(outputs) <= {before, after}, outputs
    metrics = httpx.get(server.url + "/metrics").text
    assert "editkit_edits_applied_total" in metrics and "editkit_generation_latency_seconds_count" in metrics
    edit_id = result["response"].json()["edits"][0]["id"]
    assert httpx.delete(f"{server.url}/v1/edits/{edit_id}", headers=AUTH, timeout=300).status_code == 200


def test_auth_limits_and_validation(server):
    url = server.url
    r = httpx.post(url + "/v1/edits", json={"edits": [EDIT]})
    assert r.status_code == 401 and "token" in r.json()["error"]["reason"]
    r = httpx.post(url + "/v1/edits", json={"edits": [EDIT]}, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401
    assert httpx.delete(url + "/v1/edits/1").status_code == 401

    r = httpx.post(url + "/v1/generate", content=b'{"prompts": ["' + b"a" * 30000 + b'"]}',
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "bytes" in r.json()["error"]["reason"]

    r = httpx.post(url + "/v1/edits", json={"edits": [{"prompt": PROMPT}]}, headers=AUTH)
    assert r.status_code == 422
    assert r.json()["error"]["fields"][0]["field"] == "edits.0.target_new"
    r = httpx.post(url + "/v1/edits", json={"edits": [{"prompt": " ", "target_new": "x"}]}, headers=AUTH)
    assert r.status_code == 422 and "edits.0.prompt" in r.json()["error"]["reason"]

    r = httpx.post(url + "/v1/generate", json={"prompts": ["x" * 600]})
    assert r.status_code == 422 and r.json()["error"]["fields"][0]["field"] == "prompts.0"
    r = httpx.post(url + "/v1/generate", json={"prompts": [PROMPT], "max_new_tokens": 1000})
    assert r.status_code == 422 and "max_new_tokens" in r.json()["error"]["reason"]
    r = httpx.post(url + "/v1/generate", json={"prompts": [PROMPT], "temperature": -1})
    assert r.status_code == 422 and r.json()["error"]["fields"][0]["field"] == "temperature"
    r = httpx.delete(url + "/v1/edits/999999", headers=AUTH)
    assert r.status_code == 404 and "999999" in r.json()["error"]["reason"]
    r = httpx.post(url + "/v1/evaluate", json={"suite": "builtin", "limit": 2}, headers=AUTH, timeout=120)
    assert r.status_code == 200 and r.json()["count"] == 2
    r = httpx.post(url + "/v1/evaluate", json={"suite": "builtin", "data": "../../etc/passwd"}, headers=AUTH)
    assert r.status_code == 422


def test_acknowledged_edits_survive_kill_9(tiny_dirs, tmp_path):
    ws = tmp_path / "ws"
    srv = Server(tiny_dirs["gpt2"], ws, steps=300)
    try:
        acknowledged = []
        quick = {"edits": [{"prompt": f"Who wrote Hamlet? {i}", "target_new": "Paris"} for i in range(2)]}
        # Early stopping off and 300 steps: the next edit runs for seconds, long enough to kill it.
        r = httpx.post(srv.url + "/v1/edits", json=quick, headers=AUTH, timeout=600)
        assert r.status_code == 200
        acknowledged = [e["id"] for e in r.json()["edits"]]
        threading.Thread(target=lambda: _swallow(lambda: httpx.post(
            srv.url + "/v1/edits", json={"edits": [EDIT]}, headers=AUTH, timeout=600)), daemon=True).start()
        time.sleep(2.0)  # inside the third edit
        srv.proc.send_signal(signal.SIGKILL)
        srv.proc.wait(timeout=30)
    finally:
        srv.stop()
    again = Server(tiny_dirs["gpt2"], ws, steps=300)
    try:
        ids = [e["id"] for e in httpx.get(again.url + "/v1/edits").json()["edits"]]
        assert ids[: len(acknowledged)] == acknowledged and len(ids) <= len(acknowledged) + 1
        again.generate()  # the recovered workspace serves
    finally:
        again.stop()


def _swallow(fn):
    try:
        fn()
    except httpx.HTTPError:
        pass


def test_refuses_public_bind_without_token(tiny_dirs, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "EDITKIT_TOKEN"}
    proc = subprocess.run([sys.executable, "-m", "editkit.cli", "serve", "--host", "0.0.0.0",
                           "--workspace", str(tmp_path / "ws"), "--model", str(tiny_dirs["gpt2"])],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1
    assert "refusing to bind 0.0.0.0" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "ws").exists()
