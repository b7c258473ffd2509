"""MUL_MAT throughput on the Gemma 3 270M Q4_K_M weight shapes: numba kernels vs the numpy reference
and vs real ggml (the peer's libggml-cpu computing the same MUL_MAT on the same data).

    python bench/bench_matmul.py [--threads 2] [--n 1 64] [--no-ref] [--no-ggml] [--ggml-lib-dir DIR]
    python bench/bench_matmul.py --threads 2 --decode-sim 30   # one decode step's matmuls in model order

Reports ms per call (best of ~1 s), GFLOP/s (2*M*K*N) and GB/s of weight bytes read, for random valid
blocks. ggml runs with a plan made once (its threads still start per call without a threadpool).
"""
from __future__ import annotations

import argparse
import ctypes
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "matmul"))

from matmul_blocks import random_rows

from hybridllm.backends.cpu_kernels import get_matmul, mul_mat_mode, set_num_threads
from hybridllm.backends.numpy_ops.matmul import mul_mat_ref
from hybridllm.ggml.types import GGMLType as T

# (name, weight type, K, M, uses per decoded token): the gemma-3-270m Q4_K_M matrices (18 layers;
# ffn_down is Q6_K in 9 layers and Q4_K in the others)
SHAPES = [("output/token_embd", T.Q8_0, 640, 262144, 1), ("attn_q", T.Q5_0, 640, 1024, 18),
          ("attn_k", T.Q5_0, 640, 256, 18), ("attn_v", T.Q8_0, 640, 256, 18),
          ("attn_output", T.Q4_K, 1024, 640, 18), ("ffn_gate/up", T.Q5_0, 640, 2048, 36),
          ("ffn_down", T.Q6_K, 2048, 640, 9), ("ffn_down", T.Q4_K, 2048, 640, 9)]


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


class _InitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


def ggml_libs(lib_dir: str | None) -> tuple[ctypes.CDLL, ctypes.CDLL]:
    """libggml-base and libggml-cpu: from `lib_dir`, else the peer wheel (patched for this glibc)."""
    if lib_dir is None:
        from hybridllm.testing.ggml_ref import ggml_libs as peer_libs
        base, cpu = peer_libs()
    else:
        base = ctypes.CDLL(str(Path(lib_dir) / "libggml-base.so.0"), mode=ctypes.RTLD_GLOBAL)
        cpu = ctypes.CDLL(str(Path(lib_dir) / "libggml-cpu.so.0"), mode=ctypes.RTLD_GLOBAL)
    vp = ctypes.c_void_p
    for name, args, res in [("ggml_init", [_InitParams], vp), ("ggml_free", [vp], None),
                            ("ggml_new_tensor_2d", [vp, ctypes.c_int, ctypes.c_int64, ctypes.c_int64], vp),
                            ("ggml_mul_mat", [vp, vp, vp], vp), ("ggml_get_data", [vp], vp),
                            ("ggml_new_graph", [vp], vp), ("ggml_build_forward_expand", [vp, vp], None)]:
        fn = getattr(base, name)
        fn.argtypes, fn.restype = args, res
    cpu.ggml_graph_plan.argtypes, cpu.ggml_graph_plan.restype = [vp, ctypes.c_int, vp], _CPlan
    cpu.ggml_graph_compute.argtypes = [vp, ctypes.POINTER(_CPlan)]
    cpu.ggml_cpu_init()
    return base, cpu


def bench_ggml(libs: tuple[ctypes.CDLL, ctypes.CDLL], atype: int, A: np.ndarray, B: np.ndarray,
               threads: int) -> float:
    """Best time of ggml_graph_compute (plan made once, as llama.cpp does) for one MUL_MAT node."""
    base, cpu = libs
    K, M, N = B.shape[1], A.shape[0], B.shape[0]
    mem = np.zeros(A.nbytes + B.nbytes + 4 * M * N + (1 << 20), np.uint8)
    ctx = base.ggml_init(_InitParams(mem.size, mem.ctypes.data, False))
    try:
        a = base.ggml_new_tensor_2d(ctx, int(atype), K, M)
        b = base.ggml_new_tensor_2d(ctx, int(T.F32), K, N)
        ctypes.memmove(base.ggml_get_data(a), A.ctypes.data, A.nbytes)
        ctypes.memmove(base.ggml_get_data(b), B.ctypes.data, B.nbytes)
        gf = base.ggml_new_graph(ctx)
        base.ggml_build_forward_expand(gf, base.ggml_mul_mat(ctx, a, b))
        plan = cpu.ggml_graph_plan(gf, threads, None)
        work = np.zeros(max(plan.work_size, 1), np.uint8)
        plan.work_data = work.ctypes.data
        return best_of(lambda: cpu.ggml_graph_compute(gf, ctypes.byref(plan)))
    finally:
        base.ggml_free(ctx)


