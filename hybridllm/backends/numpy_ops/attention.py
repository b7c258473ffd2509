"""SOFT_MAX and FLASH_ATTN_EXT (ggml-rpc.md §12.14, §12.15), with ggml's CPU numerics.

SOFT_MAX replays ggml's row loop bit for bit (ggml_math: its AVX2 expf, 8-lane partial sums in double).

FLASH_ATTN_EXT by default replays ggml's own kernels bit for bit (fa_replay.py): the row kernel for F16
K/V and < 64 queries, whose running V accumulator is F16 (every decode step, short prompts: ~1e-3 off
the exact result, which is what llama.cpp computes), and the tiled kernel for >= 64 queries over F32/F16
K/V. This is the default because the worker's contract is llama.cpp's numbers and quantized matmuls
amplify any difference (see ggml_math). `GGML_F16_ACCUMULATOR = False` (or HYBRIDLLM_FA_F16_ACC=0 at
import) selects exact softmax attention in float32 instead, which also serves the other K/V types: the
queries sharing a K/V head form one matrix (two BLAS matmuls per kv head, GQA and sequence broadcast
never copy K/V), only the KV range the mask leaves visible is read, and Q is rounded to K's vec_dot type
where ggml's row kernel does that.

A single decode query over >= 512 KV entries is split by ggml over its threads and merged; the replay
merges the same chunks for `ggml_threads()` threads (GGML_THREADS, else $HYBRIDLLM_GGML_THREADS, else
$OMP_NUM_THREADS, which `hybridllm worker --threads N` sets, else 1): a worker reproduces an rpc-server
running as many threads as it does.
"""
from __future__ import annotations

import functools
import math
import os
from typing import Callable

import numpy as np
from numpy.lib.stride_tricks import as_strided

from ...ggml.tensor import Tensor
from ...ggml.types import GGMLOp, GGMLType, type_name
from . import Kernel, register
from .common import bf16_to_f32, f32_to_bf16, require, rows_view, view
from .elementwise import f16_to_f32

F32 = np.float32
F64 = np.float64
FA_TILE_Q = 64   # ggml's GGML_FA_TILE_Q: from this many queries on, its kernel keeps Q in F32
FA_SPLIT_KV = 512  # ggml splits a single query's KV range across threads from this many entries on
FA_SCORES_BYTES = 32 << 20   # bound on the score matrix of one query block (long prompts)
GGML_F16_ACCUMULATOR = os.environ.get("HYBRIDLLM_FA_F16_ACC", "1") != "0"
GGML_THREADS: int | None = None


def ggml_threads() -> int:
    """The thread count whose split-KV chunking single-query attention reproduces (module docstring)."""
    if GGML_THREADS is not None:
        return max(1, GGML_THREADS)
    for var in ("HYBRIDLLM_GGML_THREADS", "OMP_NUM_THREADS"):
        text = os.environ.get(var, "")
        if text.isdigit() and int(text) > 0:
            return int(text)
    return 1


def alibi_slopes(n_head: int, max_bias: float) -> np.ndarray:
    """Per-head ALiBi slope as ggml computes it in float (1 for every head when max_bias is 0)."""
    if max_bias <= 0:
        return np.ones(n_head, F32)
    n_log2 = 1 << math.floor(math.log2(n_head))
    m0 = F32(2.0 ** float(F32(-max_bias) / F32(n_log2)))
    m1 = F32(2.0 ** float(F32(-max_bias / 2.0) / F32(n_log2)))
    h = np.arange(n_head)
    return np.where(h < n_log2, np.power(F64(m0), h + 1), np.power(F64(m1), 2 * (h - n_log2) + 1)).astype(F32)


def mask_reader(mask: Tensor, rows: int) -> Callable[[], np.ndarray]:
    """The first `rows` mask rows as float32, shape (m3, m2, rows, n_kv)."""
    mv = view(mask)[:, :, :rows, :]
    if mask.type == GGMLType.F16:
        return lambda: f16_to_f32(mv)
    return lambda: mv


# --- SOFT_MAX ----------------------------------------------------------------------------------------

