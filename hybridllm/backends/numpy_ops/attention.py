"""SOFT_MAX and FLASH_ATTN_EXT (ggml-rpc.md §12.14, §12.15), vectorized over heads, queries and sequences.

FLASH_ATTN_EXT computes the exact softmax attention in float32: the queries sharing a K/V head form one
matrix, so each kv head costs two BLAS matmuls (GQA and sequence broadcast never copy K/V), and only the
KV range the mask leaves visible is read. Where ggml's kernel rounds Q to K's vec_dot type (F16 for an
F16 cache: its row-by-row path, used below 64 queries) we round Q the same way.

ggml's row path also keeps the running V accumulator in F16 for an F16 V, which costs it ~1e-3 relative
accuracy (more for long caches). Setting `GGML_F16_ACCUMULATOR` (module attribute, or the environment
variable HYBRIDLLM_FA_F16_ACC=1 at import) makes F16 K/V rows follow that path step by step instead
(a numba kernel below), reproducing ggml's results bit for bit: useful to compare logits with a reference
server, slower and less accurate otherwise. `GGML_THREADS` is the thread count whose KV chunking the
single-query decode path reproduces.
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
from .elementwise import f16_table, f16_to_f32, njit_in_place

F32 = np.float32
F64 = np.float64
FA_TILE_Q = 64   # ggml's GGML_FA_TILE_Q: from this many queries on, its kernel keeps Q in F32
FA_SPLIT_KV = 512  # ggml splits a single query's KV range across threads from this many entries on
FA_SCORES_BYTES = 32 << 20   # bound on the score matrix of one query block (long prompts)
GGML_F16_ACCUMULATOR = os.environ.get("HYBRIDLLM_FA_F16_ACC", "") == "1"
GGML_THREADS = 1


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
        sink_v = view(sinks)[0, 0, 0, :ne02]

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
    if GGML_F16_ACCUMULATOR and not tiled and k.type == v.type == GGMLType.F16:
        return f16_accumulator_kernel(node, q, k, v, mask, sinks)
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


# --- ggml's F16-accumulator row path, step by step (opt-in) ---------------------------------------------

def _round_f16(buf: np.ndarray) -> None:  # numba
    """Round float32 values in place to the nearest F16 (ties to even), as _mm256_cvtps_ph does."""
    u = buf.view(np.uint32)
    for d in range(u.size):
        x = u[d]
        sign = x & np.uint32(0x80000000)
        a = x & np.uint32(0x7FFFFFFF)
        if a > np.uint32(0x7F800000):
            continue
        if a >= np.uint32(0x477FF000):
            u[d] = sign | np.uint32(0x7F800000)
        elif a >= np.uint32(0x38800000):
            u[d] = sign | ((a + np.uint32(0xFFF) + ((a >> np.uint32(13)) & np.uint32(1))) & np.uint32(0xFFFFE000))
        else:                                  # F16 subnormal range: multiples of 2^-24
            q = abs(np.float64(buf[d])) * 16777216.0
            f = math.floor(q)
            r = q - f
            if r > 0.5 or (r == 0.5 and f % 2.0 == 1.0):
                f += 1.0
            v = np.float32(f / 16777216.0)
            buf[d] = -v if sign else v

def _dot_f16(k: np.ndarray, q: np.ndarray, lut: np.ndarray, acc: np.ndarray) -> np.float32:  # numba
    """ggml_vec_dot_f16 on AVX2: 4x8 float lanes, its reduction order, double leftovers."""
    n = q.size
    n32 = n & ~31
    acc[:, :] = 0
    for i in range(0, n32, 32):
        for j in range(4):
            for lane in range(8):
                t = i + 8 * j + lane
                acc[j, lane] = acc[j, lane] + lut[k[t]] * q[t]   # exact product: FMA == mul + add
    for lane in range(8):
        acc[0, lane] = (acc[0, lane] + acc[2, lane]) + (acc[1, lane] + acc[3, lane])
    t0 = acc[0, 0] + acc[0, 4]
    t1 = acc[0, 1] + acc[0, 5]
    t2 = acc[0, 2] + acc[0, 6]
    t3 = acc[0, 3] + acc[0, 7]
    total = np.float64((t0 + t1) + (t2 + t3))
    for t in range(n32, n):
        total += np.float64(lut[k[t]] * q[t])
    return np.float32(total)

def _fa_f16_chunk(qrow, krows, vrows, lut, mrow, slope, scale, softcap, lo, hi, vkq, tmp, acc):  # numba
    """ggml's one_chunk loop over KV entries lo..hi of one query row; returns (max, sum), leaves the F16
    accumulator in vkq."""
    m_run, s_run = np.float32(-np.inf), np.float32(0)
    vkq[:] = 0
    for ic in range(lo, hi):
        mv = np.float32(0)
        if mrow.size:
            mv = slope * mrow[ic]
            if mv == -np.inf:
                continue
        sc = _dot_f16(krows[ic], qrow, lut, acc) * scale
        if softcap != 0:
            sc = softcap * np.float32(math.tanh(sc))
        sc = sc + mv
        ms, vs = np.float32(1), np.float32(1)
        if sc > m_run:
            ms = np.float32(math.exp(m_run - sc))
            m_run = sc
            for d in range(vkq.size):
                vkq[d] = vkq[d] * ms
            _round_f16(vkq)
        else:
            vs = np.float32(math.exp(sc - m_run))
        vrow = vrows[ic]
        for d in range(vkq.size):
            tmp[d] = np.float32(np.float64(lut[vrow[d]]) * vs + vkq[d])
        _round_f16(tmp)
        vkq[:] = tmp
        s_run = np.float32(np.float64(s_run) * ms + vs)
    return m_run, s_run


def _fa_add_sink(sink, m_run, s_run, vkq):  # numba
    ms, vs = np.float32(1), np.float32(1)
    if sink > m_run:
        ms = np.float32(math.exp(m_run - sink))
        m_run = sink
        for d in range(vkq.size):
            vkq[d] = vkq[d] * ms
    else:
        vs = np.float32(math.exp(sink - m_run))
    return m_run, np.float32(np.float64(s_run) * ms + vs)


def _fa_f16_rows(q, kb, vb, lut, mask, slopes, sinks, scale, softcap, chunk, out):  # numba
    """Every (seq, head, query) row: online softmax with the V accumulator rounded to F16 each step, the
    KV range cut into chunks of `chunk` entries merged as ggml's split-KV reduction does."""
    S, H, NQ, _ = q.shape
    n_kv, DV = kb.shape[2], vb.shape[3]
    m3, m2 = mask.shape[0], mask.shape[1]
    n_chunks = (n_kv + chunk - 1) // chunk
    acc = np.zeros((4, 8), np.float32)
    vkq, tmp, fin = np.zeros(DV, np.float32), np.zeros(DV, np.float32), np.zeros(DV, np.float32)
    no_mask = np.zeros(0, np.float32)
    for s in range(S):
        for h in range(H):
            krows = kb[s // (S // kb.shape[0]), h // (H // kb.shape[1])]
            vrows = vb[s // (S // vb.shape[0]), h // (H // vb.shape[1])]
            for iq in range(NQ):
                mrow = mask[s % m3, h % m2, iq] if m3 > 0 else no_mask
                m_fin, s_fin = np.float32(-np.inf), np.float32(0)
                fin[:] = 0
                for c in range(n_chunks):
                    m_run, s_run = _fa_f16_chunk(q[s, h, iq], krows, vrows, lut, mrow, slopes[h], scale, softcap,
                                                 c * chunk, min(n_kv, (c + 1) * chunk), vkq, tmp, acc)
                    if sinks.size and c == 0:
                        m_run, s_run = _fa_add_sink(sinks[h], m_run, s_run, vkq)
                    if n_chunks == 1:
                        inv = np.float32(0) if s_run == 0 else np.float32(1) / s_run
                        for d in range(DV):
                            out[s, h, iq, d] = vkq[d] * inv
                    elif s_run != 0:          # ggml_flash_attn_ext_reduce_partials
                        m_new = max(m_fin, m_run)
                        so, sn = np.float32(math.exp(m_fin - m_new)), np.float32(math.exp(m_run - m_new))
                        for d in range(DV):
                            fin[d] = np.float32(np.float64(fin[d]) * so + np.float32(vkq[d] * sn))
                        s_fin = np.float32(np.float64(s_fin) * so + np.float32(s_run * sn))
                        m_fin = m_new
                if n_chunks > 1:
                    inv = np.float32(1) / s_fin if s_fin != 0 else np.float32(1)
                    for d in range(DV):
                        out[s, h, iq, d] = fin[d] * inv


@functools.cache
def _f16_kernels() -> tuple[Callable[..., None], np.ndarray]:
    """The numba kernel that replays ggml's flash-attention row path for F16 K/V (compiled once)."""
    njit_in_place(globals(), "_round_f16", "_dot_f16", "_fa_f16_chunk", "_fa_add_sink", "_fa_f16_rows")
    return globals()["_fa_f16_rows"], f16_table()


def f16_accumulator_kernel(node: Tensor, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None,
                           sinks: Tensor | None) -> Kernel:
    """FLASH_ATTN_EXT for F16 K/V on ggml's row path, replayed exactly (see the module docstring)."""
    rows, lut = _f16_kernels()
    _, n_q, H, S = q.ne
    n_kv = k.ne[1]
    scale, max_bias, softcap = F32(node.param_f32(0)), float(node.param_f32(1)), F32(node.param_f32(2))
    if softcap != 0:
        scale = F32(scale / softcap)
    qv, out = view(q), view(node).transpose(0, 2, 1, 3)
    kb, vb = view(k).view(np.uint16), view(v).view(np.uint16)
    slopes = alibi_slopes(H, max_bias)
    read_mask = mask_reader(mask, n_q) if mask is not None else (lambda: np.zeros((0, 0, 0, 0), F32))
    sink_v = view(sinks)[0, 0, 0, :H] if sinks is not None else np.zeros(0, F32)
    split = n_q == 1 and S == 1 and n_kv >= FA_SPLIT_KV
    chunk = -(-n_kv // max(1, GGML_THREADS)) if split else max(n_kv, 1)

    def kernel() -> None:
        q16 = qv.astype(np.float16).astype(F32)
        rows(q16, kb, vb, lut, read_mask(), slopes, sink_v, scale, softcap, chunk, out)
    return kernel
