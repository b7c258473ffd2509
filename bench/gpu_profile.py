"""Where the GPU backend's time goes: per-kernel times of a model's decode (and prefill) plan, timed with
CUDA events around every launch, and the weight bandwidth of single decode matmuls on 8B-sized matrices.

    python3 bench/gpu_profile.py                                  # 0.6B and 8B decode, matvec table
    python3 bench/gpu_profile.py --models qwen3-30b-a3b-q5_k_m --prefill 512
    python3 bench/gpu_profile.py --emu --models tiny --reps 1 --prefill 8       # smoke test
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from gpu_models import MODELS, Builder, Weights, Weightset, build_graph  # noqa: E402
from hybridllm.ggml.types import GGMLOp, GGMLType  # noqa: E402


def launch_times(be, launches, reps: int) -> np.ndarray:
    """Milliseconds of each launch (median over reps), events recorded between launches on the stream."""
    if not hasattr(be.rt, "stream"):  # the emulator: wall time per launch
        out = np.zeros((reps, len(launches)))
        for r in range(reps):
            for i, ln in enumerate(launches):
                t = time.perf_counter()
                be.rt.run([ln])
                out[r, i] = 1e3 * (time.perf_counter() - t)
        return np.median(out, axis=0)
    import cupy as cp

    rt, s = be.rt, be.rt.stream
    evs = [cp.cuda.Event() for _ in range(len(launches) + 1)]
    out = np.zeros((reps, len(launches)))
    with rt.device:
        for r in range(reps + 1):
            evs[0].record(s)
            for i, (fn, grid, block, args, smem) in enumerate(launches):
                fn(grid, block, args, shared_mem=smem, stream=s)
                evs[i + 1].record(s)
            s.synchronize()
            if r:
                out[r - 1] = [cp.cuda.get_elapsed_time(evs[i], evs[i + 1]) for i in range(len(launches))]
    return np.median(out, axis=0)


def kernel_name(be, fn) -> str:
    names = getattr(getattr(be.rt, "kernels", None), "names", {})
    return names.get(id(fn), getattr(fn, "name", "?"))


def by_kernel(be, launches, ms: np.ndarray) -> list[dict]:
    agg: dict[str, list[float]] = defaultdict(list)
    for (fn, *_), t in zip(launches, ms):
        agg[kernel_name(be, fn)].append(float(t))
    rows = [{"kernel": k, "count": len(v), "total_ms": sum(v), "mean_us": 1e3 * sum(v) / len(v)}
            for k, v in agg.items()]
    return sorted(rows, key=lambda r: -r["total_ms"])


def graph_ms(be, plan, n: int = 20) -> float:
    for _ in range(2):
        plan.run()
    be.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        plan.run()
    be.synchronize()
    return 1e3 * (time.perf_counter() - t) / n


def ablation(be, plan, n: int) -> list[dict]:
    """Graph time saved by dropping each kernel's launches (the true in-graph cost, launch gaps included)."""
    from hybridllm.backends.cupy_backend import CupyPlan

    base = graph_ms(be, plan, n)
    names = sorted({kernel_name(be, ln.fn) for ln in plan.launches})
    rows = []
    for k in names:
        keep = [ln for ln in plan.launches if kernel_name(be, ln.fn) != k]
        t = graph_ms(be, CupyPlan(be, keep, False), n) if keep else 0.0
        rows.append({"kernel": k, "count": len(plan.launches) - len(keep), "saved_ms": base - t,
                     "per_launch_us": 1e3 * (base - t) / max(1, len(plan.launches) - len(keep))})
    return sorted(rows, key=lambda r: -r["saved_ms"])