@register(GGMLOp.SOFT_MAX)
def build_soft_max(node: Tensor) -> Kernel:
    src, mask, sinks = node.src[0], node.src_at(1), node.src_at(2)
    require(src is not None, node, "needs a source")
    assert src is not None
    require(src.type == GGMLType.F32 and node.type == GGMLType.F32, node, "only f32 is supported")
    require(src.ne == node.ne, node, f"source shape {src.ne} differs from result shape {node.ne}")
    ne00, ne01, ne02, ne03 = src.ne
    scale, max_bias = F32(node.param_f32(0)), float(node.param_f32(1))
    x, y = view(src), view(node)
    if mask is not None:
        require(mask.type in (GGMLType.F16, GGMLType.F32), node, f"mask must be f16/f32, not {type_name(mask.type)}")
        require(mask.ne[0] == ne00 and mask.ne[1] >= ne01 and ne02 % mask.ne[2] == 0 and ne03 % mask.ne[3] == 0,
                node, f"mask {mask.ne} does not fit {src.ne}")
    sink_v = np.zeros(0, F32)
    if sinks is not None:
        require(sinks.type == GGMLType.F32 and sinks.nelements >= ne02, node, "sinks must be f32, one per head")
        sink_v = view(sinks)[0, 0, 0, :ne02]
    no_mask = np.zeros((0, 0, 0, 0), F32)
    read = mask_reader(mask, ne01) if mask is not None else (lambda: no_mask)
    rows = _soft_max_kernel()
    work = np.empty(ne00, F32)
    return lambda: rows(x, y, read(), alibi_slopes(ne02, max_bias), sink_v, scale, work)


# ggml_math's numba intrinsics and row kernels, bound (globals().update) before the kernels below compile
fma32 = soft_max_row = None


def _soft_max_rows(x, y, mask, slopes, sinks, scale, wp):  # numba
    """ggml's soft_max_f32 per row: w = x*scale (+ slope*mask), max, ggml_vec_soft_max_f32 (AVX2 expf in
    blocks of 8, per-block float sums added in double), sinks, then y *= (float)(1/sum)."""
    n3, n2, n1, n0 = x.shape
    for i3 in range(n3):
        for i2 in range(n2):
            slope = slopes[i2]
            for i1 in range(n1):
                for i in range(n0):
                    wp[i] = x[i3, i2, i1, i] * scale
                if mask.size:
                    mrow = mask[i3 % mask.shape[0], i2 % mask.shape[1], i1]
                    for i in range(n0):
                        wp[i] = fma32(slope, mrow[i], wp[i])   # ggml's build contracts wp += slope*m
                mx = np.float32(-np.inf)
                for i in range(n0):
                    mx = wp[i] if wp[i] > mx else mx
                if sinks.size:
                    mx = sinks[i2] if sinks[i2] > mx else mx
                dst = y[i3, i2, i1]
                total = soft_max_row(wp, dst, mx)
                if sinks.size:
                    total += np.float64(np.float32(math.exp(sinks[i2] - mx)))
                inv = np.float32(1.0 / total)
                for i in range(n0):
                    dst[i] = dst[i] * inv


@functools.cache
def _soft_max_kernel() -> Callable[..., None]:
    from . import ggml_math
    fns = ggml_math.compiled()
    globals().update(soft_max_row=fns["soft_max_row"], fma32=ggml_math.fma32)
    return ggml_math.jit(_soft_max_rows)


