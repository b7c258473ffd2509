"""Synthetic llama.cpp graphs of real model shapes for the GPU benchmarks (bench_gpu.py, gpu_profile.py).

Each model has the tensor shapes of the real checkpoint and llama.cpp's quantization type mix for its file
type (llama-quant's rules: attn_v and ffn_down get Q6_K in the "more bits" layers of Q4_K_M/Q5_K_M, the output
is Q6_K, MoE routers stay F32), random weights with sane block scales, its own memory per layer (the weight
traffic per token is the real one), and the node order llama.cpp's graph has (qwen3 / qwen3moe): norm, Q
matmul, Q norm, rope, K matmul, K norm, rope, K cache store, V matmul, V store, flash attention, output
projection + residual, FFN (dense SwiGLU or the MoE router, experts and weighted sum) + residual.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from hybridllm.ggml.tensor import Tensor, pack_params
from hybridllm.ggml.types import GGMLOp, GGMLType, GluOp, RopeMode, TensorFlag, TRAITS

F32, F16, I32, I64 = GGMLType.F32, GGMLType.F16, GGMLType.I32, GGMLType.I64
Q4_K, Q5_K, Q6_K, Q8_0 = GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K, GGMLType.Q8_0


@dataclass
class Model:
    name: str
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    ftype: str                 # q8_0 | q4_k_m | q5_k_m | synthetic (the first bench's Q4_K/Q6_K mix)
    n_vocab: int = 151936
    n_expert: int = 0
    n_expert_used: int = 0
    tied: bool = False         # output matrix = token embeddings
    ref_tg: float = 0.0        # llama.cpp on an H100 (the numbers), tok/s
    ref_pp: float = 0.0

    def more_bits(self, il: int) -> bool:
        n = self.n_layer
        return il < n // 8 or il >= 7 * n // 8 or (il - n // 8) % 3 == 2

    def types(self, il: int) -> dict[str, int]:
        if self.ftype == "q8_0":
            return dict.fromkeys(("q", "k", "v", "o", "gate", "up", "down"), Q8_0)
        if self.ftype == "synthetic":
            return {**dict.fromkeys(("q", "k", "v", "o", "gate", "up"), Q4_K), "down": Q6_K}
        base = Q4_K if self.ftype == "q4_k_m" else Q5_K
        t = dict.fromkeys(("q", "k", "v", "o", "gate", "up", "down"), base)
        if self.more_bits(il):
            t["v"] = t["down"] = Q6_K
        return t

    @property
    def out_type(self) -> int:
        return Q8_0 if self.ftype == "q8_0" else Q6_K

    @property
    def embd_type(self) -> int:
        return {"q8_0": Q8_0, "q4_k_m": Q4_K, "q5_k_m": Q5_K}.get(self.ftype, Q4_K)


MODELS = {
    "qwen3-0.6b-q8_0": Model("qwen3-0.6b-q8_0", 1024, 28, 16, 8, 128, 3072, "q8_0", tied=True,
                             ref_tg=708.0, ref_pp=51519.0),
    "qwen3-8b-q4_k_m": Model("qwen3-8b-q4_k_m", 4096, 36, 32, 8, 128, 12288, "q4_k_m", ref_tg=233.8,
                             ref_pp=10156.0),
    "qwen3-30b-a3b-q5_k_m": Model("qwen3-30b-a3b-q5_k_m", 2048, 48, 32, 4, 128, 768, "q5_k_m", n_expert=128,
                                  n_expert_used=8, ref_tg=278.7, ref_pp=7103.0),
    # the shape of the first H100 run (2026-11-27): Qwen3-0.6B with Q4_K attention/FFN, Q6_K down/output
    "synthetic-0.6b": Model("synthetic-0.6b", 1024, 28, 16, 8, 128, 3072, "synthetic"),
    "tiny": Model("tiny", 256, 2, 4, 2, 64, 512, "q4_k_m", n_vocab=1000),
    "tiny-moe": Model("tiny-moe", 256, 2, 4, 2, 64, 256, "q5_k_m", n_vocab=1000, n_expert=8, n_expert_used=2),
}

# offsets of the f16 scale fields of each block, patched after filling blocks with random bytes
_F16_FIELDS = {Q4_K: (0, 2), Q5_K: (0, 2), Q6_K: (208,), Q8_0: (0,), GGMLType.Q4_0: (0,)}


class Weights:
    """Fills tensors with random blocks: on the device through CuPy when there is one, else numpy."""

    def __init__(self, be: Any, seed: int = 0) -> None:
        self.be = be
        self.rng = np.random.default_rng(seed)
        try:
            import cupy

            self.cp = cupy if hasattr(be.rt, "stream") else None
        except ImportError:
            self.cp = None
        self.seed = seed

    def fill(self, t: Tensor) -> None:
        tr = TRAITS[t.type]
        nblk = t.nbytes // tr.type_size
        if t.type == F32:
            data = (self.rng.standard_normal(t.nelements) * 0.05).astype(np.float32).view(np.uint8)
            self.be.set(t.buffer, t.offset, data.data)
            return
        d = np.frombuffer(np.float16(1e-3 / 8).tobytes(), np.uint8)
        if self.cp is not None:
            self._fill_device(t, nblk, tr.type_size, d)
            return
        raw = self.rng.integers(0, 256, (nblk, tr.type_size), dtype=np.uint8)
        for off in _F16_FIELDS[t.type]:
            raw[:, off:off + 2] = d
        self.be.set(t.buffer, t.offset, raw.reshape(-1).data)


    def _fill_device(self, t: Tensor, nblk: int, bs: int, d: np.ndarray) -> None:
        """Hash bytes (a 32-bit mix of the byte index) written in chunks, then the f16 scales."""
        cp = self.cp
        self.seed += 1
        with self.be.rt.device:
            flat = t.buffer.array[t.offset:t.offset + t.nbytes]
            step = 1 << 26
            for lo in range(0, t.nbytes, step):
                salt = cp.uint32(self.seed * 0x9E3779B9 & 0xFFFFFFFF)
                h = cp.arange(lo, min(lo + step, t.nbytes), dtype=cp.uint32) + salt
                h *= cp.uint32(0x85EBCA6B)
                h ^= h >> cp.uint32(13)
                h *= cp.uint32(0xC2B2AE35)
                h ^= h >> cp.uint32(16)
                flat[lo:lo + h.size] = h.astype(cp.uint8)
            arr = flat.reshape(nblk, bs)
            for off in _F16_FIELDS[t.type]:
                arr[:, off:off + 2] = cp.asarray(d)
            cp.cuda.runtime.deviceSynchronize()
            cp.get_default_memory_pool().free_all_blocks()


class Builder:
    """Tensors in backend buffers and the node list, in execution order. With `planned`, computed nodes get
    no buffer of their own: `finish()` places them in one compute buffer whose memory is reused once a
    tensor's last reader has run (hybridllm.engine.alloc, like the engine), so peak memory is the engine's."""

    def __init__(self, be: Any, planned: bool = False) -> None:
        self.be = be
        self.nodes: list[Tensor] = []
        self.bufs: list = []
        self.planned = planned
        self.compute: Any = None

    def finish(self) -> None:
        if self.planned and self.compute is None:
            from hybridllm.engine.alloc import ComputeBuffer

            self.compute = ComputeBuffer(self.be, nodes=self.nodes)

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

    def op(self, op: GGMLOp, type: int, ne, src, params=(), into: Tensor | None = None, name: str = "") -> Tensor:
        p = params if isinstance(params, bytes) else pack_params(*params)
        t = Tensor(type, ne, into.nb if into is not None else None, op=op, op_params=p, flags=TensorFlag.COMPUTE,
                   src=list(src), name=name or f"{op.name.lower()}-{len(self.nodes)}")
        if into is not None:
            t.buffer, t.offset, t.view_src = into.buffer, into.offset, into
        elif not self.planned:
            self.alloc(t)
        self.nodes.append(t)
        return t

    def view(self, base: Tensor, ne, nb, offset: int = 0, op: GGMLOp = GGMLOp.VIEW) -> Tensor:
        t = Tensor(base.type, ne, nb, op=op, src=[base], view_src=base, view_offs=offset)
        t.buffer, t.offset = base.buffer, base.offset + offset
        self.nodes.append(t)
        return t

    def free(self) -> None:
        for buf in self.bufs:
            self.be.free_buffer(buf)
        self.bufs = []
        if self.compute is not None:
            self.compute.free()
            self.compute = None


def _contig(ne: tuple[int, ...], es: int = 4) -> tuple[int, int, int, int]:
    ne4 = tuple(ne) + (1,) * (4 - len(ne))
    nb = [es]
    for n in ne4[:-1]:
        nb.append(nb[-1] * n)
    return tuple(nb)  # type: ignore[return-value]


class Weightset:
    """One model's weights on the device (built once, shared by the decode and prefill graphs)."""

    def __init__(self, be: Any, m: Model, seed: int = 0) -> None:
        self.b = Builder(be)
        w = Weights(be, seed)
        E, H, Hkv, D, FF = m.n_embd, m.n_head, m.n_head_kv, m.head_dim, m.n_ff
        self.layers: list[dict[str, Tensor]] = []
        self.bytes_per_token = 0
        ones = lambda n: (1.0 + 0.01 * w.rng.standard_normal(n)).astype(np.float32)  # noqa: E731
        for il in range(m.n_layer):
            t = m.types(il)
            shapes = {"q": (E, H * D), "k": (E, Hkv * D), "v": (E, Hkv * D), "o": (H * D, E)}
            L: dict[str, Tensor] = {}
            for k, ne in shapes.items():
                L[k] = self.b.leaf(t[k], ne, name=f"blk.{il}.attn_{k}")
            if m.n_expert:
                L["router"] = self.b.leaf(F32, (E, m.n_expert), name=f"blk.{il}.ffn_gate_inp")
                nx = m.n_expert
                for k, ne in (("gate", (E, FF, nx)), ("up", (E, FF, nx)), ("down", (FF, E, nx))):
                    L[k] = self.b.leaf(t[k], ne, name=f"blk.{il}.ffn_{k}_exps")
            else:
                for k, ne in (("gate", (E, FF)), ("up", (E, FF)), ("down", (FF, E))):
                    L[k] = self.b.leaf(t[k], ne, name=f"blk.{il}.ffn_{k}")
            for k, x in L.items():
                w.fill(x)
            for k, n in (("attn_norm", E), ("ffn_norm", E), ("q_norm", D), ("k_norm", D)):
                L[k] = self.b.leaf(F32, (n,), ones(n))
            per_tok = sum(L[k].nbytes for k in ("q", "k", "v", "o"))
            if m.n_expert:
                per_tok += L["router"].nbytes + sum(L[k].nbytes for k in ("gate", "up", "down")) \
                    * m.n_expert_used // m.n_expert
            else:
                per_tok += sum(L[k].nbytes for k in ("gate", "up", "down"))
            self.bytes_per_token += per_tok
            self.layers.append(L)
        self.output = self.b.leaf(m.out_type, (E, m.n_vocab), name="output")
        w.fill(self.output)
        self.embd = self.output if m.tied else self.b.leaf(m.embd_type, (E, m.n_vocab), name="token_embd")
        if not m.tied:
            w.fill(self.embd)
        self.out_norm = self.b.leaf(F32, (E,), ones(E))
        self.bytes_per_token += self.output.nbytes
        self.bytes_total = sum(buf.size for buf in self.b.bufs)

    def free(self) -> None:
        self.b.free()


