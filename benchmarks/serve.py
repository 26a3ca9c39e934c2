"""Throughput and latency of `editkit serve` under concurrent load: at each concurrency
(1, 8, 32 by default) the same single-prompt requests (16 new tokens, greedy, through
/v1/completions), against the same work sent as requests of that many prompts each (the
upper bound: as batched as the concurrency allows), with
no edits and with the built-in edits in force; and edit latency under generate load. A real
server (uvicorn subprocess) on loopback.

    python benchmarks/serve.py [--model default] [--method wise] [--concurrency 1,8,32] [--requests 32]

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


def start_server(args, workspace: Path, follow_of: str | None = None) -> tuple[subprocess.Popen, str]:
    """The writer, or (follow_of: the writer's URL) a read replica of the same workspace."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "editkit.cli", "serve", "--port", str(port), "--device", "cpu", "--token", "bench"]
    if follow_of:
        cmd += ["--follow", str(workspace), "--writer", follow_of, "--poll-interval", str(args.poll_interval)]
    else:
        cmd += ["--workspace", str(workspace), "--method", args.method]
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
    # One client with a connection per worker, as a load generator keeps them: a fresh client
    # per request (httpx.post) spends ~10-20 ms of this process's CPU on setup, and 8 threads
    # doing that at once made clients come back too late to join the next batch.
    client = httpx.Client(limits=httpx.Limits(max_connections=concurrency), timeout=600)

    def one(i: int) -> tuple[float, int]:
        started = time.perf_counter()
        r = client.post(url + "/v1/completions", json={"prompt": PROMPTS[i % len(PROMPTS)], "temperature": 0,
                                                       "max_tokens": max_new_tokens})
        r.raise_for_status()
        return time.perf_counter() - started, r.json()["usage"]["completion_tokens"]

    started = time.perf_counter()
    with client, ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - started
    latencies = [r[0] for r in results]
    return {"requests": requests, "concurrency": concurrency, "max_new_tokens": max_new_tokens, "wall_seconds": wall,
            "requests_per_second": requests / wall, "tokens_per_second": sum(r[1] for r in results) / wall,
            "p50_seconds": statistics.median(latencies), "p95_seconds": percentile(latencies, 0.95)}


def batched_bound(url: str, requests: int, concurrency: int, max_new_tokens: int) -> dict:
    """The same prompts sent `concurrency` at a time in one request each, one request after
    another: the same work batched as far as that concurrency allows (the upper bound)."""
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(requests)]
    started, tokens = time.perf_counter(), 0
    with httpx.Client(timeout=600) as client:
        for i in range(0, requests, concurrency):
            r = client.post(url + "/v1/completions", json={"prompt": prompts[i: i + concurrency], "temperature": 0,
                                                           "max_tokens": max_new_tokens})
            r.raise_for_status()
            tokens += r.json()["usage"]["completion_tokens"]
    wall = time.perf_counter() - started
    return {"requests": requests, "wall_seconds": wall, "requests_per_second": requests / wall,
            "tokens_per_second": tokens / wall}


def replica_run(args, workspace: Path, writer: str) -> dict:
    """Generation throughput spread over 1 and 2 read replicas (clients alternate between them),
    and the lag from an edit's acknowledgement to every replica serving it."""
    replicas = []
    try:
        out = {}
        for n in (1, 2):
            while len(replicas) < n:
                replicas.append(start_server(args, workspace, follow_of=writer))
            urls = [url for _, url in replicas]
            c, requests = 8 * n, max(args.requests, 8 * n)

            def one(i: int) -> float:
                started = time.perf_counter()
                httpx.post(urls[i % n] + "/v1/completions", json={"prompt": PROMPTS[i % len(PROMPTS)], "temperature": 0,
                                                                 "max_tokens": args.max_new_tokens},
                           timeout=600).raise_for_status()
                return time.perf_counter() - started

            started = time.perf_counter()
            with ThreadPoolExecutor(c) as pool:
                latencies = list(pool.map(one, range(requests)))
            wall = time.perf_counter() - started
            out[f"{n}_replicas"] = {"requests": requests, "concurrency": c, "requests_per_second": requests / wall,
                                    "p95_seconds": percentile(latencies, 0.95)}
        lags = []
        for edit in BUILTIN_EDITS[:2]:
            httpx.post(writer + "/v1/edits", json={"edits": [{**edit, "target_new": edit["target_new"] + " again"}]},
                       headers={"Authorization": "Bearer bench"}, timeout=1800).raise_for_status()
            acked, head = time.perf_counter(), httpx.get(writer + "/health").json()["journal_head"]
            while any(httpx.get(url + "/health").json()["head"] != head for _, url in replicas):
                time.sleep(0.02)
            lags.append(time.perf_counter() - acked)
        out["lag_seconds"] = lags
        return out
    finally:
        for proc, _ in replicas:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)


