"""SOFT_MAX and FLASH_ATTN_EXT (ggml-rpc.md §12.14, §12.15), vectorized over heads, queries and sequences.

FLASH_ATTN_EXT computes the exact softmax attention in float32 with all heads in two batched matmuls (GQA
and sequence broadcast are stride-0 views, never copies of K/V). Where ggml's kernel rounds Q to K's
vec_dot type (F16 for an F16 cache: its row-by-row path, used below 64 queries) we round Q the same way.
ggml additionally keeps the running V accumulator in F16 for an F16 V on that path, so results differ from
it by F16 rounding noise (~1e-3 relative); with F32 V, or 64+ queries (its tiled F32 path), they agree to
float32 rounding.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
from numpy.lib.stride_tricks import as_strided

from ...ggml.tensor import Tensor
from ...ggml.types import GGMLOp, GGMLType, type_name
from . import Kernel, register
from .common import bf16_to_f32, f32_to_bf16, require, rows_view, view

F32 = np.float32
F64 = np.float64
FA_TILE_Q = 64   # ggml's GGML_FA_TILE_Q: from this many queries on, its kernel keeps Q in F32


def alibi_slopes(n_head: int, max_bias: float) -> np.ndarray:
    """Per-head ALiBi slope as ggml computes it in float (1 for every head when max_bias is 0)."""
    if max_bias <= 0:
        return np.ones(n_head, F32)
    n_log2 = 1 << int(math.floor(math.log2(n_head)))
    m0 = F32(2.0 ** float(F32(-max_bias) / F32(n_log2)))
    m1 = F32(2.0 ** float(F32(-max_bias / 2.0) / F32(n_log2)))
    h = np.arange(n_head)
    return np.where(h < n_log2, np.power(F64(m0), h + 1), np.power(F64(m1), 2 * (h - n_log2) + 1)).astype(F32)


def mask_reader(mask: Tensor, rows: int) -> Callable[[], np.ndarray]:
    """The first `rows` mask rows as float32, shape (m3, m2, rows, n_kv)."""
    mv = view(mask)[:, :, :rows, :]
    if mask.type == GGMLType.F16:
        return lambda: mv.astype(F32)
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
    slopes = alibi_slopes(ne02, max_bias)[None, :, None, None]
    x, y = view(src), view(node)
    add_mask: Callable[[np.ndarray], np.ndarray] = lambda w: w
    if mask is not None:
        require(mask.type in (GGMLType.F16, GGMLType.F32), node, f"mask must be f16/f32, not {type_name(mask.type)}")
        require(mask.ne[0] == ne00 and mask.ne[1] >= ne01 and ne02 % mask.ne[2] == 0 and ne03 % mask.ne[3] == 0,
                node, f"mask {mask.ne} does not fit {src.ne}")
        read_mask = mask_reader(mask, ne01)
        bshape = (ne03, ne02, ne01, ne00)
        if max_bias > 0:
            add_mask = lambda w: (w + _bcast(read_mask(), bshape) * slopes).astype(F32, copy=False)
        else:
            add_mask = lambda w: w + _bcast(read_mask(), bshape)
    sink_v = None
    if sinks is not None:
        require(sinks.type == GGMLType.F32 and sinks.nelements >= ne02, node, "sinks must be f32, one per head")
        sink_v = view(sinks).reshape(-1)[:ne02]

    def kernel() -> None:
        with np.errstate(invalid="ignore", over="ignore"):
            w = add_mask(x * scale)
            m = w.max(axis=-1, keepdims=True)
            if sink_v is not None:
                m = np.maximum(m, sink_v[None, :, None, None])
            e = np.exp(w - m)
            s = e.sum(axis=-1, keepdims=True, dtype=F64)
            if sink_v is not None:
                s += np.exp((sink_v[None, :, None, None] - m).astype(F64)).astype(F32)
            np.multiply(e, (1.0 / s).astype(F32), out=y)
    return kernel


def _bcast(small: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """`small` broadcastable to `shape` with ggml's modulo rule (tiled only where 1 < dim < target)."""
    reps = [n // m if m not in (1, n) else 1 for n, m in zip(shape, small.shape)]
    return np.tile(small, reps) if any(r > 1 for r in reps) else small


# --- FLASH_ATTN_EXT ------------------------------------------------------------------------------------

def _kv_reader(t: Tensor) -> Callable[[], np.ndarray]:
    """K or V as float32 (S, H, n_kv, D); quantized rows are dequantized."""
    if t.is_quantized:
        from ...quants import dequantize
        raw, qtype, n = rows_view(t), t.type, t.ne[0]
        return lambda: dequantize(raw, qtype, n)
    v = view(t)
    if t.type == GGMLType.F32:
        return lambda: v
    if t.type == GGMLType.F16:
        return lambda: v.astype(F32)
    if t.type == GGMLType.BF16:
        return lambda: bf16_to_f32(v)
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


def _grouped(a: np.ndarray, s: int, h: int) -> np.ndarray:
    """(Sx, Hx, n, d) -> (Sx, s/Sx, Hx, h/Hx, n, d): ggml's GQA/sequence broadcast as stride-0 axes."""
    sx, hx, n, d = a.shape
    st = a.strides
    return as_strided(a, (sx, s // sx, hx, h // hx, n, d), (st[0], 0, st[1], 0, st[2], st[3]))


def _split(a: np.ndarray, sx: int, hx: int) -> np.ndarray:
    """(S, H, n, d) -> (Sx, S/Sx, Hx, H/Hx, n, d) as a view (head h = hx_index * (H/Hx) + j)."""
    s, h, n, d = a.shape
    st = a.strides
    return as_strided(a, (sx, s // sx, hx, h // hx, n, d), (st[0] * (s // sx), st[0], st[1] * (h // hx), st[1],
                                                             st[2], st[3]))


@register(GGMLOp.FLASH_ATTN_EXT)
def build_flash_attn_ext(node: Tensor) -> Kernel:
    q, k, v, mask, sinks = (node.src_at(i) for i in range(5))
    require(q is not None and k is not None and v is not None, node, "needs q, k and v")
    assert q is not None and k is not None and v is not None
    D, n_q, H, S = q.ne
    Dv, n_kv = v.ne[0], k.ne[1]
    require(q.type == GGMLType.F32 and node.type == GGMLType.F32, node, "q and the result must be f32")
    require(k.ne[0] == D and v.ne[1] == n_kv, node, f"shapes q {q.ne}, k {k.ne}, v {v.ne} do not match")
    require(H % k.ne[2] == 0 and H % v.ne[2] == 0 and S % k.ne[3] == 0 and S % v.ne[3] == 0, node,
            "q heads/sequences are not a multiple of k/v's")
    require(node.ne == (Dv, H, n_q, S), node, f"result shape {node.ne} should be {(Dv, H, n_q, S)}")
    for t in (k, v):
        require(t.type in (GGMLType.F32, GGMLType.F16, GGMLType.BF16) or t.is_quantized, node,
                f"{type_name(t.type)} k/v is not supported")
    scale, max_bias, softcap = F32(node.param_f32(0)), float(node.param_f32(1)), F32(node.param_f32(2))
    if softcap != 0:
        scale = F32(scale / softcap)
    tiled = (k.type == v.type and k.type in (GGMLType.F32, GGMLType.F16) and n_q >= FA_TILE_Q)
    read_q, round_q = view(q), _q_rounder(k, tiled)
    read_k, read_v = _kv_reader(k), _kv_reader(v)
    hk, sk, hv, sv = k.ne[2], k.ne[3], v.ne[2], v.ne[3]
    slopes = alibi_slopes(H, max_bias)[None, :, None, None]
    read_mask = None
    if mask is not None:
        require(mask.type == GGMLType.F16 and mask.ne[0] == n_kv and mask.ne[1] >= n_q and H % mask.ne[2] == 0
                and S % mask.ne[3] == 0, node, f"mask {mask.ne} ({type_name(mask.type)}) does not fit")
        read_mask = mask_reader(mask, n_q)
    sink_v = None
    if sinks is not None:
        require(sinks.type == GGMLType.F32 and sinks.nelements >= H, node, "sinks must be f32, one per head")
        sink_v = view(sinks).reshape(-1)[:H][None, :, None, None]
    out = view(node).transpose(0, 2, 1, 3)            # (S, H, n_q, Dv) over dst (S, n_q, H, Dv)

    def kernel() -> None:
        qv = round_q(read_q)
        kf = _grouped(read_k(), S, H).swapaxes(-1, -2)
        sc = np.matmul(_split(qv, sk, hk), kf).reshape(S, H, n_q, n_kv)
        sc *= scale
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            if softcap != 0:
                sc = np.tanh(sc.astype(F64)).astype(F32) * softcap
            if read_mask is not None:
                m = _bcast(read_mask(), (S, H, n_q, n_kv))
                sc += m * slopes if max_bias > 0 else m
            mx = sc.max(axis=-1, keepdims=True)
            if sink_v is not None:
                mx = np.maximum(mx, sink_v)
            mx = np.where(mx == -np.inf, F32(0), mx)       # a fully masked row: no weights, output 0
            np.subtract(sc, mx, out=sc)
            np.exp(sc, out=sc)
            den = sc.sum(axis=-1, keepdims=True, dtype=F64)
            if sink_v is not None:
                den += np.exp((sink_v - mx).astype(F64))
            res = np.matmul(_split(sc, sv, hv), _grouped(read_v(), S, H)).reshape(S, H, n_q, Dv)
            inv = np.where(den == 0, 0.0, 1.0 / np.where(den == 0, 1.0, den)).astype(F32)
            np.multiply(res, inv, out=out)
    return kernel