def build_graph(be: Any, m: Model, ws: Weightset, n_tokens: int, n_past: int, n_ctx: int = 4096,
                planned: bool = False, kv: "list[tuple[Tensor, Tensor]] | None" = None):
    """(builder with the forward graph of n_tokens new tokens after n_past cached ones, logits tensor).
    Like llama.cpp's batch decode, logits come out for the last token only. `kv`: each layer's (K, V) cache
    tensors of n_ctx cells to use (default: new ones, owned by the builder); `planned`: see Builder."""
    b = Builder(be, planned)
    E, H, Hkv, D, T = m.n_embd, m.n_head, m.n_head_kv, m.head_dim, n_tokens
    n_kv = min(n_ctx, (n_past + T + 255) // 256 * 256)  # llama.cpp pads n_kv to 256
    rng = np.random.default_rng(1)
    tokens = b.leaf(I32, (T,), rng.integers(0, m.n_vocab, T).astype(np.int32), "inp_tokens")
    pos = b.leaf(I32, (T,), np.arange(n_past, n_past + T, dtype=np.int32), "inp_pos")
    kv_idx = b.leaf(I64, (T,), np.arange(n_past, n_past + T, dtype=np.int64), "kv_idxs")
    mask = np.zeros((T, n_kv), np.float16)
    for i in range(T):
        mask[i, n_past + i + 1:] = -np.inf
    kq_mask = b.leaf(F16, (n_kv, T), mask, "kq_mask")
    rope = pack_params(0, D, int(RopeMode.NEOX), 0, 40960, 1e6, 1.0, 0.0, 1.0, 32.0, 1.0, 0, 0, 0, 0, 0)
    cur = b.op(GGMLOp.GET_ROWS, F32, (E, T), [ws.embd, tokens], name="inp_embd")
    for il, L in enumerate(ws.layers):
        if kv is not None:
            kc, vc = kv[il]
        else:
            kc, vc = b.leaf(F16, (Hkv * D, n_ctx)), b.leaf(F16, (Hkv * D, n_ctx))
            for c in (kc, vc):
                be.clear(c.buffer, 0)
        h = b.op(GGMLOp.MUL, F32, (E, T), [b.op(GGMLOp.RMS_NORM, F32, (E, T), [cur], (1e-6,)), L["attn_norm"]])
        q = b.op(GGMLOp.MUL_MAT, F32, (H * D, T), [L["q"], h])
        q3 = b.view(q, (D, H, T, 1), _contig((D, H, T)), op=GGMLOp.RESHAPE)
        q3 = b.op(GGMLOp.MUL, F32, (D, H, T), [b.op(GGMLOp.RMS_NORM, F32, (D, H, T), [q3], (1e-6,)), L["q_norm"]])
        qr = b.op(GGMLOp.ROPE, F32, (D, H, T), [q3, pos], rope)
        k = b.op(GGMLOp.MUL_MAT, F32, (Hkv * D, T), [L["k"], h])
        k3 = b.view(k, (D, Hkv, T, 1), _contig((D, Hkv, T)), op=GGMLOp.RESHAPE)
        k3 = b.op(GGMLOp.MUL, F32, (D, Hkv, T),
                  [b.op(GGMLOp.RMS_NORM, F32, (D, Hkv, T), [k3], (1e-6,)), L["k_norm"]])
        kr = b.op(GGMLOp.ROPE, F32, (D, Hkv, T), [k3, pos], rope)
        kr2 = b.view(kr, (Hkv * D, T, 1, 1), _contig((Hkv * D, T)), op=GGMLOp.RESHAPE)
        b.op(GGMLOp.SET_ROWS, F16, (Hkv * D, n_ctx), [kr2, kv_idx, kc], into=kc)
        v = b.op(GGMLOp.MUL_MAT, F32, (Hkv * D, T), [L["v"], h])
        b.op(GGMLOp.SET_ROWS, F16, (Hkv * D, n_ctx), [v, kv_idx, vc], into=vc)
        vq = b.view(qr, (D, T, H, 1), (4, 4 * D * H, 4 * D, 4 * D * H * T), op=GGMLOp.PERMUTE)
        vk = b.view(kc, (D, n_kv, Hkv, 1), (2, 2 * D * Hkv, 2 * D, 2 * D * Hkv * n_ctx), op=GGMLOp.PERMUTE)
        vv = b.view(vc, (D, n_kv, Hkv, 1), (2, 2 * D * Hkv, 2 * D, 2 * D * Hkv * n_ctx), op=GGMLOp.PERMUTE)
        att = b.op(GGMLOp.FLASH_ATTN_EXT, F32, (D, H, T, 1), [vq, vk, vv, kq_mask, None],
                   (float(1 / np.sqrt(D)), 0.0, 0.0, 10, 0))
        att2 = b.view(att, (H * D, T, 1, 1), _contig((H * D, T)), op=GGMLOp.RESHAPE)
        ffn_inp = b.op(GGMLOp.ADD, F32, (E, T), [b.op(GGMLOp.MUL_MAT, F32, (E, T), [L["o"], att2]), cur])
        h = b.op(GGMLOp.MUL, F32, (E, T), [b.op(GGMLOp.RMS_NORM, F32, (E, T), [ffn_inp], (1e-6,)), L["ffn_norm"]])
        ffn = moe_ffn(b, m, L, h) if m.n_expert else dense_ffn(b, m, L, h)
        cur = b.op(GGMLOp.ADD, F32, (E, T), [ffn, ffn_inp])
    last = b.view(cur, (E, 1, 1, 1), _contig((E, 1)), offset=(T - 1) * cur.nb[1])
    h = b.op(GGMLOp.MUL, F32, (E, 1), [b.op(GGMLOp.RMS_NORM, F32, (E, 1), [last], (1e-6,)), ws.out_norm])
    logits = b.op(GGMLOp.MUL_MAT, F32, (m.n_vocab, 1), [ws.output, h], name="result_output")
    logits.flags |= TensorFlag.OUTPUT
    b.finish()
    return b, logits


def kv_cache(be: Any, m: Model, n_ctx: int) -> tuple[Builder, list[tuple[Tensor, Tensor]]]:
    """Each layer's F16 K and V cache of n_ctx cells, zeroed, as llama.cpp allocates them."""
    b = Builder(be)
    cells = []
    for _ in range(m.n_layer):
        kc, vc = b.leaf(F16, (m.n_head_kv * m.head_dim, n_ctx)), b.leaf(F16, (m.n_head_kv * m.head_dim, n_ctx))
        for c in (kc, vc):
            be.clear(c.buffer, 0)
        cells.append((kc, vc))
    return b, cells


def dense_ffn(b: Builder, m: Model, L: dict[str, Tensor], h: Tensor) -> Tensor:
    T, FF, E = h.ne[1], m.n_ff, m.n_embd
    up = b.op(GGMLOp.MUL_MAT, F32, (FF, T), [L["up"], h])
    gate = b.op(GGMLOp.MUL_MAT, F32, (FF, T), [L["gate"], h])
    act = b.op(GGMLOp.GLU, F32, (FF, T), [gate, up], (int(GluOp.SWIGLU), 0, 0.0, 0.0))
    return b.op(GGMLOp.MUL_MAT, F32, (E, T), [L["down"], act])


def moe_ffn(b: Builder, m: Model, L: dict[str, Tensor], cur: Tensor) -> Tensor:
    """llama.cpp's build_moe_ffn for qwen3moe: softmax gating, top-k by argsort, normalized weights."""
    T, FF, E, n_exp, n_used = cur.ne[1], m.n_ff, m.n_embd, m.n_expert, m.n_expert_used
    logits = b.op(GGMLOp.MUL_MAT, F32, (n_exp, T), [L["router"], cur])
    probs = b.op(GGMLOp.SOFT_MAX, F32, (n_exp, T), [logits], (1.0, 0.0))
    order = b.op(GGMLOp.ARGSORT, I32, (n_exp, T), [probs], (1,))
    topk = b.view(order, (n_used, T, 1, 1), (4, order.nb[1], order.nb[1] * T, order.nb[1] * T))
    probs3 = b.view(probs, (1, n_exp, T, 1), _contig((1, n_exp, T)), op=GGMLOp.RESHAPE)
    wts = b.op(GGMLOp.GET_ROWS, F32, (1, n_used, T), [probs3, topk])
    w2 = b.view(wts, (n_used, T, 1, 1), _contig((n_used, T)), op=GGMLOp.RESHAPE)
    wsum = b.op(GGMLOp.CLAMP, F32, (1, T), [b.op(GGMLOp.SUM_ROWS, F32, (1, T), [w2])], (6.103515625e-5, float("inf")))
    wn = b.op(GGMLOp.DIV, F32, (n_used, T), [w2, wsum])
    w3 = b.view(wn, (1, n_used, T, 1), _contig((1, n_used, T)), op=GGMLOp.RESHAPE)
    cur3 = b.view(cur, (E, 1, T, 1), _contig((E, 1, T)), op=GGMLOp.RESHAPE)
    up = b.op(GGMLOp.MUL_MAT_ID, F32, (FF, n_used, T), [L["up"], cur3, topk])
    gate = b.op(GGMLOp.MUL_MAT_ID, F32, (FF, n_used, T), [L["gate"], cur3, topk])
    par = b.op(GGMLOp.GLU, F32, (FF, n_used, T), [gate, up], (int(GluOp.SWIGLU), 0, 0.0, 0.0))
    ex = b.op(GGMLOp.MUL_MAT_ID, F32, (E, n_used, T), [L["down"], par, topk])
    ex = b.op(GGMLOp.MUL, F32, (E, n_used, T), [ex, w3])
    views = [b.view(ex, (E, T, 1, 1), (4, ex.nb[2], ex.nb[2] * T, ex.nb[2] * T), offset=e * ex.nb[1])
             for e in range(n_used)]
    acc = views[0]
    for e in range(1, n_used):
        acc = b.op(GGMLOp.ADD, F32, (E, T), [acc, views[e]])
    return acc