def edits_to_apply(n: int) -> list[dict]:
    """The built-in edits, then zsRE dev records from the shared data, n in all."""
    edits = list(BUILTIN_EDITS)
    try:
        from editkit.data import shared_file
        from editkit.host import get_host

        edits += [r.model_dump(mode="json", exclude_defaults=True)
                  for r in get_host().suite("zsre")().load(shared_file("zsre"), limit=n)]
    except Exception:  # no shared data: the built-in edits only
        pass
    return edits[:n]


def phase(url: str, args) -> dict:
    """Each concurrency's load and its batched bound, `repeats` times in turn (c=1, 8, 32, then
    again), so that a slow spell of the machine falls on every figure alike; the ratios are
    taken within a repeat and reported as median and range."""
    rows = {str(c): {"load": [], "batched": []} for c in args.concurrency}
    for _ in range(args.repeats):
        for c in args.concurrency:
            n = max(args.requests, c)
            rows[str(c)]["load"].append(generate_load(url, n, c, args.max_new_tokens))
            rows[str(c)]["batched"].append(batched_bound(url, n, c, args.max_new_tokens))
    base = rows[str(args.concurrency[0])]["load"]
    for r in rows.values():
        rps = [x["requests_per_second"] for x in r["load"]]
        r["summary"] = {
            "requests_per_second": spread(rps),
            "tokens_per_second": spread([x["tokens_per_second"] for x in r["load"]]),
            "p50_seconds": spread([x["p50_seconds"] for x in r["load"]]),
            "p95_seconds": spread([x["p95_seconds"] for x in r["load"]]),
            "batched_requests_per_second": spread([x["requests_per_second"] for x in r["batched"]]),
            "of_batched": spread([a / b["requests_per_second"] for a, b in zip(rps, r["batched"])]),
            "vs_first_concurrency": spread([a / b["requests_per_second"] for a, b in zip(rps, base)]),
        }
    return rows


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "each": values}