def bench_one(atype: int, K: int, M: int, N: int, ref: bool, ggml: tuple | None = None, threads: int = 1
              ) -> tuple[float, float | None, float | None, int]:
    rng = np.random.default_rng(0)
    A = random_rows(rng, atype, (M,), K)
    B = rng.standard_normal((N, K)).astype(np.float32)
    out = np.zeros((N, M), np.float32)
    bind = get_matmul(atype, T.F32)
    assert bind is not None
    mode = np.array([mul_mat_mode(atype, T.F32, N, M, True)], np.int64)
    run = bind(A.reshape(-1), A.shape[-1], M, K, np.zeros(1, np.int64), np.array([0, N], np.int64), mode,
               np.arange(N, dtype=np.int64), np.arange(N, dtype=np.int64) * M, B.view(np.uint8).reshape(-1),
               np.arange(N, dtype=np.int64) * K * 4, out.reshape(-1))
    t_fast = best_of(run)
    t_ref = best_of(lambda: mul_mat_ref(A[None, None], atype, B[None, None]), 0.5, 1) if ref else None
    t_ggml = bench_ggml(ggml, atype, A, B, threads) if ggml else None
    return t_fast, t_ref, t_ggml, A.nbytes


def decode_step_sim(gap_us: float, steps: int = 30) -> float:
    """ms per decode step of the gemma-3-270m matmuls run in model order (7 per layer, 18 layers, then the
    output), each followed by `gap_us` of Python busy work standing in for the other ops of the step."""
    rng = np.random.default_rng(0)
    order = {name: (atype, K, M) for name, atype, K, M, _ in SHAPES}
    layer = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate/up", "ffn_gate/up", "ffn_down"]
    runs = {}
    for name, (atype, K, M) in order.items():
        A = random_rows(rng, atype, (M,), K)
        B = rng.standard_normal((1, K)).astype(np.float32)
        out = np.zeros(M, np.float32)
        bind = get_matmul(atype, T.F32)
        assert bind is not None
        mode = np.array([mul_mat_mode(atype, T.F32, 1, M, True)], np.int64)
        runs[name] = (bind(A.reshape(-1), A.shape[-1], M, K, np.zeros(1, np.int64), np.array([0, 1]), mode,
                           np.zeros(1, np.int64), np.zeros(1, np.int64), B.view(np.uint8).reshape(-1),
                           np.zeros(1, np.int64), out), A, B, out)
    seq = [runs[n][0] for _ in range(18) for n in layer] + [runs["output/token_embd"][0]]

    def gap() -> None:
        end = time.perf_counter() + gap_us * 1e-6
        while time.perf_counter() < end:
            pass

    def step() -> None:
        for run in seq:
            run()
            gap()
    return best_of(step, 3.0) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--no-ref", action="store_true", help="skip the (slow) numpy reference")
    ap.add_argument("--no-ggml", action="store_true", help="skip the real-ggml comparison")
    ap.add_argument("--ggml-lib-dir", help="load libggml-base/-cpu.so.0 from here instead of the peer wheel")
    ap.add_argument("--decode-sim", type=float, metavar="GAP_US",
                    help="only time a simulated decode step (matmuls in model order, GAP_US of other work after each)")
    args = ap.parse_args()
    set_num_threads(args.threads)
    if args.decode_sim is not None:
        ms = decode_step_sim(args.decode_sim)
        print(f"threads={args.threads} simulated decode step (gap {args.decode_sim:g} us): {ms:.2f} ms")
        return
    libs = None if args.no_ggml else ggml_libs(args.ggml_lib_dir)
    print(f"threads={args.threads}")
    print(f"{'matrix':22s} {'type':5s} {'K':>5s} {'M':>7s} {'N':>3s} | {'numba ms':>9s} {'GFLOP/s':>8s} "
          f"{'GB/s':>6s} | {'numpy ms':>9s} {'GFLOP/s':>8s} | {'ggml ms':>9s} {'GFLOP/s':>8s}")
    for N in args.n:
        step = {"numba": 0.0, "ggml": 0.0}
        for name, atype, K, M, uses in SHAPES:
            t_fast, t_ref, t_ggml, nbytes = bench_one(atype, K, M, N, not args.no_ref, libs, args.threads)
            step["numba"] += uses * t_fast
            step["ggml"] += uses * (t_ggml or 0.0)
            flops = 2.0 * M * K * N
            cols = [f"{t * 1e3:9.3f} {flops / t / 1e9:8.1f}" if t else f"{'-':>9s} {'-':>8s}" for t in (t_ref, t_ggml)]
            print(f"{name:22s} {T(atype).name:5s} {K:5d} {M:7d} {N:3d} | {t_fast * 1e3:9.3f} "
                  f"{flops / t_fast / 1e9:8.1f} {nbytes / t_fast / 1e9:6.1f} | {cols[0]} | {cols[1]}", flush=True)
        ggml = f", ggml {step['ggml'] * 1e3:.2f} ms" if libs else ""
        print(f"all MUL_MATs of one gemma-3-270m step with {N} token(s): numba {step['numba'] * 1e3:.2f} ms{ggml}")


if __name__ == "__main__":
    main()
