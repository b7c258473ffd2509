"""GPU backend benchmark on the model shapes of the H100 issue: llama-bench's tg128 (decode tokens/s, here
one token after `--past` cached ones, the middle of a 128-token generation) and pp512 (prompt tokens/s),
the weight bytes read per decoded token, the bandwidth share (those bytes x tokens/s / the measured
device-to-device copy rate), launches per token, and peak device memory. Prints one JSON object (and
writes it to --json).

    python3 bench/bench_gpu.py                                   # the three models of the issue
    python3 bench/bench_gpu.py --models synthetic-0.6b           # the shape of the first H100 run
    python3 bench/bench_gpu.py --emu --models tiny,tiny-moe --prefill 8 --iters 1   # emulator smoke test
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from gpu_models import MODELS, Model, Weightset, build_graph, kv_cache  # noqa: E402
from hybridllm.ggml.tensor import Tensor  # noqa: E402
from hybridllm.ggml.types import GGMLOp, GGMLType, TensorFlag  # noqa: E402

ISSUE_MODELS = "qwen3-0.6b-q8_0,qwen3-8b-q4_k_m,qwen3-30b-a3b-q5_k_m"


def timed_runs(be, plan, n: int, warm: int = 2) -> float:
    """Seconds per run over n runs, after `warm` runs (the second captures the CUDA graph)."""
    for _ in range(warm):
        plan.run()
    be.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        plan.run()
    be.synchronize()
    return (time.perf_counter() - t) / n


class MemWatch:
    """Device memory in use (total - free) at the start and its largest value over the sample points."""

    def __init__(self, be) -> None:
        self.be = be
        if hasattr(be.rt, "device"):
            import cupy

            cupy.get_default_memory_pool().free_all_blocks()  # the weight generator's temporaries
        free, total = be.rt.memory()
        self.start = self.peak = total - free

    def sample(self) -> None:
        free, total = self.be.rt.memory()
        self.peak = max(self.peak, total - free)


def decode_run(be, m: Model, ws: Weightset, kv, n_ctx: int, past: int, iters: int, mem: MemWatch) -> dict:
    b, logits = build_graph(be, m, ws, 1, past, n_ctx, planned=True, kv=kv)
    t1 = time.perf_counter()
    plan = be.prepare(b.nodes)
    res = {"prepare_decode_ms": 1e3 * (time.perf_counter() - t1)}
    plan._no_graph = True
    t_nograph = timed_runs(be, plan, max(1, iters // 4), warm=1)
    plan._no_graph = not be.graphs
    t = timed_runs(be, plan, iters)
    mem.sample()
    out = np.frombuffer(be.get(logits.buffer, logits.offset, logits.nbytes), dtype=np.float32)
    res.update(tg_tok_s=1 / t, tg_ms=1e3 * t, tg_tok_s_nograph=1 / t_nograph, decode_past=past,
               launches_per_token=len(plan.launches), graph_captured=getattr(plan, "_graph", None) is not None,
               logits_finite=bool(np.isfinite(out).all()), weight_GBps=ws.bytes_per_token * (1 / t) / 1e9)
    del plan
    b.free()
    return res


def bench_model(be, m: Model, past: int, prefill: int, iters: int, copy_gbps: float | None, n_ctx: int = 4096,
                long_past: int = 0) -> dict:
    mem = MemWatch(be)
    t0 = time.perf_counter()
    ws = Weightset(be, m)
    kvb, kv = kv_cache(be, m, n_ctx)
    kv_bytes = sum(buf.size for buf in kvb.bufs)
    res: dict = {"weights_GB": ws.bytes_total / 1e9, "weight_read_per_token_GB": ws.bytes_per_token / 1e9,
                 "setup_s": time.perf_counter() - t0, "n_ctx": n_ctx, "kv_GB": kv_bytes / 1e9}
    res.update(decode_run(be, m, ws, kv, n_ctx, past, iters, mem))
    if copy_gbps:
        res["bandwidth_share"] = res["weight_GBps"] / copy_gbps
    if m.ref_tg:
        res["tg_vs_llama_cpp"] = res["tg_tok_s"] / m.ref_tg
    if long_past:
        long = decode_run(be, m, ws, kv, n_ctx, min(long_past, n_ctx - 1), max(2, iters // 3), mem)
        res.update(tg_long_tok_s=long["tg_tok_s"], tg_long_past=long["decode_past"],
                   tg_long_finite=long["logits_finite"])
    if prefill:
        b, logits = build_graph(be, m, ws, prefill, 0, n_ctx, planned=True, kv=kv)
        t1 = time.perf_counter()
        plan = be.prepare(b.nodes)
        res["prepare_prefill_ms"] = 1e3 * (time.perf_counter() - t1)
        t = timed_runs(be, plan, max(2, iters // 10), warm=2)  # the second warm-up run captures the graph
        mem.sample()
        out = np.frombuffer(be.get(logits.buffer, logits.offset, logits.nbytes), dtype=np.float32)
        res.update(pp_tokens=prefill, pp_tok_s=prefill / t, pp_ms=1e3 * t, pp_launches=len(plan.launches),
                   pp_logits_finite=bool(np.isfinite(out).all()))
        if m.ref_pp:
            res["pp_vs_llama_cpp"] = res["pp_tok_s"] / m.ref_pp
        del plan
        b.free()
    # device memory this model took at its peak (CUDA context and kernels excluded: measured from the start)
    res["peak_device_mem_GB"] = (mem.peak - mem.start) / 1e9
    res["peak_over_weights_kv_GB"] = (mem.peak - mem.start - ws.bytes_total - kv_bytes) / 1e9
    kvb.free()
    ws.free()
    return res


def bench_copies(be, size: int, iters: int) -> dict:
    """Device-to-device (copy engine and k_memcpy kernel), host-to-device and device-to-host GB/s."""
    a, c = be.alloc_buffer(size), be.alloc_buffer(size)
    host = np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8)
    res = {"copy_bytes": size}

    def rate(fn, n, nbytes):
        fn()
        be.synchronize()
        t = time.perf_counter()
        for _ in range(n):
            fn()
        be.synchronize()
        return nbytes * n / (time.perf_counter() - t) / 1e9

    res["h2d_GBps"] = rate(lambda: be.set(a, 0, host.data), max(1, iters // 4), size)
    res["d2h_GBps"] = rate(lambda: be.get(a, 0, size), max(1, iters // 4), size)
    # read + write counted, as memory bandwidth is usually quoted
    res["d2d_copy_GBps"] = rate(lambda: be.copy(a, 0, c, 0, size), iters, 2 * size)
    src_t, dst_t = Tensor(GGMLType.I32, (size // 4,)), Tensor(GGMLType.I32, (size // 4,))
    src_t.buffer, dst_t.buffer = a, c
    node = Tensor(GGMLType.I32, (size // 4,), op=GGMLOp.CPY, src=[src_t, dst_t], flags=TensorFlag.COMPUTE)
    node.buffer, node.offset, node.view_src = c, 0, dst_t
    plan = be.prepare([node])
    res["d2d_kernel_GBps"] = rate(plan.run, iters, 2 * size)
    assert be.get(c, size - 64, 64) == be.get(a, size - 64, 64)
    be.free_buffer(a)
    be.free_buffer(c)
    return res


def make_backend(emu: bool, warp: int):
    from hybridllm.backends.cupy_backend import CupyBackend

    if emu:
        sys.path.insert(0, str(ROOT / "tests" / "gpu"))
        from emu.runtime import EmuRuntime

        return CupyBackend(runtime=EmuRuntime(warp))
    return CupyBackend(0)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=ISSUE_MODELS, help=f"comma list of {', '.join(MODELS)}")
    ap.add_argument("--emu", action="store_true", help="run on the CPU kernel emulator (smoke test)")
    ap.add_argument("--warp", type=int, default=32, help="emulator warp width")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--past", type=int, default=64, help="cached tokens when decoding (tg128's middle)")
    ap.add_argument("--prefill", type=int, default=512, help="prompt tokens (0: skip)")
    ap.add_argument("--ctx", type=int, default=4096, help="KV cache cells (F16), allocated once per model")
    ap.add_argument("--long-past", type=int, default=0, help="also decode after this many cached tokens")
    ap.add_argument("--copy-mib", type=int, default=1024, help="size of the copy-bandwidth test (0: skip)")
    ap.add_argument("--json", type=Path, help="also write the result here")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    be = make_backend(args.emu, args.warp)
    res: dict = {"device": be.name, "models": {}}
    if hasattr(be.rt, "device"):
        import cupy

        res["gpu"] = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    copy_gbps = None
    if args.copy_mib:
        res.update(bench_copies(be, args.copy_mib << 20, max(2, args.iters // 5)))
        copy_gbps = res["d2d_copy_GBps"]
    for name in args.models.split(","):
        res["models"][name] = bench_model(be, MODELS[name], args.past, args.prefill, args.iters, copy_gbps,
                                            args.ctx, args.long_past)
        print(name, json.dumps(res["models"][name], sort_keys=True), flush=True)
    res["wall_s"] = time.perf_counter() - t0
    text = json.dumps(res, indent=1, sort_keys=True)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return res


if __name__ == "__main__":
    main()