def profile_model(be, name: str, past: int, prefill: int, reps: int, abl: bool = True) -> dict:
    m = MODELS[name]
    ws = Weightset(be, m)
    res: dict = {}
    for label, T, p in (("decode", 1, past), ("prefill", prefill, 0)):
        if T == 0:
            continue
        b, _ = build_graph(be, m, ws, T, p)
        plan = be.prepare(b.nodes)
        total = graph_ms(be, plan, 20 if T == 1 else 3)
        ms = launch_times(be, plan.launches, reps if T == 1 else 1)
        rows = by_kernel(be, plan.launches, ms)
        res[label] = {"graph_ms": total, "sum_of_launches_ms": float(ms.sum()), "launches": len(plan.launches),
                      "kernels": rows[:25]}
        print(f"== {name} {label} (T={T}): graph {total:.3f} ms, {len(plan.launches)} launches, "
              f"sum of launch times {ms.sum():.3f} ms", flush=True)
        for r in rows[:25]:
            print(f"  {r['kernel']:28s} x{r['count']:<5d} {r['total_ms']:8.3f} ms  {r['mean_us']:8.1f} us", flush=True)
        if T == 1 and abl:
            rows_a = res[label]["ablation"] = ablation(be, plan, 20)
            print("  -- graph time saved without each kernel (decode):", flush=True)
            for r in rows_a:
                print(f"  {r['kernel']:28s} x{r['count']:<5d} {r['saved_ms']:8.3f} ms  "
                      f"{r['per_launch_us']:8.1f} us/launch", flush=True)
        del plan
        b.free()
    ws.free()
    return res


SHAPES = ((4096, 12288), (12288, 4096), (4096, 4096), (1024, 151936))


def matvec_table(be, reps: int, shapes=SHAPES) -> list[dict]:
    """GB/s of one decode matmul (weights bytes / time) on 8B-sized matrices, per weight type."""
    rows = []
    w = Weights(be)
    for qtype in (GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K, GGMLType.Q8_0, GGMLType.Q4_0):
        for K, M in shapes:
            b = Builder(be)
            a = b.leaf(qtype, (K, M))
            w.fill(a)
            x = b.leaf(GGMLType.F32, (K, 1), np.random.default_rng(0).standard_normal(K).astype(np.float32))
            b.op(GGMLOp.MUL_MAT, GGMLType.F32, (M, 1), [a, x])
            plan = be.prepare(b.nodes)
            ms = launch_times(be, plan.launches, reps)
            t = graph_ms(be, plan, 50)
            rows.append({"type": qtype.name, "K": K, "M": M, "MB": a.nbytes / 1e6, "kernel_us": 1e3 * float(ms[-1]),
                         "GBps_kernel": a.nbytes / (ms[-1] * 1e-3) / 1e9, "GBps_graph": a.nbytes / (t * 1e-3) / 1e9})
            r = rows[-1]
            print(f"  {r['type']:5s} {K:6d} -> {M:6d} {r['MB']:7.1f} MB  {r['kernel_us']:8.1f} us  "
                  f"{r['GBps_kernel']:7.0f} GB/s (kernel)  {r['GBps_graph']:7.0f} GB/s (graph)", flush=True)
            del plan
            b.free()
    return rows


