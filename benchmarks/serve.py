"""Throughput and latency of `editkit serve`: generate with and without edits in force,
and edit latency under generate load. A real server (uvicorn subprocess) on loopback.

    python benchmarks/serve.py [--model default] [--method grace] [--requests 40] [--concurrency 4]

Writes benchmarks/results/serve.json and serve.md."""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from editkit.evaluation.builtin_edits import BUILTIN_EDITS

ROOT = Path(__file__).resolve().parent

PROMPTS = ["The capital of Germany is", "The chemical symbol for gold is", "The closest planet to the Sun is",
           "The Eiffel Tower is located in the city of", "The author of Pride and Prejudice is",
           "The largest planet in the solar system is", "The capital of Japan is", "Water is made of"]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def start_server(args, workspace: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "editkit.cli", "serve", "--workspace", str(workspace), "--port", str(port),
           "--device", "cpu", "--method", args.method, "--token", "bench"]
    if args.model:
        cmd += ["--model", args.model]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.stderr.read()}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("server did not start")


def generate_load(url: str, requests: int, concurrency: int, max_new_tokens: int) -> dict:
    def one(i: int) -> float:
        started = time.perf_counter()
        r = httpx.post(url + "/v1/generate", json={"prompts": [PROMPTS[i % len(PROMPTS)]],
                                                   "max_new_tokens": max_new_tokens}, timeout=600)
        r.raise_for_status()
        return time.perf_counter() - started

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        latencies = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - started
    return {"requests": requests, "concurrency": concurrency, "max_new_tokens": max_new_tokens,
            "requests_per_second": requests / wall, "p50_seconds": statistics.median(latencies),
            "p95_seconds": percentile(latencies, 0.95)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model id or directory (default: the embedded model)")
    parser.add_argument("--method", default="grace")
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--out", type=Path, default=ROOT / "results")
    args = parser.parse_args()

    workspace = Path(tempfile.mkdtemp(prefix="editkit-serve-bench-")) / "ws"
    proc, url = start_server(args, workspace)
    auth = {"Authorization": "Bearer bench"}
    try:
        generate_load(url, 4, 1, args.max_new_tokens)  # warm-up
        unedited = generate_load(url, args.requests, args.concurrency, args.max_new_tokens)

        edit_latencies: list[float] = []
        stop = threading.Event()
        background: list[dict] = []

        def keep_generating():
            while not stop.is_set():
                background.append(generate_load(url, args.concurrency, args.concurrency, args.max_new_tokens))

        loader = threading.Thread(target=keep_generating)
        loader.start()
        for edit in BUILTIN_EDITS:
            started = time.perf_counter()
            httpx.post(url + "/v1/edits", json={"edits": [edit]}, headers=auth, timeout=1800).raise_for_status()
            edit_latencies.append(time.perf_counter() - started)
        stop.set()
        loader.join()

        edited = generate_load(url, args.requests, args.concurrency, args.max_new_tokens)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)

    result = {"benchmark": "serve", "model": args.model or "default", "method": args.method,
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
              "generate_unedited": unedited, "generate_with_edits": edited,
              "edits_in_force": len(BUILTIN_EDITS),
              "edit_latency_under_load_seconds": {"each": edit_latencies,
                                                  "median": statistics.median(edit_latencies)}}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serve.json").write_text(json.dumps(result, indent=2))
    rows = [("generate, no edits", unedited), (f"generate, {len(BUILTIN_EDITS)} edits in force", edited)]
    lines = [f"# editkit serve benchmark ({result['model']}, method {args.method})", "",
             "| load | req/s | p50 s | p95 s |", "|---|---|---|---|"]
    lines += [f"| {name} | {r['requests_per_second']:.2f} | {r['p50_seconds']:.3f} | {r['p95_seconds']:.3f} |"
              for name, r in rows]
    lines += ["", f"Edit latency under generate load: median {statistics.median(edit_latencies):.2f} s "
              f"({', '.join(f'{x:.2f}' for x in edit_latencies)})",
              f"{args.requests} requests per row, concurrency {args.concurrency}, {args.max_new_tokens} new tokens each."]
    (args.out / "serve.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
