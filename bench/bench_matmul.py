"""MUL_MAT throughput on the Gemma 3 270M Q4_K_M weight shapes: numba kernels vs the numpy reference
and vs real ggml (the peer's libggml-cpu computing the same MUL_MAT on the same data).

    python bench/bench_matmul.py [--threads 2] [--n 1 64] [--no-ref] [--no-ggml]

Reports ms per call (best of ~1 s), GFLOP/s (2*M*K*N) and GB/s of weight bytes read, for random valid
blocks. ggml runs with a plan made once (its threads still start per call without a threadpool).
"""
from __future__ import annotations

import argparse
import ctypes
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


class _CPlan(ctypes.Structure):  # struct ggml_cplan (ggml-cpu.h)
    _fields_ = [("work_size", ctypes.c_size_t), ("work_data", ctypes.c_void_p), ("n_threads", ctypes.c_int),
                ("threadpool", ctypes.c_void_p), ("abort_callback", ctypes.c_void_p),
                ("abort_callback_data", ctypes.c_void_p), ("use_ref", ctypes.c_bool)]


def bench_ggml(atype: int, A: np.ndarray, B: np.ndarray, threads: int) -> float:
    """Best time of ggml_graph_compute (plan made once, as llama.cpp does) for one MUL_MAT node."""
    from hybridllm.testing.ggml_ref import GT, GGMLGraph
    K, M, N = B.shape[1], A.shape[0], B.shape[0]
    with GGMLGraph(A.nbytes + B.nbytes + 4 * M * N + (16 << 20)) as g:
        a = g.new(atype, (K, M))
        g.mem[a.offset:a.offset + A.size] = A.reshape(-1)
        b = g.new(T.F32, (K, N), B)
        fn = g.base_lib.ggml_mul_mat
        fn.argtypes, fn.restype = [ctypes.c_void_p] * 3, ctypes.c_void_p
        out = GT(fn(g.ctx, a.ptr, b.ptr), g)
        gf = g.base_lib.ggml_new_graph_custom(g.ctx, 16, False)
        g.base_lib.ggml_build_forward_expand(gf, out.ptr)
        cpu = g.cpu_lib
        cpu.ggml_graph_plan.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
        cpu.ggml_graph_plan.restype = _CPlan
        cpu.ggml_graph_compute.argtypes = [ctypes.c_void_p, ctypes.POINTER(_CPlan)]
        plan = cpu.ggml_graph_plan(gf, threads, None)
        work = np.zeros(max(plan.work_size, 1), np.uint8)
        plan.work_data = work.ctypes.data
        return best_of(lambda: cpu.ggml_graph_compute(gf, ctypes.byref(plan)))


def bench_one(atype: int, K: int, M: int, N: int, ref: bool, ggml_threads: int = 0
              ) -> tuple[float, float | None, float | None, int]:
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
    t_ggml = bench_ggml(atype, A, B, ggml_threads) if ggml_threads else None
    return t_fast, t_ref, t_ggml, A.nbytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--no-ref", action="store_true", help="skip the (slow) numpy reference")
    ap.add_argument("--no-ggml", action="store_true", help="skip the real-ggml comparison")
    args = ap.parse_args()
    set_num_threads(args.threads)
    print(f"threads={args.threads}")
    print(f"{'matrix':22s} {'type':5s} {'K':>5s} {'M':>7s} {'N':>3s} | {'numba ms':>9s} {'GFLOP/s':>8s} "
          f"{'GB/s':>6s} | {'numpy ms':>9s} {'GFLOP/s':>8s} | {'ggml ms':>9s} {'GFLOP/s':>8s}")
    for N in args.n:
        for name, atype, K, M in SHAPES:
            t_fast, t_ref, t_ggml, nbytes = bench_one(atype, K, M, N, not args.no_ref,
                                                      0 if args.no_ggml else args.threads)
            flops = 2.0 * M * K * N
            cols = [f"{t * 1e3:9.3f} {flops / t / 1e9:8.1f}" if t else f"{'-':>9s} {'-':>8s}" for t in (t_ref, t_ggml)]
            print(f"{name:22s} {T(atype).name:5s} {K:5d} {M:7d} {N:3d} | {t_fast * 1e3:9.3f} "
                  f"{flops / t_fast / 1e9:8.1f} {nbytes / t_fast / 1e9:6.1f} | {cols[0]} | {cols[1]}", flush=True)


if __name__ == "__main__":
    main()
