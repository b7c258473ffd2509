"""ggml's CPU FLASH_ATTN_EXT kernels replayed bit for bit (numba), the default behind attention.py.

ggml picks one of two kernels (ops.cpp, ggml_compute_forward_flash_attn_ext_f16):
* the row kernel (< 64 queries, or K/V types other than equal F32/F16): Q is converted to K's vec_dot
  type (F16), each score is ggml_vec_dot_f16, softmax is online with glibc expf, and for an F16 V the
  running accumulator is F16 (ggml_vec_scale_f16 / ggml_vec_mad_f16, rounded at every step). A single
  query over >= 512 entries is split over the threads and merged (ggml_flash_attn_ext_reduce_partials).
  `row_kernel` (F16 K/V) replays it K/V head by K/V head, converting each K/V row once for all the query
  rows sharing it.
* the tiled kernel (>= 64 queries, K/V both F32 or both F16): tiles of 64 KV entries; each score is a
  sequential FMA chain over the head dimension in float32 (simd_gemm), the tile's softmax uses ggml's
  AVX2 expf (ggml_vec_soft_max_f32, sum added in double), the running max and sum are per tile, and V is
  accumulated in float32 by sequential FMAs over the tile's entries. `tiled_kernel` replays it; the row
  tiling of the queries does not change any value, only the KV tiling does.
"""
from __future__ import annotations

import functools
import math
from typing import Callable

import numpy as np

from ...ggml.tensor import Tensor
from ...ggml.types import GGMLType
from . import Kernel
from .attention import FA_SPLIT_KV, alibi_slopes, ggml_threads, mask_reader
from .common import view
from .elementwise import f16_to_f32, njit_in_place

F32 = np.float32
FA_TILE_KV = 64   # GGML_FA_TILE_KV

# ggml_math's numba intrinsics and row kernels, bound by _bind_math() before the kernels below compile
fma32 = f16_round = f16_bits_f32 = soft_max_row = None


def _bind_math() -> None:
    from . import ggml_math
    globals().update(fma32=ggml_math.fma32, f16_round=ggml_math.f16_round, f16_bits_f32=ggml_math.f16_bits_f32,
                     soft_max_row=ggml_math.compiled()["soft_max_row"])


# --- the row kernel (F16 K/V) ---------------------------------------------------------------------------

def _dot_f16(kf, q, acc):  # numba
    """ggml_vec_dot_f16 on AVX2 (K row and F16-rounded Q as float32): 4 accumulators of 8 lanes over
    blocks of 32 (lane t of the 32 sums k[32b+t]*q[32b+t] in block order; products of two F16 values are
    exact in float32, so this equals ggml's FMAs), its lane reduction order, leftovers added in double."""
    n = q.size
    n32 = n - n % 32
    for t in range(32):
        acc[t] = kf[t] * q[t] if n32 else np.float32(0)
    for i in range(32, n32, 32):
        for t in range(32):
            acc[t] += kf[i + t] * q[i + t]
    for t in range(8):
        acc[t] = (acc[t] + acc[16 + t]) + (acc[8 + t] + acc[24 + t])
    total = np.float64(((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])))
    for t in range(n32, n):
        total += np.float64(kf[t] * q[t])
    return np.float32(total)


