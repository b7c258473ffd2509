"""GPU backend benchmark: decode tokens/s of a synthetic Qwen3-0.6B-shaped stack, prefill tokens/s, and
copy bandwidths. Prints one JSON object (and writes it to --json).

The graph is the one llama.cpp builds for qwen3 (pre-norm, Q/K RMS norms, NEOX rope, GQA flash attention
over an F16 KV cache written with SET_ROWS, SwiGLU FFN, output head), with Q4_K/Q6_K weights like a
Q4_K_M file. Weights are random bytes with sane block scales; every layer has its own memory so the
weight traffic per token is the real model's.

    python3 bench/bench_gpu.py                      # on a CUDA/ROCm machine
    python3 bench/bench_gpu.py --emu --tiny         # smoke test on the CPU kernel emulator
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hybridllm.ggml.tensor import Tensor, pack_params  # noqa: E402
from hybridllm.ggml.types import GGMLOp, GGMLType, GluOp, RopeMode, TensorFlag, TRAITS  # noqa: E402

F32, F16, I32, I64 = GGMLType.F32, GGMLType.F16, GGMLType.I32, GGMLType.I64


@dataclass
class Config:
    n_embd: int = 1024
    n_layer: int = 28
    n_head: int = 16
    n_head_kv: int = 8
    head_dim: int = 128
    n_ff: int = 3072
    n_vocab: int = 151936
    n_ctx: int = 4096
    n_past: int = 512      # tokens already in the cache when decoding
    attn_type: int = GGMLType.Q4_K
    ffn_down_type: int = GGMLType.Q6_K
    out_type: int = GGMLType.Q6_K


TINY = Config(n_embd=256, n_layer=2, n_head=4, n_head_kv=2, head_dim=64, n_ff=512, n_vocab=1000,
              n_ctx=64, n_past=16)

# offsets of the f16 scale fields in each block, patched after filling blocks with random bytes
_F16_FIELDS = {GGMLType.Q4_K: (0, 2), GGMLType.Q5_K: (0, 2), GGMLType.Q6_K: (208,), GGMLType.Q8_0: (0,),
               GGMLType.Q4_0: (0,), GGMLType.Q2_K: (80, 82), GGMLType.Q3_K: (108,)}


def fake_weights(qtype: int, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    tr = TRAITS[qtype]
    if qtype == F32:
        return (rng.standard_normal((rows, cols)) * 0.02).astype(np.float32).view(np.uint8)
    if qtype == F16:
        return (rng.standard_normal((rows, cols)) * 0.02).astype(np.float16).view(np.uint8)
    nblk = rows * cols // tr.blck_size
    raw = rng.integers(0, 256, (nblk, tr.type_size), dtype=np.uint8)
    d = np.full(nblk, 1e-3 / 8, dtype=np.float16).view(np.uint8).reshape(nblk, 2)
    for off in _F16_FIELDS[qtype]:
        raw[:, off:off + 2] = d
    return raw.reshape(rows, -1)


class Builder:
    """Tensors in backend buffers and the node list, in execution order."""

    def __init__(self, be) -> None:
        self.be = be
        self.nodes: list[Tensor] = []
        self.bufs: list = []

    def alloc(self, t: Tensor) -> Tensor:
        buf = self.be.alloc_buffer(max(1, t.nbytes))
        if buf is None:
            raise MemoryError(f"cannot allocate {t.nbytes} bytes for {t.name}")
        self.bufs.append(buf)
        t.buffer, t.offset = buf, 0
        return t

    def leaf(self, type: int, ne, data: np.ndarray | None = None, name: str = "") -> Tensor:
        t = self.alloc(Tensor(type, ne, name=name))
        if data is not None:
            self.be.set(t.buffer, 0, np.ascontiguousarray(data).view(np.uint8).reshape(-1).data)
        return t

    def op(self, op: GGMLOp, type: int, ne, src, params=(), into: Tensor | None = None) -> Tensor:
        p = params if isinstance(params, bytes) else pack_params(*params)
        t = Tensor(type, ne, into.nb if into is not None else None, op=op, op_params=p,
                   flags=TensorFlag.COMPUTE, src=list(src), name=f"{op.name.lower()}-{len(self.nodes)}")
        if into is not None:
            t.buffer, t.offset, t.view_src = into.buffer, into.offset, into
        else:
            self.alloc(t)
        self.nodes.append(t)
        return t

    def view(self, base: Tensor, ne, nb, offset: int = 0) -> Tensor:
        t = Tensor(base.type, ne, nb, op=GGMLOp.VIEW, src=[base], view_src=base, view_offs=offset)
        t.buffer, t.offset = base.buffer, base.offset + offset
        self.nodes.append(t)
        return t


def build_model(be, cfg: Config, n_tokens: int, rng: np.random.Generator):
    """Weights + caches + one forward graph over `n_tokens` new tokens; returns (builder, inputs, logits)."""
    b = Builder(be)
    E, H, Hkv, D, FF, T = cfg.n_embd, cfg.n_head, cfg.n_head_kv, cfg.head_dim, cfg.n_ff, n_tokens
    n_kv = min(cfg.n_ctx, (cfg.n_past + T + 255) // 256 * 256)  # llama.cpp pads n_kv to 256
    shapes = {"q": (cfg.attn_type, H * D, E), "k": (cfg.attn_type, Hkv * D, E), "v": (cfg.attn_type, Hkv * D, E),
              "o": (cfg.attn_type, E, H * D), "gate": (cfg.attn_type, FF, E), "up": (cfg.attn_type, FF, E),
              "down": (cfg.ffn_down_type, E, FF)}
    layer_w = {k: fake_weights(t, r, c, rng) for k, (t, r, c) in shapes.items()}  # uploaded per layer
    ones = lambda n: (1.0 + 0.01 * rng.standard_normal(n)).astype(np.float32)  # noqa: E731
    x = b.leaf(F32, (E, T), rng.standard_normal((T, E)).astype(np.float32), "embd")
    pos = b.leaf(I32, (T,), np.arange(cfg.n_past, cfg.n_past + T, dtype=np.int32), "inp_pos")
    kv_idx = b.leaf(I64, (T,), np.arange(cfg.n_past, cfg.n_past + T, dtype=np.int64), "kv_idxs")
    mask = np.zeros((T, n_kv), np.float16)
    for i in range(T):
        mask[i, cfg.n_past + i + 1:] = -np.inf
    kq_mask = b.leaf(F16, (n_kv, T), mask, "kq_mask")
    rope = pack_params(0, D, int(RopeMode.NEOX), 0, 40960, 1e6, 1.0, 0.0, 1.0, 32.0, 1.0, 0, 0, 0, 0, 0)
    weight_bytes = 0
    cur = x
    for il in range(cfg.n_layer):
        W = {k: b.leaf(shapes[k][0], (shapes[k][2], shapes[k][1]), layer_w[k], f"blk.{il}.{k}") for k in shapes}
        weight_bytes += sum(w.nbytes for w in W.values())
        n_attn, n_ffn = b.leaf(F32, (E,), ones(E)), b.leaf(F32, (E,), ones(E))
        n_q, n_k = b.leaf(F32, (D,), ones(D)), b.leaf(F32, (D,), ones(D))
        kc, vc = b.leaf(F16, (Hkv * D, cfg.n_ctx)), b.leaf(F16, (Hkv * D, cfg.n_ctx))
        for c in (kc, vc):
            be.clear(c.buffer, 0)
        h = b.op(GGMLOp.MUL, F32, (E, T), [b.op(GGMLOp.RMS_NORM, F32, (E, T), [cur], (1e-6,)), n_attn])
        q = b.op(GGMLOp.MUL_MAT, F32, (H * D, T), [W["q"], h])
        k = b.op(GGMLOp.MUL_MAT, F32, (Hkv * D, T), [W["k"], h])
        v = b.op(GGMLOp.MUL_MAT, F32, (Hkv * D, T), [W["v"], h])
        q3 = b.view(q, (D, H, T, 1), (4, 4 * D, 4 * D * H, 4 * D * H * T))
        k3 = b.view(k, (D, Hkv, T, 1), (4, 4 * D, 4 * D * Hkv, 4 * D * Hkv * T))
        q3 = b.op(GGMLOp.MUL, F32, (D, H, T), [b.op(GGMLOp.RMS_NORM, F32, (D, H, T), [q3], (1e-6,)), n_q])
        k3 = b.op(GGMLOp.MUL, F32, (D, Hkv, T), [b.op(GGMLOp.RMS_NORM, F32, (D, Hkv, T), [k3], (1e-6,)), n_k])
        qr = b.op(GGMLOp.ROPE, F32, (D, H, T), [q3, pos], rope)
        kr = b.op(GGMLOp.ROPE, F32, (D, Hkv, T), [k3, pos], rope)
        kr2 = b.view(kr, (Hkv * D, T, 1, 1), (4, 4 * Hkv * D, 4 * Hkv * D * T, 4 * Hkv * D * T))
        b.op(GGMLOp.SET_ROWS, F16, (Hkv * D, cfg.n_ctx), [kr2, kv_idx, kc], into=kc)
        b.op(GGMLOp.SET_ROWS, F16, (Hkv * D, cfg.n_ctx), [v, kv_idx, vc], into=vc)
        vq = b.view(qr, (D, T, H, 1), (4, 4 * D * H, 4 * D, 4 * D * H * T))
        vk = b.view(kc, (D, n_kv, Hkv, 1), (2, 2 * D * Hkv, 2 * D, 2 * D * Hkv * cfg.n_ctx))
        vv = b.view(vc, (D, n_kv, Hkv, 1), (2, 2 * D * Hkv, 2 * D, 2 * D * Hkv * cfg.n_ctx))
        att = b.op(GGMLOp.FLASH_ATTN_EXT, F32, (D, H, T, 1), [vq, vk, vv, kq_mask, None],
                   (float(1 / np.sqrt(D)), 0.0, 0.0, 10, 0))
        att2 = b.view(att, (H * D, T, 1, 1), (4, 4 * H * D, 4 * H * D * T, 4 * H * D * T))
        r = b.op(GGMLOp.ADD, F32, (E, T), [b.op(GGMLOp.MUL_MAT, F32, (E, T), [W["o"], att2]), cur])
        h = b.op(GGMLOp.MUL, F32, (E, T), [b.op(GGMLOp.RMS_NORM, F32, (E, T), [r], (1e-6,)), n_ffn])
        g = b.op(GGMLOp.MUL_MAT, F32, (FF, T), [W["gate"], h])
        u = b.op(GGMLOp.MUL_MAT, F32, (FF, T), [W["up"], h])
        act = b.op(GGMLOp.GLU, F32, (FF, T), [g, u], (int(GluOp.SWIGLU), 0, 0.0, 0.0))
        cur = b.op(GGMLOp.ADD, F32, (E, T), [b.op(GGMLOp.MUL_MAT, F32, (E, T), [W["down"], act]), r])
    n_out = b.leaf(F32, (E,), ones(E))
    w_out = b.leaf(cfg.out_type, (E, cfg.n_vocab), fake_weights(cfg.out_type, cfg.n_vocab, E, rng), "output")
    weight_bytes += w_out.nbytes
    h = b.op(GGMLOp.MUL, F32, (E, T), [b.op(GGMLOp.RMS_NORM, F32, (E, T), [cur], (1e-6,)), n_out])
    logits = b.op(GGMLOp.MUL_MAT, F32, (cfg.n_vocab, T), [w_out, h])
    return b, {"embd": x, "weight_bytes": weight_bytes}, logits


def timed_runs(be, plan, n: int) -> float:
    """Seconds per run over n runs (after one warm-up that also captures the graph)."""
    plan.run()
    be.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        plan.run()
    be.synchronize()
    return (time.perf_counter() - t) / n


def bench_decode(be, cfg: Config, iters: int, rng) -> dict:
    b, info, logits = build_model(be, cfg, 1, rng)
    plan = be.prepare(b.nodes)
    t_nograph = None
    if hasattr(plan, "_no_graph"):  # launch-by-launch first, then through the captured graph
        plan._no_graph = True
        t_nograph = timed_runs(be, plan, max(1, iters // 4))
        plan._no_graph = not be.graphs
    t_graph = timed_runs(be, plan, iters)
    out = np.frombuffer(be.get(logits.buffer, logits.offset, logits.nbytes), dtype=np.float32)
    res = {"decode_ms": t_graph * 1e3, "decode_tok_s": 1.0 / t_graph, "weight_bytes": info["weight_bytes"],
           "weight_GBps": info["weight_bytes"] / t_graph / 1e9, "launches_per_token": len(plan.launches),
           "graph_captured": getattr(plan, "_graph", None) is not None,
           "logits_finite": bool(np.isfinite(out).all())}
    if t_nograph is not None:
        res.update(decode_ms_nograph=t_nograph * 1e3, decode_tok_s_nograph=1.0 / t_nograph)
    for buf in b.bufs:
        be.free_buffer(buf)
    return res


def bench_prefill(be, cfg: Config, n_tokens: int, iters: int, rng) -> dict:
    b, _, logits = build_model(be, cfg, n_tokens, rng)
    plan = be.prepare(b.nodes)
    t = timed_runs(be, plan, iters)
    for buf in b.bufs:
        be.free_buffer(buf)
    return {"prefill_tokens": n_tokens, "prefill_ms": t * 1e3, "prefill_tok_s": n_tokens / t}


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--emu", action="store_true", help="run on the CPU kernel emulator (smoke test)")
    ap.add_argument("--warp", type=int, default=32, help="emulator warp width")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer toy configuration")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--prefill", type=int, default=256, help="prefill tokens (0: skip)")
    ap.add_argument("--copy-mib", type=int, default=1024)
    ap.add_argument("--json", type=Path, help="also write the result here")
    args = ap.parse_args()
    cfg = TINY if args.tiny else Config()
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    be = make_backend(args.emu, args.warp)
    res: dict = {"device": be.name, "config": {k: int(v) for k, v in asdict(cfg).items()}}
    res.update(bench_decode(be, cfg, args.iters, rng))
    if args.prefill:
        res.update(bench_prefill(be, cfg, args.prefill, max(1, args.iters // 10), rng))
    res.update(bench_copies(be, args.copy_mib << 20, max(2, args.iters // 5)))
    res["wall_s"] = time.perf_counter() - t0
    text = json.dumps(res, indent=1, sort_keys=True)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