def cell(s: dict, fmt: str) -> str:
    """median (min-max) when repeated."""
    if len(s["each"]) == 1:
        return format(s["median"], fmt)
    return f"{s['median']:{fmt}} ({s['min']:{fmt}}-{s['max']:{fmt}})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model id or directory (default: the embedded model)")
    parser.add_argument("--method", default="wise")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--concurrency", type=lambda v: [int(x) for x in v.split(",")], default=[1, 8, 32])
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="measurements per concurrency and phase, interleaved")
    parser.add_argument("--edits", type=int, default=10, help="edits applied between the two phases")
    parser.add_argument("--replicas", action="store_true", help="also measure 1 and 2 read replicas")
    parser.add_argument("--poll-interval", type=float, default=0.5)
    parser.add_argument("--out", type=Path, default=ROOT / "results")
    args = parser.parse_args()

    workspace = Path(tempfile.mkdtemp(prefix="editkit-serve-bench-")) / "ws"
    proc, url = start_server(args, workspace)
    auth = {"Authorization": "Bearer bench"}
    try:
        generate_load(url, 4, 1, args.max_new_tokens)  # warm-up
        unedited = phase(url, args)

        edit_latencies: list[float] = []
        stop = threading.Event()

        def keep_generating():
            while not stop.is_set():
                generate_load(url, 8, 8, args.max_new_tokens)

        loader = threading.Thread(target=keep_generating)
        loader.start()
        for edit in edits_to_apply(args.edits):
            started = time.perf_counter()
            httpx.post(url + "/v1/edits", json={"edits": [edit]}, headers=auth, timeout=1800).raise_for_status()
            edit_latencies.append(time.perf_counter() - started)
        stop.set()
        loader.join()
        edited = phase(url, args)
        metrics = httpx.get(url + "/metrics").text
        replicas = replica_run(args, workspace, url) if args.replicas else None
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)

    wait = [line for line in metrics.splitlines() if line.startswith("editkit_edit_wait_seconds_")]
    batch_rows = [line for line in metrics.splitlines() if line.startswith("editkit_batch_rows_")]
    result = {"benchmark": "serve", "model": args.model or "default", "method": args.method,
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
              "no_edits": unedited, "with_edits": edited, "edits_in_force": len(edit_latencies),
              "edit_latency_under_load_seconds": {"each": edit_latencies, "median": statistics.median(edit_latencies)},
              "edit_wait_metric": wait, "batch_rows_metric": batch_rows, "replicas": replicas}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serve.json").write_text(json.dumps(result, indent=2))
    lines = [f"# editkit serve benchmark ({result['model']}, method {args.method})", "",
             f"Single-prompt /v1/completions requests, {args.max_new_tokens} new tokens each (greedy); 'batched' is "
             "the same prompts sent as requests of `concurrency` prompts each, one after another (the same work "
             "batched as far as that concurrency allows: the upper bound). Each figure: median (range) of "
             f"{args.repeats} interleaved repeats; ratios taken within a repeat.", "",
             "| edits in force | concurrency | req/s | tok/s | p50 s | p95 s | batched req/s | of batched | vs c=1 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for label, rows in ((0, unedited), (len(edit_latencies), edited)):
        for c, r in rows.items():
            m = r["summary"]
            lines.append(f"| {label} | {c} | {cell(m['requests_per_second'], '.2f')} | {cell(m['tokens_per_second'], '.1f')} | "
                         f"{cell(m['p50_seconds'], '.2f')} | {cell(m['p95_seconds'], '.2f')} | "
                         f"{cell(m['batched_requests_per_second'], '.2f')} | {cell(m['of_batched'], '.0%')} | "
                         f"{cell(m['vs_first_concurrency'], '.2f')}x |")
    lines += ["", f"Edit latency under generate load (concurrency 8): median {statistics.median(edit_latencies):.2f} s "
              f"({', '.join(f'{x:.2f}' for x in edit_latencies)}); time edits waited for batches in flight: "
              + "; ".join(wait)]
    rows_sum = next((float(x.split()[-1]) for x in batch_rows if x.startswith("editkit_batch_rows_sum")), 0.0)
    rows_count = next((float(x.split()[-1]) for x in batch_rows if x.startswith("editkit_batch_rows_count")), 0.0)
    if rows_count:
        lines += ["", f"Batches formed over the whole run: {rows_count:.0f}, {rows_sum / rows_count:.2f} prompts each "
                  "on average (every concurrency and the bound's requests together)."]
    if replicas:
        lines += ["", f"Read replicas (poll interval {args.poll_interval} s), clients spread evenly, 8 per replica:"]
        for n in (1, 2):
            r = replicas[f"{n}_replicas"]
            lines.append(f"- {n} replica(s): {r['requests_per_second']:.2f} req/s at concurrency {r['concurrency']}, "
                         f"p95 {r['p95_seconds']:.2f} s")
        lines.append("- edit acknowledged to every replica serving it: "
                     + ", ".join(f"{x:.2f} s" for x in replicas["lag_seconds"]))
    (args.out / "serve.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