def _fa_f16_group(q, kb, vb, mask, slopes, sinks, scale, softcap, lo, hi, first, rows, M, S, vkq, kf, vf, acc):
    """ggml_compute_forward_flash_attn_ext_f16_one_chunk for the query rows `rows` ((s, h, iq) triples)
    sharing one K/V head, over KV entries lo..hi: online softmax with the V accumulator kept in F16
    (ggml_vec_scale_f16 / ggml_vec_mad_f16), sinks on the first chunk. Leaves (M, S, VKQ32) per row.
    Each K/V row is converted to float32 once for all the rows of the group."""
    R, DV = vkq.shape
    m3, m2 = mask.shape[0], mask.shape[1]
    for r in range(R):
        M[r], S[r] = -np.inf, 0
        vkq[r, :] = 0
    for ic in range(lo, hi):
        loaded = False
        for r in range(R):
            s, h, iq = rows[r, 0], rows[r, 1], rows[r, 2]
            mv = np.float32(0)
            if m3 > 0:
                mv = slopes[h] * mask[s % m3, h % m2, iq, ic]
                if mv == -np.inf:
                    continue
            if not loaded:
                for d in range(kf.size):
                    kf[d] = f16_bits_f32(kb[ic, d])
                for d in range(DV):
                    vf[d] = f16_bits_f32(vb[ic, d])
                loaded = True
            x = _dot_f16(kf, q[s, h, iq], acc) * scale
            if softcap != 0:
                x = softcap * np.float32(math.tanh(x))
            x = x + mv
            ms, vs = np.float32(1), np.float32(1)
            out = vkq[r]
            if x > M[r]:
                ms = np.float32(math.exp(M[r] - x))
                M[r] = x
                for d in range(DV):
                    out[d] = f16_round(out[d] * ms)
            else:
                vs = np.float32(math.exp(x - M[r]))
            for d in range(DV):
                out[d] = f16_round(fma32(vf[d], vs, out[d]))
            S[r] = fma32(S[r], ms, vs)
    if first and sinks.size:
        for r in range(R):
            sk = sinks[rows[r, 1]]
            ms, vs = np.float32(1), np.float32(1)
            if sk > M[r]:
                ms = np.float32(math.exp(M[r] - sk))
                M[r] = sk
                for d in range(DV):
                    vkq[r, d] = vkq[r, d] * ms
            else:
                vs = np.float32(math.exp(sk - M[r]))
            S[r] = fma32(S[r], ms, vs)


def _fa_f16_rows(q, kb, vb, mask, slopes, sinks, scale, softcap, chunk, lo_hi, out):  # numba
    """FLASH_ATTN_EXT for F16 K/V on ggml's row path, K/V head by K/V head; KV ranges of `chunk` entries
    are merged as ggml_flash_attn_ext_reduce_partials does (its split-KV decode path)."""
    S_, H, NQ, D = q.shape
    sk, hk, n_kv, DV = vb.shape[0], vb.shape[1], vb.shape[2], vb.shape[3]
    r3, r2 = S_ // sk, H // hk
    R = r3 * r2 * NQ
    rows = np.empty((R, 3), np.int64)
    M, Sm = np.empty(R, np.float32), np.empty(R, np.float32)
    vkq, fin = np.empty((R, DV), np.float32), np.zeros((R, DV), np.float32)
    mfin, sfin = np.empty(R, np.float32), np.empty(R, np.float32)
    kf, vf, acc = np.empty(D, np.float32), np.empty(DV, np.float32), np.empty(32, np.float32)
    n_chunks = (n_kv + chunk - 1) // chunk
    for a in range(sk):
        for b in range(hk):
            r = 0
            for s in range(a * r3, (a + 1) * r3):
                for h in range(b * r2, (b + 1) * r2):
                    for iq in range(NQ):
                        rows[r, 0], rows[r, 1], rows[r, 2] = s, h, iq
                        r += 1
            mfin[:] = -np.inf
            sfin[:] = 0
            fin[:, :] = 0
            for c in range(n_chunks):
                lo, hi = max(c * chunk, lo_hi[0]), min(n_kv, (c + 1) * chunk, lo_hi[1])
                _fa_f16_group(q, kb[a, b], vb[a, b], mask, slopes, sinks, scale, softcap, lo, hi, c == 0,
                              rows, M, Sm, vkq, kf, vf, acc)
                for r in range(R):
                    s, h, iq = rows[r, 0], rows[r, 1], rows[r, 2]
                    if n_chunks == 1:
                        inv = np.float32(0) if Sm[r] == 0 else np.float32(1) / Sm[r]
                        for d in range(DV):
                            out[s, h, iq, d] = vkq[r, d] * inv
                    elif Sm[r] != 0:
                        m_new = max(mfin[r], M[r])
                        so, sn = np.float32(math.exp(mfin[r] - m_new)), np.float32(math.exp(M[r] - m_new))
                        for d in range(DV):
                            fin[r, d] = fma32(fin[r, d], so, vkq[r, d] * sn)
                        sfin[r] = fma32(sfin[r], so, Sm[r] * sn)
                        mfin[r] = m_new
            if n_chunks > 1:
                for r in range(R):
                    s, h, iq = rows[r, 0], rows[r, 1], rows[r, 2]
                    inv = np.float32(1) / sfin[r] if sfin[r] != 0 else np.float32(1)
                    for d in range(DV):
                        out[s, h, iq, d] = fin[r, d] * inv