def _bcast(small: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """`small` broadcastable to `shape` with ggml's modulo rule (tiled only where 1 < dim < target)."""
    reps = [n // m if m not in (1, n) else 1 for n, m in zip(shape, small.shape)]
    return np.tile(small, reps) if any(r > 1 for r in reps) else small


# --- FLASH_ATTN_EXT ------------------------------------------------------------------------------------

def _kv_reader(t: Tensor) -> Callable[[slice], np.ndarray]:
    """K or V rows `sl` (an n_kv range) as float32 (S, H, n, D); quantized rows are dequantized."""
    if t.is_quantized:
        from ...quants import dequantize
        raw, qtype, n = rows_view(t), t.type, t.ne[0]
        return lambda sl: dequantize(raw[:, :, sl], qtype, n)
    v = view(t)
    if t.type == GGMLType.F32:
        return lambda sl: v[:, :, sl]
    if t.type == GGMLType.F16:
        return lambda sl: f16_to_f32(v[:, :, sl])
    if t.type == GGMLType.BF16:
        return lambda sl: bf16_to_f32(v[:, :, sl])
    raise ValueError(type_name(t.type))


def _q_rounder(k: Tensor, tiled: bool) -> Callable[[np.ndarray], np.ndarray]:
    """Q as ggml feeds it to the K·Q dot product: converted to K's vec_dot type off the tiled path."""
    if tiled or k.type == GGMLType.F32:
        return lambda q: q
    if k.type == GGMLType.F16:
        return lambda q: q.astype(np.float16).astype(F32)
    if k.type == GGMLType.BF16:
        return lambda q: bf16_to_f32(f32_to_bf16(q))
    from ...quants import dequantize, quantize, vec_dot_type
    vt = vec_dot_type(k.type)
    n = k.ne[0]
    return lambda q: dequantize(quantize(np.ascontiguousarray(q), vt), vt, n)


def _split_heads(a: np.ndarray, sx: int, hx: int) -> np.ndarray:
    """(S, H, n, d) -> (Sx, S/Sx, Hx, H/Hx, n, d) as a view: head h = kv_head*(H/Hx) + j (ggml's GQA rule),
    sequence s = kv_seq*(S/Sx) + j."""
    s, h, n, d = a.shape
    st = a.strides
    return as_strided(a, (sx, s // sx, hx, h // hx, n, d),
                      (st[0] * (s // sx), st[0], st[1] * (h // hx), st[1], st[2], st[3]))


def _per_head(x: np.ndarray, hx: int) -> np.ndarray:
    """A per-head vector (H,) laid out as (1, 1, Hx, 1, H/Hx, 1) for the (.., n_kv, r2, n_q) score layout."""
    return x.reshape(1, 1, hx, 1, x.size // hx, 1)


def _fa_operands(node: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
    """FLASH_ATTN_EXT's (q, k, v, mask, sinks), checked."""
    q, k, v, mask, sinks = (node.src_at(i) for i in range(5))
    require(q is not None and k is not None and v is not None, node, "needs q, k and v")
    assert q is not None and k is not None and v is not None
    D, n_q, H, S = q.ne
    Dv, n_kv = v.ne[0], k.ne[1]
    require(q.type == GGMLType.F32 and node.type == GGMLType.F32, node, "q and the result must be f32")
    require(k.ne[0] == D and v.ne[1] == n_kv, node, f"shapes q {q.ne}, k {k.ne}, v {v.ne} do not match")
    require(k.ne[2:] == v.ne[2:], node, f"k {k.ne} and v {v.ne} need the same heads and sequences")
    require(k.ne[2] > 0 and k.ne[3] > 0 and H % k.ne[2] == 0 and S % k.ne[3] == 0, node,
            "q heads/sequences are not a multiple of k/v's")
    require(node.ne == (Dv, H, n_q, S), node, f"result shape {node.ne} should be {(Dv, H, n_q, S)}")
    for t in (k, v):
        require(t.type in (GGMLType.F32, GGMLType.F16, GGMLType.BF16) or t.is_quantized, node,
                f"{type_name(t.type)} k/v is not supported")
    if mask is not None:
        require(mask.type == GGMLType.F16 and mask.ne[0] == n_kv and mask.ne[1] >= n_q and H % mask.ne[2] == 0
                and S % mask.ne[3] == 0, node, f"mask {mask.ne} ({type_name(mask.type)}) does not fit")
    if sinks is not None:
        require(sinks.type == GGMLType.F32 and sinks.nelements >= H, node, "sinks must be f32, one per head")
    return q, k, v, mask, sinks


@register(GGMLOp.FLASH_ATTN_EXT)
def build_flash_attn_ext(node: Tensor) -> Kernel:
    q, k, v, mask, sinks = _fa_operands(node)
    _, n_q, H, S = q.ne
    n_kv, hk, sk = k.ne[1], k.ne[2], k.ne[3]
    tiled = (k.type == v.type and k.type in (GGMLType.F32, GGMLType.F16) and n_q >= FA_TILE_Q)
    if GGML_F16_ACCUMULATOR and (tiled or k.type == v.type == GGMLType.F16):
        from .fa_replay import row_kernel, tiled_kernel
        return (tiled_kernel if tiled else row_kernel)(node, q, k, v, mask, sinks)
    read_q, round_q = view(q), _q_rounder(k, tiled)
    read_mask = mask_reader(mask, n_q) if mask is not None else None
    attend = _attend(node, H, S, hk, sk, _kv_reader(k), _kv_reader(v), sinks)
    # queries go in blocks so that the float32 scores stay below FA_SCORES_BYTES
    block = max(1, FA_SCORES_BYTES // (4 * max(1, n_kv) * H * S))
    blocks = [(q0, min(n_q, q0 + block)) for q0 in range(0, n_q, block)]

    def kernel() -> None:
        qv = round_q(read_q)
        m = read_mask() if read_mask is not None else None
        for q0, q1 in blocks:
            if m is None:
                attend(qv[:, :, q0:q1], q0, slice(0, n_kv), None)
                continue
            mb = m[:, :, q0:q1]
            # only KV entries these queries can see: the padded tail (and a sliding window's head) are -inf
            live = np.flatnonzero((mb != -np.inf).any(axis=(0, 1, 2)))
            lo, hi = (int(live[0]), int(live[-1]) + 1) if live.size else (0, 0)
            attend(qv[:, :, q0:q1], q0, slice(lo, hi), mb[..., lo:hi])
    return kernel


def _attend(node: Tensor, H: int, S: int, hk: int, sk: int, read_k: Callable[[slice], np.ndarray],
            read_v: Callable[[slice], np.ndarray], sinks: Tensor | None
            ) -> Callable[[np.ndarray, int, slice, np.ndarray | None], None]:
    """softmax(scale * Q K^T + slope * mask) V over the KV range `sl` for queries q0.. (those of `qv`),
    written to their rows of the node (S, n_q, H, Dv)."""
    Dv = node.ne[0]
    r3, r2 = S // sk, H // hk
    scale, max_bias, softcap = F32(node.param_f32(0)), float(node.param_f32(1)), F32(node.param_f32(2))
    if softcap != 0:
        scale = F32(scale / softcap)
    slopes = _per_head(alibi_slopes(H, max_bias), hk)
    sink_v = _per_head(view(sinks)[0, 0, 0, :H], hk) if sinks is not None else None
    # (S, H, n_q, Dv) over dst (S, n_q, H, Dv), split by kv head: (sk, r3, hk, r2, n_q, Dv)
    out_all = _split_heads(view(node).transpose(0, 2, 1, 3), sk, hk)

    def attend(qv: np.ndarray, q0: int, sl: slice, mask: np.ndarray | None) -> None:
        n, n_q = sl.stop - sl.start, qv.shape[2]
        out = out_all[:, :, :, :, q0:q0 + n_q]
        if n == 0:                        # nothing visible: ggml's sums are 0 and so is the output
            out[...] = 0
            return
        # per kv head, K (n, D) @ Q^T (D, r2*n_q) is the fast BLAS shape: scores (sk, r3, hk, n, r2, n_q)
        qt = np.ascontiguousarray(_split_heads(qv, sk, hk).transpose(0, 1, 2, 5, 3, 4))
        sc = np.matmul(read_k(sl)[:, None], qt.reshape(sk, r3, hk, qv.shape[-1], r2 * n_q))
        s6 = sc.reshape(sk, r3, hk, n, r2, n_q)
        s6 *= scale
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            if softcap != 0:
                s6[...] = np.tanh(s6.astype(F64)).astype(F32) * softcap
            if mask is not None:
                m = _mask_layout(mask, (S, H, n_q, n), sk, hk)
                s6 += m * slopes if max_bias > 0 else m
            mx = s6.max(axis=3, keepdims=True)
            if sink_v is not None:
                mx = np.maximum(mx, sink_v)
            mx = np.where(mx == -np.inf, F32(0), mx)       # a fully masked row: no weights, output 0
            np.subtract(s6, mx, out=s6)
            np.exp(s6, out=s6)
            den = s6.sum(axis=3, keepdims=True, dtype=F64)
            if sink_v is not None:
                den += np.exp((sink_v - mx).astype(F64))
            inv = np.where(den == 0, 0.0, 1.0 / np.where(den == 0, 1.0, den)).astype(F32)
            res = np.matmul(read_v(sl)[:, None].swapaxes(-1, -2), sc)          # (sk, r3, hk, Dv, r2*n_q)
            res6 = res.reshape(sk, r3, hk, Dv, r2, n_q).transpose(0, 1, 2, 4, 5, 3)
            np.multiply(res6, inv.reshape(sk, r3, hk, r2, n_q, 1), out=out)
    return attend


def _mask_layout(mask: np.ndarray, shape: tuple[int, int, int, int], sk: int, hk: int) -> np.ndarray:
    """A float32 mask (m3, m2, n_q, n) in the score layout (sk, r3, hk, n, r2, n_q) (broadcastable)."""
    _, _, n_q, n = shape
    if mask.shape[0] == 1 and mask.shape[1] == 1:   # one mask for all heads and sequences: no copy
        return mask[0, 0].T.reshape(1, 1, 1, n, 1, n_q)
    full = np.broadcast_to(_bcast(mask, shape), shape)
    return _split_heads(full, sk, hk).transpose(0, 1, 2, 5, 3, 4)
