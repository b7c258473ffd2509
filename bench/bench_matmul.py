"""MUL_MAT throughput on the Gemma 3 270M Q4_K_M weight shapes: numba kernels vs the numpy reference.

    python bench/bench_matmul.py [--threads 2] [--n 1 64] [--no-ref]

Reports ms per call, GFLOP/s (2*M*K*N) and GB/s of weight bytes read, for random valid blocks.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "matmul"))

from matmul_blocks import random_rows  # noqa: E402

from hybridllm.backends.cpu_kernels import get_matmul, set_num_threads  # noqa: E402
from hybridllm.backends.numpy_ops.matmul import mul_mat_ref  # noqa: E402
from hybridllm.ggml.types import GGMLType as T  # noqa: E402

# (name, weight type, K, M): gemma-3-270m Q4_K_M matrices
SHAPES = [("output/token_embd", T.Q8_0, 640, 262144), ("attn_q (Q5_0)", T.Q5_0, 640, 1024),
          ("ffn_down (Q6_K)", T.Q6_K, 2048, 640), ("attn_output (Q4_K)", T.Q4_K, 1024, 640),
          ("ffn_gate/up (Q5_0)", T.Q5_0, 640, 2048)]


def best_of(fn: Callable[[], None], seconds: float = 1.0, min_runs: int = 3) -> float:
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - start < seconds:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def bench_one(atype: int, K: int, M: int, N: int, ref: bool) -> tuple[float, float | None, int]:
    rng = np.random.default_rng(0)
    A = random_rows(rng, atype, (M,), K)
    B = rng.standard_normal((N, K)).astype(np.float32)
    out = np.zeros((N, M), np.float32)
    mm = get_matmul(atype, T.F32)
    assert mm is not None
    args = (A.reshape(-1), A.shape[-1], M, K, np.zeros(1, np.int64), np.array([0, N], np.int64),
            np.arange(N, dtype=np.int64), np.arange(N, dtype=np.int64) * M, B.view(np.uint8).reshape(-1),
            np.arange(N, dtype=np.int64) * K * 4, out.reshape(-1))
    t_fast = best_of(lambda: mm(*args))
    t_ref = best_of(lambda: mul_mat_ref(A[None, None], atype, B[None, None]), 0.5, 1) if ref else None
    return t_fast, t_ref, A.nbytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--no-ref", action="store_true", help="skip the (slow) numpy reference")
    args = ap.parse_args()
    set_num_threads(args.threads)
    print(f"threads={args.threads}")
    print(f"{'matrix':22s} {'type':5s} {'K':>5s} {'M':>7s} {'N':>3s} | {'numba ms':>9s} {'GFLOP/s':>8s} "
          f"{'GB/s':>6s} | {'numpy ms':>9s} {'GFLOP/s':>8s}")
    for N in args.n:
        for name, atype, K, M in SHAPES:
            t_fast, t_ref, nbytes = bench_one(atype, K, M, N, not args.no_ref)
            flops = 2.0 * M * K * N
            ref = f"{t_ref * 1e3:9.2f} {flops / t_ref / 1e9:8.2f}" if t_ref else f"{'-':>9s} {'-':>8s}"
            print(f"{name:22s} {T(atype).name:5s} {K:5d} {M:7d} {N:3d} | {t_fast * 1e3:9.3f} "
                  f"{flops / t_fast / 1e9:8.1f} {nbytes / t_fast / 1e9:6.1f} | {ref}", flush=True)


if __name__ == "__main__":
    main()