@functools.cache
def _f16_kernel() -> Callable[..., None]:
    """The numba kernel replaying ggml's flash-attention row path for F16 K/V (compiled once)."""
    _bind_math()
    njit_in_place(globals(), "_dot_f16", "_fa_f16_group", "_fa_f16_rows")
    return globals()["_fa_f16_rows"]


def row_kernel(node: Tensor, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None,
                           sinks: Tensor | None) -> Kernel:
    """FLASH_ATTN_EXT for F16 K/V and < 64 queries: ggml's row kernel, replayed bit for bit."""
    rows = _f16_kernel()
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
    chunk = -(-n_kv // max(1, ggml_threads())) if split else max(n_kv, 1)

    def kernel() -> None:
        q16 = qv.astype(np.float16).astype(F32)
        m = read_mask()
        lo_hi = np.array([0, n_kv], np.int64)
        if m.size:   # entries every query row masks out change nothing in ggml's loop: skip them
            live = np.flatnonzero((m != -np.inf).any(axis=(0, 1, 2)))
            lo_hi[:] = (live[0], live[-1] + 1) if live.size else (0, 0)
        rows(q16, kb, vb, m, slopes, sink_v, scale, softcap, chunk, lo_hi, out)
    return kernel


# --- the tiled kernel (>= 64 queries) ---------------------------------------------------------------------

def _fa_tiled_group(q, k, v, mask, slopes, sinks, scale, softcap, rows, out, kt, kq, M, S, vkq):
    """ggml_compute_forward_flash_attn_ext_tiled for the query rows `rows` sharing one K/V head (k, v:
    float32 (n_kv, D) / (n_kv, DV)): per 64-entry tile, scores by sequential FMAs over D, scale, softcap,
    mask, the tile's max, ggml_vec_soft_max_f32, V accumulated by sequential FMAs over the tile."""
    R, DV = vkq.shape
    n_kv, D = k.shape
    m3, m2 = mask.shape[0], mask.shape[1]
    for r in range(R):
        M[r], S[r] = -np.inf, 0
        vkq[r, :] = 0
    for t0 in range(0, n_kv, 64):
        nt = min(64, n_kv - t0)
        loaded = False
        for r in range(R):
            s, h, iq = rows[r, 0], rows[r, 1], rows[r, 2]
            if m3 > 0:
                mrow = mask[s % m3, h % m2, iq]
                live = False
                for c in range(nt):
                    if slopes[h] * mrow[t0 + c] != -np.inf:
                        live = True
                        break
                if not live:        # all -inf: ggml skips the row (or the whole tile)
                    continue
            if not loaded:          # K tile transposed (D, 64): the score loop runs over 64 entries
                for c in range(nt):
                    for d in range(D):
                        kt[d, c] = k[t0 + c, d]
                loaded = True
            qr = q[s, h, iq]
            for c in range(64):
                kq[c] = 0
            for d in range(D):
                qd = qr[d]
                for c in range(nt):
                    kq[c] = fma32(kt[d, c], qd, kq[c])
            for c in range(nt):
                x = kq[c] * scale
                if softcap != 0:
                    x = np.float32(math.tanh(x)) * softcap
                if m3 > 0:
                    x = x + slopes[h] * mask[s % m3, h % m2, iq, t0 + c]
                kq[c] = x
            tile_max = np.float32(-np.inf)
            for c in range(64):
                if c >= nt:
                    kq[c] = -np.inf
                tile_max = kq[c] if kq[c] > tile_max else tile_max
            if tile_max == -np.inf:
                continue
            m_new = max(M[r], tile_max)
            if m_new > M[r]:
                ms = np.float32(math.exp(M[r] - m_new))
                for d in range(DV):
                    vkq[r, d] = vkq[r, d] * ms
                S[r] = S[r] * ms
            M[r] = m_new
            S[r] = np.float32(np.float64(S[r]) + soft_max_row(kq, kq, m_new))
            acc = vkq[r]
            for c in range(nt):
                w = kq[c]
                vrow = v[t0 + c]
                for d in range(DV):
                    acc[d] = fma32(vrow[d], w, acc[d])
    for r in range(R):
        s, h, iq = rows[r, 0], rows[r, 1], rows[r, 2]
        if sinks.size:
            sk = sinks[h]
            ms, vs = np.float32(1), np.float32(1)
            if sk > M[r]:
                ms = np.float32(math.exp(M[r] - sk))
                for d in range(DV):
                    vkq[r, d] = vkq[r, d] * ms
            else:
                vs = np.float32(math.exp(sk - M[r]))
            S[r] = fma32(S[r], ms, vs)
        inv = np.float32(0) if S[r] == 0 else np.float32(1) / S[r]
        for d in range(DV):
            out[s, h, iq, d] = vkq[r, d] * inv


def _fa_tiled_rows(q, k, v, mask, slopes, sinks, scale, softcap, out):  # numba
    """The tiled kernel K/V head by K/V head (all query rows of a head share each converted K tile)."""
    S_, H, NQ, D = q.shape
    sk, hk, DV = v.shape[0], v.shape[1], v.shape[3]
    r3, r2 = S_ // sk, H // hk
    R = r3 * r2 * NQ
    rows = np.empty((R, 3), np.int64)
    M, Sm, vkq = np.empty(R, np.float32), np.empty(R, np.float32), np.empty((R, DV), np.float32)
    kt, kq = np.zeros((D, 64), np.float32), np.empty(64, np.float32)
    for a in range(sk):
        for b in range(hk):
            r = 0
            for s in range(a * r3, (a + 1) * r3):
                for h in range(b * r2, (b + 1) * r2):
                    for iq in range(NQ):
                        rows[r, 0], rows[r, 1], rows[r, 2] = s, h, iq
                        r += 1
            _fa_tiled_group(q, k[a, b], v[a, b], mask, slopes, sinks, scale, softcap, rows, out, kt, kq, M, Sm, vkq)


@functools.cache
def _tiled_kernel() -> Callable[..., None]:
    _bind_math()
    njit_in_place(globals(), "_fa_tiled_group", "_fa_tiled_rows")
    return globals()["_fa_tiled_rows"]


def tiled_kernel(node: Tensor, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None,
                 sinks: Tensor | None) -> Kernel:
    """FLASH_ATTN_EXT with >= 64 queries and F32/F16 K = V type: ggml's tiled kernel, bit for bit."""
    rows = _tiled_kernel()
    _, n_q, H, _ = q.ne
    scale, max_bias, softcap = F32(node.param_f32(0)), float(node.param_f32(1)), F32(node.param_f32(2))
    if softcap != 0:
        scale = F32(scale / softcap)
    qv, out = view(q), view(node).transpose(0, 2, 1, 3)
    kv, vv = view(k), view(v)
    to_f32 = f16_to_f32 if k.type == GGMLType.F16 else (lambda x: x)
    slopes = alibi_slopes(H, max_bias)
    read_mask = mask_reader(mask, n_q) if mask is not None else (lambda: np.zeros((0, 0, 0, 0), F32))
    sink_v = view(sinks)[0, 0, 0, :H] if sinks is not None else np.zeros(0, F32)

    def kernel() -> None:
        m = read_mask()
        hi = k.ne[1]
        if m.size:   # KV tiles past the last visible entry are skipped by ggml: never convert them
            live = np.flatnonzero((m != -np.inf).any(axis=(0, 1, 2)))
            hi = int(live[-1]) + 1 if live.size else 0
        rows(qv, to_f32(kv[:, :, :hi]), to_f32(vv[:, :, :hi]), m[..., :hi], slopes, sink_v, scale, softcap, out)
    return kernel
