# mypy: disable-error-code="call-arg,var-annotated"
# (numba intrinsics are called without their typing-context parameter)
"""Matmul kernels: dst columns = weight rows (kept quantized) dotted with prepared activation rows.

One generic kernel per family, specialized per weight type through a literal `fmt`:
* `q32`: 32-element block types (vec_dot Q8_0/Q8_1): integer dots of block pairs against the int8
  activations (vpdpbusd / vpmaddubsw, decode.py; int16 vpmaddwd per block where those are missing)
  scaled by d_a*d_b into 16 float lanes, plus m_a*s_b for Q4_1/Q5_1; one horizontal sum per output.
* `k`: 256-element super-blocks (vec_dot Q8_K): per super-block the integer sum of sub-block
  scale * dot (exact, as ggml; decode_k.py), scaled by d_a*d_b; mins through the activation's bsums.
* `f`: F32/F16/BF16 weights against float32 activations (already rounded to the vec_dot type).
Integer sums are exact, so results differ from ggml only by float32 summation order (~1e-7).

Work layout shared by all: output columns are grouped so that a group shares one weight matrix
(`goff[g]`: its byte offset in `abuf`; columns gcols[g]:gcols[g+1]); column i reads prepared
activation row `colb[i]` and writes M floats at `out[colo[i]:]`. Work items = (group, row chunk);
threads (threads.py) take items from a shared atomic counter (`*_drain`, GIL released); inside an item,
columns go in tiles of 4 so each weight block is decoded once per 4 columns.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from numba import njit

from ...ggml.types import GGMLType
from .decode import dec_q32, load_f, load_f16x, q32_dot8x2, q32_scale2, q32_scale_at
from .decode_k import ksb_d, ksb_dot, ksb_dot8, ksb_min
from .simd import (
    HAS_MADDUBS,
    add_f32,
    atomic_add,
    atomic_next,
    f16_at,
    fma_f32,
    fma_i32,
    fma_i32_v,
    hsum_f32,
    literal_value,
    load_f32x16,
    load_i16x32,
    madd,
    mul_f32,
    zero_f32x16,
)

Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 = 2, 3, 6, 7, 8
Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS, MXFP4 = 10, 11, 12, 13, 14, 20, 23, 39
F32, F16, BF16 = 0, 1, 30

assert (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS, MXFP4, F32, F16, BF16) == (
    GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1, GGMLType.Q8_0, GGMLType.Q2_K, GGMLType.Q3_K,
    GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K, GGMLType.IQ4_NL, GGMLType.IQ4_XS, GGMLType.MXFP4,
    GGMLType.F32, GGMLType.F16, GGMLType.BF16)


# numba's runtime refcounts every array passed between jitted functions (atomic operations, here per
# row); the kernels allocate nothing, so they are compiled without it.
_NO_NRT: dict[str, Any] = {"_nrt": False}


@njit(cache=True, inline="always")
def _item(it: int, nch: int, rows: int, M: int) -> tuple[int, int, int]:
    """Work item -> (group, first row, end row)."""
    g = it // nch
    r0 = (it % nch) * rows
    return g, r0, min(M, r0 + rows)


@njit(cache=True, inline="always")
def _q32_bytes(f: int) -> int:
    if f == Q4_0 or f == IQ4_NL:
        return 18
    if f == Q4_1:
        return 20
    if f == Q5_0:
        return 22
    if f == Q5_1:
        return 24
    if f == Q8_0:
        return 34
    return 17  # MXFP4


@njit(cache=True, inline="always")
def _bytes32(f: int) -> bool:
    """32-element formats whose kernels use vpmaddubsw on int8 activations (when the host has it)."""
    return HAS_MADDUBS and (f == Q4_0 or f == Q4_1 or f == Q5_0 or f == Q5_1 or f == Q8_0 or f == IQ4_NL
                            or f == MXFP4)


@njit(cache=True, **_NO_NRT)
def _q32_cols4(fmt: int, abuf: np.ndarray, ro: int, K: int, bq: np.ndarray, bq8: np.ndarray, bd: np.ndarray,
               bs: np.ndarray, ycorr: np.ndarray, dyv: np.ndarray, b0: int, b1: int, b2: int, b3: int
               ) -> tuple[float, float, float, float]:
    """Weight row at byte `ro` dotted with activation rows b0..b3; each block is decoded once."""
    f = literal_value(fmt)
    bsz = _q32_bytes(f)
    nblk = K // 32
    a0, a1, a2, a3 = zero_f32x16(), zero_f32x16(), zero_f32x16(), zero_f32x16()
    m0 = m1 = m2 = m3 = np.float32(0.0)
    start = 0
    if _bytes32(f):  # block pairs with byte products; an odd last block takes the int16 path below
        v0, v1, v2, v3 = b0 * nblk * 8, b1 * nblk * 8, b2 * nblk * 8, b3 * nblk * 8
        for blk in range(0, nblk - 1, 2):
            o, e, v = ro + blk * bsz, blk * 32, blk * 8
            s0, s1, s2, s3 = q32_dot8x2(fmt, abuf, o, bsz, bq8, (b0 * K + e, b1 * K + e, b2 * K + e, b3 * K + e),
                                        ycorr, (v0 + v, v1 + v, v2 + v, v3 + v))
            da = q32_scale2(fmt, abuf, o, bsz)
            a0 = fma_i32_v(a0, s0, mul_f32(da, load_f32x16(dyv, v0 + v)))
            a1 = fma_i32_v(a1, s1, mul_f32(da, load_f32x16(dyv, v1 + v)))
            a2 = fma_i32_v(a2, s2, mul_f32(da, load_f32x16(dyv, v2 + v)))
            a3 = fma_i32_v(a3, s3, mul_f32(da, load_f32x16(dyv, v3 + v)))
        start = nblk - nblk % 2
    for blk in range(start, nblk):
        o = ro + blk * bsz
        q = dec_q32(fmt, abuf, o)
        da1 = q32_scale_at(fmt, abuf, o)
        k = blk * 32
        a0 = fma_i32(a0, madd(q, load_i16x32(bq, b0 * K + k)), da1 * bd[b0, blk])
        a1 = fma_i32(a1, madd(q, load_i16x32(bq, b1 * K + k)), da1 * bd[b1, blk])
        a2 = fma_i32(a2, madd(q, load_i16x32(bq, b2 * K + k)), da1 * bd[b2, blk])
        a3 = fma_i32(a3, madd(q, load_i16x32(bq, b3 * K + k)), da1 * bd[b3, blk])
    if f == Q4_1 or f == Q5_1:  # ggml adds m_a * s_b per block
        for blk in range(nblk):
            ma = f16_at(abuf, ro + blk * bsz + 2)
            m0 += ma * bs[b0, blk]
            m1 += ma * bs[b1, blk]
            m2 += ma * bs[b2, blk]
            m3 += ma * bs[b3, blk]
    return hsum_f32(a0) + m0, hsum_f32(a1) + m1, hsum_f32(a2) + m2, hsum_f32(a3) + m3


@njit(cache=True, **_NO_NRT)
def _q32_col1(fmt: int, abuf: np.ndarray, ro: int, K: int, bq: np.ndarray, bq8: np.ndarray, bd: np.ndarray,
              bs: np.ndarray, ycorr: np.ndarray, dyv: np.ndarray, b0: int) -> float:
    """One weight row with one activation row (two accumulators on the int16 path, so consecutive blocks
    do not wait on each other's FMA latency)."""
    f = literal_value(fmt)
    bsz = _q32_bytes(f)
    nblk = K // 32
    acc0, acc1 = zero_f32x16(), zero_f32x16()
    m0 = np.float32(0.0)
    e = b0 * K
    start = 0
    if _bytes32(f):
        v0 = b0 * nblk * 8
        for blk in range(0, nblk - 1, 2):
            o = ro + blk * bsz
            (s,) = q32_dot8x2(fmt, abuf, o, bsz, bq8, (e + blk * 32,), ycorr, (v0 + blk * 8,))
            acc0 = fma_i32_v(acc0, s, mul_f32(q32_scale2(fmt, abuf, o, bsz), load_f32x16(dyv, v0 + blk * 8)))
        start = nblk - nblk % 2
    else:
        for blk in range(0, nblk - 1, 2):
            o = ro + blk * bsz
            acc0 = fma_i32(acc0, madd(dec_q32(fmt, abuf, o), load_i16x32(bq, e + blk * 32)),
                           q32_scale_at(fmt, abuf, o) * bd[b0, blk])
            o += bsz
            acc1 = fma_i32(acc1, madd(dec_q32(fmt, abuf, o), load_i16x32(bq, e + blk * 32 + 32)),
                           q32_scale_at(fmt, abuf, o) * bd[b0, blk + 1])
        start = nblk - nblk % 2
    for blk in range(start, nblk):
        o = ro + blk * bsz
        acc0 = fma_i32(acc0, madd(dec_q32(fmt, abuf, o), load_i16x32(bq, e + blk * 32)),
                       q32_scale_at(fmt, abuf, o) * bd[b0, blk])
    if f == Q4_1 or f == Q5_1:  # ggml adds m_a * s_b per block
        for blk in range(nblk):
            m0 += f16_at(abuf, ro + blk * bsz + 2) * bs[b0, blk]
    return hsum_f32(add_f32(acc0, acc1)) + m0


@njit(cache=True, **_NO_NRT)
def _q32_item(fmt: int, it: int, nch: int, rows: int, abuf: np.ndarray, nb01: int, M: int, K: int,
              goff: np.ndarray, gcols: np.ndarray, colb: np.ndarray, colo: np.ndarray, bq: np.ndarray,
              bq8: np.ndarray, bd: np.ndarray, bs: np.ndarray, ycorr: np.ndarray, dyv: np.ndarray,
              out: np.ndarray) -> None:
    g, r0, r1 = _item(it, nch, rows, M)
    c0, c1 = gcols[g], gcols[g + 1]
    for r in range(r0, r1):
        ro = goff[g] + r * nb01
        c = c0
        while c + 4 <= c1:
            t0, t1, t2, t3 = _q32_cols4(fmt, abuf, ro, K, bq, bq8, bd, bs, ycorr, dyv, colb[c], colb[c + 1],
                                        colb[c + 2], colb[c + 3])
            out[colo[c] + r], out[colo[c + 1] + r] = t0, t1
            out[colo[c + 2] + r], out[colo[c + 3] + r] = t2, t3
            c += 4
        for cc in range(c, c1):
            out[colo[cc] + r] = _q32_col1(fmt, abuf, ro, K, bq, bq8, bd, bs, ycorr, dyv, colb[cc])


@njit(cache=True, inline="always")
def _k_bytes(f: int) -> int:
    if f == Q2_K:
        return 84
    if f == Q3_K:
        return 110
    if f == Q4_K:
        return 144
    if f == Q5_K:
        return 176
    if f == Q6_K:
        return 210
    return 136  # IQ4_XS


@njit(cache=True, inline="always")
def _bytes_path(f: int) -> bool:
    """K formats whose kernels use vpmaddubsw on int8 activations (when the host has it)."""
    return HAS_MADDUBS and (f == Q2_K or f == Q3_K or f == Q4_K or f == Q5_K or f == Q6_K)


@njit(cache=True, **_NO_NRT)
def _k_cols4(fmt: int, abuf: np.ndarray, ro: int, K: int, bq: np.ndarray, bq8: np.ndarray, bd: np.ndarray,
             bsum: np.ndarray, b0: int, b1: int, b2: int, b3: int) -> tuple[float, float, float, float]:
    """Weight row at byte `ro` dotted with activation rows b0..b3; each super-block decoded once."""
    f = literal_value(fmt)
    bsz = _k_bytes(f)
    f0, f1, f2, f3 = zero_f32x16(), zero_f32x16(), zero_f32x16(), zero_f32x16()
    m0, m1, m2, m3 = zero_f32x16(), zero_f32x16(), zero_f32x16(), zero_f32x16()
    G = K // 16
    for sb in range(K // 256):
        o = ro + sb * bsz
        d, dmin = ksb_d(fmt, abuf, o)
        e, g = sb * 256, sb * 16
        qc = (b0 * K + e, b1 * K + e, b2 * K + e, b3 * K + e)
        sc = (b0 * G + g, b1 * G + g, b2 * G + g, b3 * G + g)
        if _bytes_path(f):
            i0, i1, i2, i3 = ksb_dot8(fmt, abuf, o, bq8, bsum, qc, sc)
        else:
            i0, i1, i2, i3 = ksb_dot(fmt, abuf, o, bq, qc)
        f0 = fma_i32(f0, i0, d * bd[b0, sb])
        f1 = fma_i32(f1, i1, d * bd[b1, sb])
        f2 = fma_i32(f2, i2, d * bd[b2, sb])
        f3 = fma_i32(f3, i3, d * bd[b3, sb])
        if f == Q4_K or f == Q5_K or f == Q2_K:  # mins meet the activation's 16-sums (bsums)
            n0, n1, n2, n3 = ksb_min(fmt, abuf, o, bsum, sc)
            m0 = fma_i32(m0, n0, dmin * bd[b0, sb])
            m1 = fma_i32(m1, n1, dmin * bd[b1, sb])
            m2 = fma_i32(m2, n2, dmin * bd[b2, sb])
            m3 = fma_i32(m3, n3, dmin * bd[b3, sb])
    return (hsum_f32(f0) - hsum_f32(m0), hsum_f32(f1) - hsum_f32(m1), hsum_f32(f2) - hsum_f32(m2),
            hsum_f32(f3) - hsum_f32(m3))


@njit(cache=True, **_NO_NRT)
def _k_col1(fmt: int, abuf: np.ndarray, ro: int, K: int, bq: np.ndarray, bq8: np.ndarray, bd: np.ndarray,
            bsum: np.ndarray, b0: int) -> float:
    f = literal_value(fmt)
    bsz = _k_bytes(f)
    acc, macc = zero_f32x16(), zero_f32x16()
    for sb in range(K // 256):
        o = ro + sb * bsz
        d, dmin = ksb_d(fmt, abuf, o)
        qc, sc = (b0 * K + sb * 256,), (b0 * (K // 16) + sb * 16,)
        if _bytes_path(f):
            (isum,) = ksb_dot8(fmt, abuf, o, bq8, bsum, qc, sc)
        else:
            (isum,) = ksb_dot(fmt, abuf, o, bq, qc)
        acc = fma_i32(acc, isum, d * bd[b0, sb])
        if f == Q4_K or f == Q5_K or f == Q2_K:
            (msum,) = ksb_min(fmt, abuf, o, bsum, sc)
            macc = fma_i32(macc, msum, dmin * bd[b0, sb])
    return hsum_f32(acc) - hsum_f32(macc)


@njit(cache=True, **_NO_NRT)
def _k_item(fmt: int, it: int, nch: int, rows: int, abuf: np.ndarray, nb01: int, M: int, K: int,
            goff: np.ndarray, gcols: np.ndarray, colb: np.ndarray, colo: np.ndarray, bq: np.ndarray,
            bq8: np.ndarray, bd: np.ndarray, bsum: np.ndarray, out: np.ndarray) -> None:
    g, r0, r1 = _item(it, nch, rows, M)
    c0, c1 = gcols[g], gcols[g + 1]
    for r in range(r0, r1):
        ro = goff[g] + r * nb01
        c = c0
        while c + 4 <= c1:
            t0, t1, t2, t3 = _k_cols4(fmt, abuf, ro, K, bq, bq8, bd, bsum, colb[c], colb[c + 1], colb[c + 2],
                                      colb[c + 3])
            out[colo[c] + r], out[colo[c + 1] + r] = t0, t1
            out[colo[c + 2] + r], out[colo[c + 3] + r] = t2, t3
            c += 4
        for cc in range(c, c1):
            out[colo[cc] + r] = _k_col1(fmt, abuf, ro, K, bq, bq8, bd, bsum, colb[cc])


@njit(cache=True, **_NO_NRT)
def _f_cols4(fmt: int, abuf: np.ndarray, ro: int, K: int, bf: np.ndarray, b0: int, b1: int, b2: int,
             b3: int) -> tuple[float, float, float, float]:
    f = literal_value(fmt)
    esz = 4 if f == F32 else 2
    kv = K - K % 16
    f0, f1, f2, f3 = zero_f32x16(), zero_f32x16(), zero_f32x16(), zero_f32x16()
    for k in range(0, kv, 16):
        x = load_f16x(fmt, abuf, ro + k * esz)
        f0 = fma_f32(f0, x, load_f32x16(bf, b0 * K + k))
        f1 = fma_f32(f1, x, load_f32x16(bf, b1 * K + k))
        f2 = fma_f32(f2, x, load_f32x16(bf, b2 * K + k))
        f3 = fma_f32(f3, x, load_f32x16(bf, b3 * K + k))
    t0, t1, t2, t3 = hsum_f32(f0), hsum_f32(f1), hsum_f32(f2), hsum_f32(f3)
    for k in range(kv, K):  # tail of a K that is not a multiple of 16
        x1 = load_f(fmt, abuf, ro + k * esz)
        t0 += x1 * bf[b0 * K + k]
        t1 += x1 * bf[b1 * K + k]
        t2 += x1 * bf[b2 * K + k]
        t3 += x1 * bf[b3 * K + k]
    return t0, t1, t2, t3


@njit(cache=True, **_NO_NRT)
def _f_col1(fmt: int, abuf: np.ndarray, ro: int, K: int, bf: np.ndarray, b0: int) -> float:
    f = literal_value(fmt)
    esz = 4 if f == F32 else 2
    kv = K - K % 16
    acc = zero_f32x16()
    for k in range(0, kv, 16):
        acc = fma_f32(acc, load_f16x(fmt, abuf, ro + k * esz), load_f32x16(bf, b0 * K + k))
    t = hsum_f32(acc)
    for k in range(kv, K):
        t += load_f(fmt, abuf, ro + k * esz) * bf[b0 * K + k]
    return t


@njit(cache=True, **_NO_NRT)
def _f_item(fmt: int, it: int, nch: int, rows: int, abuf: np.ndarray, nb01: int, M: int, K: int,
            goff: np.ndarray, gcols: np.ndarray, colb: np.ndarray, colo: np.ndarray, bf: np.ndarray,
            out: np.ndarray) -> None:
    g, r0, r1 = _item(it, nch, rows, M)
    c0, c1 = gcols[g], gcols[g + 1]
    for r in range(r0, r1):
        ro = goff[g] + r * nb01
        c = c0
        while c + 4 <= c1:
            t0, t1, t2, t3 = _f_cols4(fmt, abuf, ro, K, bf, colb[c], colb[c + 1], colb[c + 2], colb[c + 3])
            out[colo[c] + r], out[colo[c + 1] + r] = t0, t1
            out[colo[c + 2] + r], out[colo[c + 3] + r] = t2, t3
            c += 4
        for cc in range(c, c1):
            out[colo[cc] + r] = _f_col1(fmt, abuf, ro, K, bf, colb[cc])


# --- drains: a thread pulls work items from counter[0] until none is left; counter[1] counts the
# finished ones (the caller waits for all of them). `post` (empty for helpers) gets its job number
# bumped first: see threads.py --------------------------------------------------------------------

@njit(cache=True, nogil=True, **_NO_NRT)
def q32_drain(fmt: int, post: np.ndarray, counter: np.ndarray, nitems: int, nch: int, rows: int,
              abuf: np.ndarray, nb01: int, M: int, K: int, goff: np.ndarray, gcols: np.ndarray,
              colb: np.ndarray, colo: np.ndarray,
              bq: np.ndarray, bq8: np.ndarray, bd: np.ndarray, bs: np.ndarray, ycorr: np.ndarray,
              dyv: np.ndarray, out: np.ndarray) -> None:
    if post.shape[0]:  # the caller announces the job to polling helpers with the GIL already released
        atomic_add(post, 0, 1)
    while True:
        it = atomic_next(counter)
        if it >= nitems:
            return
        _q32_item(fmt, it, nch, rows, abuf, nb01, M, K, goff, gcols, colb, colo, bq, bq8, bd, bs, ycorr, dyv,
                  out)
        atomic_add(counter, 1, 1)


@njit(cache=True, nogil=True, **_NO_NRT)
def k_drain(fmt: int, post: np.ndarray, counter: np.ndarray, nitems: int, nch: int, rows: int,
            abuf: np.ndarray, nb01: int, M: int, K: int, goff: np.ndarray, gcols: np.ndarray,
            colb: np.ndarray, colo: np.ndarray,
            bq: np.ndarray, bq8: np.ndarray, bd: np.ndarray, bsum: np.ndarray, out: np.ndarray) -> None:
    if post.shape[0]:  # the caller announces the job to polling helpers with the GIL already released
        atomic_add(post, 0, 1)
    while True:
        it = atomic_next(counter)
        if it >= nitems:
            return
        _k_item(fmt, it, nch, rows, abuf, nb01, M, K, goff, gcols, colb, colo, bq, bq8, bd, bsum, out)
        atomic_add(counter, 1, 1)


@njit(cache=True, nogil=True, **_NO_NRT)
def f_drain(fmt: int, post: np.ndarray, counter: np.ndarray, nitems: int, nch: int, rows: int,
            abuf: np.ndarray, nb01: int, M: int, K: int, goff: np.ndarray, gcols: np.ndarray,
            colb: np.ndarray, colo: np.ndarray,
            bf: np.ndarray, out: np.ndarray) -> None:
    if post.shape[0]:  # the caller announces the job to polling helpers with the GIL already released
        atomic_add(post, 0, 1)
    while True:
        it = atomic_next(counter)
        if it >= nitems:
            return
        _f_item(fmt, it, nch, rows, abuf, nb01, M, K, goff, gcols, colb, colo, bf, out)
        atomic_add(counter, 1, 1)
