"""Load test of the Images API server: images/s and latency percentiles at several concurrency levels.

    python benchmarks/serve_load.py                                  # starts the server on the embedded pipeline
    python benchmarks/serve_load.py --pipeline DIR --steps 20 --concurrency 1,4,16 --requests 32
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --api-key sk-...   # an already running server

Each level runs C client threads that send generation requests back to back (n=1, b64_json) until
``--requests`` answers (or ``--duration-s``) are in; it reports images/s over the level's wall time, latency
p50/p90/p99, the server's mean batch size over that level (from /metrics) and errors.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=None, help="target a running server instead of starting one")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="Bearer key (default $OPENAI_API_KEY)")
    p.add_argument("--pipeline", default=None, help="pipeline the started server loads (default: embedded)")
    p.add_argument("--steps", type=int, default=None, help="--steps of the started server (default: pipeline's)")
    p.add_argument("--max-batch", type=int, default=8, help="--max-batch of the started server")
    p.add_argument("--batch-window-ms", type=float, default=20.0, help="--batch-window-ms of the started server")
    p.add_argument("--threads", type=int, default=None, help="--threads (torch) of the started server")
    p.add_argument("--concurrency", default="1,4,16", help="comma-separated client concurrency levels")
    p.add_argument("--requests", type=int, default=32, help="requests per level")
    p.add_argument("--duration-s", type=float, default=120.0, help="cap on each level's time")
    p.add_argument("--size", default=None, help="image size (default: the server's default)")
    p.add_argument("--warmup", type=int, default=2, help="requests sent before measuring")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    return p.parse_args(argv)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "dalle3_fast.serve", "--port", str(port), "--max-batch", str(args.max_batch),
           "--batch-window-ms", str(args.batch_window_ms), "--max-queue", "1024", "--log-level", "warning"]
    for flag, value in (("--pipeline", args.pipeline), ("--steps", args.steps), ("--threads", args.threads)):
        if value is not None:
            cmd += [flag, str(value)]
    proc = subprocess.Popen(cmd, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode}: {' '.join(cmd)}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.terminate()
    raise RuntimeError("the server did not answer /health within 300 s")


def run_level(url: str, headers: dict, body: dict, concurrency: int, requests: int, duration_s: float) -> dict:
    latencies, errors = [], []
    lock = threading.Lock()
    issued = [0]
    stop_at = time.monotonic() + duration_s
    before = httpx.get(f"{url}/metrics", timeout=30).json()

    def client():
        with httpx.Client(timeout=600) as http:
            while True:
                with lock:
                    if issued[0] >= requests or time.monotonic() > stop_at:
                        return
                    issued[0] += 1
                t0 = time.perf_counter()
                r = http.post(f"{url}/v1/images/generations", json=body, headers=headers)
                dt = time.perf_counter() - t0
                with lock:
                    if r.status_code == 200:
                        latencies.append(dt)
                    else:
                        errors.append(r.status_code)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for f in [pool.submit(client) for _ in range(concurrency)]:
            f.result()
    wall = time.perf_counter() - t0
    after = httpx.get(f"{url}/metrics", timeout=30).json()
    lat = np.array(latencies)
    batches = after["batches"] - before["batches"]
    return {"concurrency": concurrency, "requests": len(latencies), "errors": len(errors), "wall_s": wall,
            "images_per_s": len(latencies) / wall,
            "p50_s": float(np.percentile(lat, 50)) if lat.size else None,
            "p90_s": float(np.percentile(lat, 90)) if lat.size else None,
            "p99_s": float(np.percentile(lat, 99)) if lat.size else None,
            "mean_batch": (after["images"] - before["images"]) / batches if batches else None}


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    except ValueError:
        print(f"error: --concurrency {args.concurrency!r} must be comma-separated integers", file=sys.stderr)
        return 2
    if not levels or min(levels) < 1 or args.requests < 1:
        print("error: --concurrency levels and --requests must be >= 1", file=sys.stderr)
        return 2
    proc = None
    try:
        if args.url:
            url = args.url.rstrip("/")
        else:
            proc, url = start_server(args)
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        body = {"prompt": "a red circle above a blue square on a white background", "n": 1,
                "response_format": "b64_json"}
        if args.size:
            body["size"] = args.size
        for _ in range(args.warmup):
            r = httpx.post(f"{url}/v1/images/generations", json=body, headers=headers, timeout=600)
            if r.status_code != 200:
                print(f"error: warm-up request failed: {r.status_code} {r.text}", file=sys.stderr)
                return 1
        health = httpx.get(f"{url}/health", timeout=30).json()
        rows = []
        print(f"server {url} model {health.get('model')} device {health.get('device')} size {args.size or 'default'}")
        print(f"{'conc':>5} {'reqs':>5} {'err':>4} {'img/s':>7} {'p50 s':>7} {'p90 s':>7} {'p99 s':>7} {'batch':>6}")
        for c in levels:
            row = run_level(url, headers, body, c, args.requests, args.duration_s)
            rows.append(row)
            fmt = lambda v: f"{v:7.3f}" if v is not None else "      -"  # noqa: E731
            print(f"{c:5d} {row['requests']:5d} {row['errors']:4d} {row['images_per_s']:7.2f} {fmt(row['p50_s'])} "
                  f"{fmt(row['p90_s'])} {fmt(row['p99_s'])} {row['mean_batch'] or 0:6.2f}", flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps({"server": url, "health": health, "rows": rows}, indent=2) + "\n")
    except (RuntimeError, httpx.HTTPError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