def fa_table(be, n: int = 20) -> list[dict]:
    """Flash attention alone: in-graph microseconds per launch (a graph of n copies of the launch) by shape,
    next to an empty launch (a 16-byte copy) for the graph's own per-node cost."""
    from hybridllm.backends.cupy_backend import CupyPlan
    from hybridllm.ggml.types import GGMLType as T

    rows = []
    b = Builder(be)
    a, c = b.leaf(T.I32, (4,)), b.leaf(T.I32, (4,))
    b.op(GGMLOp.CPY, T.I32, (4,), [a, c], into=c)
    base = be.prepare(b.nodes)
    t0 = graph_ms(be, CupyPlan(be, base.launches * n, False), 10) / n
    rows.append({"case": "empty launch", "us": 1e3 * t0})
    print(f"  empty launch                                  {1e3 * t0:7.2f} us", flush=True)
    b.free()
    D, n_ctx = 128, 4096
    for H, Hkv, n_kv, n_q in ((16, 8, 256, 1), (32, 8, 256, 1), (32, 4, 256, 1), (32, 8, 1024, 1), (32, 8, 4096, 1),
                              (32, 8, 512, 512)):
        b = Builder(be)
        rng = np.random.default_rng(0)
        q = b.leaf(T.F32, (D, H, n_q), rng.standard_normal((n_q, H, D)).astype(np.float32))
        kc = b.leaf(T.F16, (D * Hkv, n_ctx), (rng.standard_normal((n_ctx, Hkv * D)) * 0.3).astype(np.float16))
        vc = b.leaf(T.F16, (D * Hkv, n_ctx), (rng.standard_normal((n_ctx, Hkv * D)) * 0.3).astype(np.float16))
        mask = np.zeros((n_q, n_kv), np.float16)
        for i in range(n_q):
            mask[i, n_kv - n_q + i + 1:] = -np.inf
        m = b.leaf(T.F16, (n_kv, n_q), mask)
        vq = b.view(q, (D, n_q, H, 1), (4, 4 * D * H, 4 * D, 4 * D * H * n_q), op=GGMLOp.PERMUTE)
        vk = b.view(kc, (D, n_kv, Hkv, 1), (2, 2 * D * Hkv, 2 * D, 2 * D * Hkv * n_ctx), op=GGMLOp.PERMUTE)
        vv = b.view(vc, (D, n_kv, Hkv, 1), (2, 2 * D * Hkv, 2 * D, 2 * D * Hkv * n_ctx), op=GGMLOp.PERMUTE)
        b.op(GGMLOp.FLASH_ATTN_EXT, T.F32, (D, H, n_q, 1), [vq, vk, vv, m, None],
             (float(1 / np.sqrt(D)), 0.0, 0.0, 10, 0))
        for warps in (("8", "4", "2") if n_q == 1 else ("",)):
            os.environ["HYBRIDLLM_FA_DECODE_WARPS"] = warps
            plan = be.prepare(b.nodes)
            reps = n if n_q == 1 else 3
            t = graph_ms(be, CupyPlan(be, plan.launches * reps, False), 10) / reps
            name = kernel_name(be, plan.launches[-1].fn)
            rows.append({"case": f"H {H} Hkv {Hkv} n_kv {n_kv} n_q {n_q}", "kernel": name, "us": 1e3 * t})
            print(f"  {name:16s} H {H:3d} Hkv {Hkv} n_kv {n_kv:5d} n_q {n_q:4d}  {1e3 * t:9.2f} us", flush=True)
            del plan
        os.environ.pop("HYBRIDLLM_FA_DECODE_WARPS", None)
        b.free()
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="qwen3-0.6b-q8_0,qwen3-8b-q4_k_m")
    ap.add_argument("--past", type=int, default=64)
    ap.add_argument("--prefill", type=int, default=0)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--no-matvec", action="store_true")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--emu", action="store_true", help="smoke test on the CPU kernel emulator (small shapes)")
    ap.add_argument("--fa", action="store_true", help="flash attention micro-benchmark")
    ap.add_argument("--no-ablation", action="store_true")
    args = ap.parse_args(argv)
    from bench_gpu import make_backend

    be = make_backend(args.emu, 32)
    res: dict = {"models": {}}
    if not args.no_matvec:
        print("== decode matvec weight bandwidth", flush=True)
        res["matvec"] = matvec_table(be, args.reps, ((256, 64),) if args.emu else SHAPES)
    if args.fa:
        print("== flash attention alone (graph time per launch)", flush=True)
        res["fa"] = fa_table(be, 2 if args.emu else 20)
    for name in args.models.split(","):
        if name:
            res["models"][name] = profile_model(be, name, args.past, args.prefill, args.reps, not args.no_ablation)
    if args.json:
        args.json.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
