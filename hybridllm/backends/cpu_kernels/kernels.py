# mypy: disable-error-code="call-arg,var-annotated"
# (numba intrinsics are called without their typing-context parameter)
"""Matmul kernels: dst columns = weight rows (kept quantized) dotted with prepared activation rows, each
output computed with the float operations of the ggml CPU code that would compute it (bit-exact).

The integer parts (block dots against the int8 activations) are exact in any order; the float parts are
replayed in ggml's order, per family and per `mode` (the code path ggml takes, chosen in api.py):
* `q32` (vec_dot Q8_0/Q8_1): mode 0 (vec_dot of Q4_0/Q5_0/Q8_0/Q4_1/Q5_1, llamafile sgemm of Q4_0/Q5_0/
  Q8_0/IQ4_NL): one 8-lane accumulator, per block acc = fma(d_x*d_y, lanes, acc), then hsum_float_8
  (+ the scalar m*s sums of Q4_1/Q5_1); mode 1 (vec_dot of IQ4_NL/MXFP4): even and odd blocks in two
  accumulators, an odd last block added as a scalar.
* `k` (vec_dot Q8_K): mode 0 (vec_dot): per super-block acc = fma(d_y*d_x, lanes, acc) with each type's
  mins handling; mode 1 (ggml's tiled kernel for 8+ activation rows): scalar
  acc = fma(d_x*S - dmin_x*M, d_y, acc) with S, M the super-block's integer totals.
* `f` (F32/F16/BF16): mode 0 (vec_dot: four 8-lane accumulators over steps of 32, then ggml's reduction and
  scalar leftovers); mode 1 (llamafile sgemm: one 8-lane accumulator over steps of 8, then hsum).

Work layout shared by all: output columns are grouped so that a group shares one weight matrix
(`goff[g]`: its byte offset in `abuf`; columns gcols[g]:gcols[g+1]; `gmode[g]` its mode); column i reads
prepared activation row `colb[i]` and writes M floats at `out[colo[i]:]`. Work items = (group, row chunk);
threads (threads.py) take items from a shared atomic counter (`*_drain`, GIL released); inside an item,
columns go in tiles of 4 so each weight block is decoded once per 4 columns.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from numba import njit

from ...ggml.types import GGMLType
from .decode import load8_f, load_f, q32_lanes, q32_scale2, q32_scale_at
from .decode_k import ksb_d, ksb_lanes, ksb_mins
from .simd import (
    add8,
    atomic_add,
    atomic_next,
    f16_at,
    fma4_i32,
    fma8,
    fma8_half,
    fma8_i32,
    fma_f,
    hsum4,
    hsum8,
    isum8,
    isum8x4,
    lane4,
    literal_value,
    lo8,
    load_f32x8,
    load_f32x16,
    mul_f32,
    reduce_dot4,
    tiled_step4,
    zero_f32x4,
    zero_f32x8,
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


# --- 32-element blocks -------------------------------------------------------------------------------

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


@njit(cache=True, **_NO_NRT)
def _q32_cols4(fmt: int, two_acc: int, abuf: np.ndarray, ro: int, K: int, bq8: np.ndarray, bd: np.ndarray,
               bs: np.ndarray, ycorr: np.ndarray, dyv: np.ndarray, b0: int, b1: int, b2: int, b3: int
               ) -> tuple[float, float, float, float]:
    """Weight row at byte `ro` dotted with activation rows b0..b3; each block pair is decoded once."""
    f = literal_value(fmt)
    bsz = _q32_bytes(f)
    nblk = K // 32
    a0, a1, a2, a3 = zero_f32x8(), zero_f32x8(), zero_f32x8(), zero_f32x8()
    o0, o1, o2, o3 = zero_f32x8(), zero_f32x8(), zero_f32x8(), zero_f32x8()   # odd blocks (mode 1)
    v0, v1, v2, v3 = b0 * nblk * 8, b1 * nblk * 8, b2 * nblk * 8, b3 * nblk * 8
    for blk in range(0, nblk - 1, 2):
        o, e, v = ro + blk * bsz, blk * 32, blk * 8
        s0, s1, s2, s3 = q32_lanes(fmt, abuf, o, bsz, 1, bq8, (b0 * K + e, b1 * K + e, b2 * K + e, b3 * K + e),
                                   ycorr, (v0 + v, v1 + v, v2 + v, v3 + v))
        da = q32_scale2(fmt, abuf, o, bsz)
        p0, p1 = mul_f32(da, load_f32x16(dyv, v0 + v)), mul_f32(da, load_f32x16(dyv, v1 + v))
        p2, p3 = mul_f32(da, load_f32x16(dyv, v2 + v)), mul_f32(da, load_f32x16(dyv, v3 + v))
        a0, a1 = fma8_half(a0, s0, p0, 0), fma8_half(a1, s1, p1, 0)
        a2, a3 = fma8_half(a2, s2, p2, 0), fma8_half(a3, s3, p3, 0)
        if two_acc:
            o0, o1 = fma8_half(o0, s0, p0, 1), fma8_half(o1, s1, p1, 1)
            o2, o3 = fma8_half(o2, s2, p2, 1), fma8_half(o3, s3, p3, 1)
        else:
            a0, a1 = fma8_half(a0, s0, p0, 1), fma8_half(a1, s1, p1, 1)
            a2, a3 = fma8_half(a2, s2, p2, 1), fma8_half(a3, s3, p3, 1)
    t0 = t1 = t2 = t3 = np.float32(0.0)
    if nblk % 2:
        blk = nblk - 1
        o, e, v = ro + blk * bsz, blk * 32, blk * 8
        s0, s1, s2, s3 = q32_lanes(fmt, abuf, o, bsz, 0, bq8, (b0 * K + e, b1 * K + e, b2 * K + e, b3 * K + e),
                                   ycorr, (v0 + v, v1 + v, v2 + v, v3 + v))
        da1 = q32_scale_at(fmt, abuf, o)
        d0, d1, d2, d3 = da1 * bd[b0, blk], da1 * bd[b1, blk], da1 * bd[b2, blk], da1 * bd[b3, blk]
        if two_acc:  # ggml's scalar tail: d * float(sum), added after the vector sum
            t0, t1 = d0 * np.float32(isum8(lo8(s0))), d1 * np.float32(isum8(lo8(s1)))
            t2, t3 = d2 * np.float32(isum8(lo8(s2))), d3 * np.float32(isum8(lo8(s3)))
        else:
            a0, a1 = fma8_i32(a0, lo8(s0), d0), fma8_i32(a1, lo8(s1), d1)
            a2, a3 = fma8_i32(a2, lo8(s2), d2), fma8_i32(a3, lo8(s3), d3)
    if two_acc:
        return (hsum8(add8(a0, o0)) + t0, hsum8(add8(a1, o1)) + t1, hsum8(add8(a2, o2)) + t2,
                hsum8(add8(a3, o3)) + t3)
    m0 = m1 = m2 = m3 = np.float32(0.0)
    if f == Q4_1 or f == Q5_1:  # ggml: summs += m_x * s_y per block (one FMA), added at the end
        for blk in range(nblk):
            ma = f16_at(abuf, ro + blk * bsz + 2)
            m0, m1 = fma_f(ma, bs[b0, blk], m0), fma_f(ma, bs[b1, blk], m1)
            m2, m3 = fma_f(ma, bs[b2, blk], m2), fma_f(ma, bs[b3, blk], m3)
    return hsum8(a0) + m0, hsum8(a1) + m1, hsum8(a2) + m2, hsum8(a3) + m3


@njit(cache=True, **_NO_NRT)
def _q32_col1(fmt: int, two_acc: int, abuf: np.ndarray, ro: int, K: int, bq8: np.ndarray, bd: np.ndarray,
              bs: np.ndarray, ycorr: np.ndarray, dyv: np.ndarray, b0: int) -> float:
    """One weight row with one activation row (as _q32_cols4)."""
    f = literal_value(fmt)
    bsz = _q32_bytes(f)
    nblk = K // 32
    acc, odd = zero_f32x8(), zero_f32x8()
    v0 = b0 * nblk * 8
    for blk in range(0, nblk - 1, 2):
        o = ro + blk * bsz
        (s,) = q32_lanes(fmt, abuf, o, bsz, 1, bq8, (b0 * K + blk * 32,), ycorr, (v0 + blk * 8,))
        p = mul_f32(q32_scale2(fmt, abuf, o, bsz), load_f32x16(dyv, v0 + blk * 8))
        acc = fma8_half(acc, s, p, 0)
        if two_acc:
            odd = fma8_half(odd, s, p, 1)
        else:
            acc = fma8_half(acc, s, p, 1)
    tail = np.float32(0.0)
    if nblk % 2:
        blk = nblk - 1
        o = ro + blk * bsz
        (s,) = q32_lanes(fmt, abuf, o, bsz, 0, bq8, (b0 * K + blk * 32,), ycorr, (v0 + blk * 8,))
        d = q32_scale_at(fmt, abuf, o) * bd[b0, blk]
        if two_acc:
            tail = d * np.float32(isum8(lo8(s)))
        else:
            acc = fma8_i32(acc, lo8(s), d)
    if two_acc:
        return hsum8(add8(acc, odd)) + tail
    summs = np.float32(0.0)
    if f == Q4_1 or f == Q5_1:
        for blk in range(nblk):
            summs = fma_f(f16_at(abuf, ro + blk * bsz + 2), bs[b0, blk], summs)
    return hsum8(acc) + summs


@njit(cache=True, **_NO_NRT)
def _q32_item(fmt: int, it: int, nch: int, rows: int, abuf: np.ndarray, nb01: int, M: int, K: int,
              goff: np.ndarray, gcols: np.ndarray, gmode: np.ndarray, colb: np.ndarray, colo: np.ndarray,
              bq8: np.ndarray, bd: np.ndarray, bs: np.ndarray, ycorr: np.ndarray, dyv: np.ndarray,
              out: np.ndarray) -> None:
    g, r0, r1 = _item(it, nch, rows, M)
    c0, c1, mode = gcols[g], gcols[g + 1], gmode[g]
    for r in range(r0, r1):
        ro = goff[g] + r * nb01
        c = c0
        while c + 4 <= c1:
            t0, t1, t2, t3 = _q32_cols4(fmt, mode, abuf, ro, K, bq8, bd, bs, ycorr, dyv, colb[c], colb[c + 1],
                                        colb[c + 2], colb[c + 3])
            out[colo[c] + r], out[colo[c + 1] + r] = t0, t1
            out[colo[c + 2] + r], out[colo[c + 3] + r] = t2, t3
            c += 4
        for cc in range(c, c1):
            out[colo[cc] + r] = _q32_col1(fmt, mode, abuf, ro, K, bq8, bd, bs, ycorr, dyv, colb[cc])


# --- 256-element super-blocks ------------------------------------------------------------------------

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
def _has_min(f: int) -> bool:
    return f == Q4_K or f == Q5_K or f == Q2_K


@njit(cache=True, inline="always")
def _k_tiled_step(f: int, t: np.float32, lanes: Any, mins: Any, d: np.float32, dmin: np.float32,
                  yd: np.float32) -> np.float32:
    """ggml's tiled kernel: r = d_x*S (- dmin_x*M, one FMA), acc = fma(r, d_y, acc)."""
    r = d * np.float32(isum8(lanes))
    if _has_min(f):
        r = fma_f(-dmin, np.float32(isum8(mins)), r)
    return fma_f(r, yd, t)


@njit(cache=True, inline="always")
def _k_vecdot_step(f: int, acc: Any, accm: Any, summs: np.float32, lanes: Any, mins: Any, d: np.float32,
                   dmin: np.float32, yd: np.float32) -> tuple[Any, Any, np.float32]:
    """One super-block of ggml's AVX2 vec_dot: d = d_y*d_x, dmin = -d_y*dmin_x; mins by type."""
    dd, dm = yd * d, -yd * dmin
    if f == Q2_K:
        acc = fma8_i32(acc, mins, dm)
    elif f == Q4_K:
        accm = fma4_i32(accm, mins, dm)
    elif f == Q5_K:
        summs = fma_f(dm, np.float32(isum8(mins)), summs)
    return fma8_i32(acc, lanes, dd), accm, summs


@njit(cache=True, inline="always")
def _k_vecdot_result(f: int, acc: Any, accm: Any, summs: np.float32) -> Any:
    if f == Q4_K:
        return hsum8(acc) + hsum4(accm)
    if f == Q5_K:
        return hsum8(acc) + summs
    return hsum8(acc)


@njit(cache=True, **_NO_NRT)
def _k_cols4(fmt: int, tiled: int, abuf: np.ndarray, ro: int, K: int, bq8: np.ndarray, bd: np.ndarray,
             bsum: np.ndarray, b0: int, b1: int, b2: int, b3: int) -> tuple[float, float, float, float]:
    """Weight row at byte `ro` dotted with activation rows b0..b3; each super-block decoded once."""
    f = literal_value(fmt)
    bsz = _k_bytes(f)
    G = K // 16
    a0, a1, a2, a3 = zero_f32x8(), zero_f32x8(), zero_f32x8(), zero_f32x8()
    m0, m1, m2, m3 = zero_f32x4(), zero_f32x4(), zero_f32x4(), zero_f32x4()
    t0 = t1 = t2 = t3 = np.float32(0.0)
    t4 = zero_f32x4()
    for sb in range(K // 256):
        o, e, g = ro + sb * bsz, sb * 256, sb * 16
        d, dmin = ksb_d(fmt, abuf, o)
        sc = (b0 * G + g, b1 * G + g, b2 * G + g, b3 * G + g)
        l0, l1, l2, l3 = ksb_lanes(fmt, abuf, o, bq8, bsum, (b0 * K + e, b1 * K + e, b2 * K + e, b3 * K + e), sc)
        n0, n1, n2, n3 = ksb_mins(fmt, abuf, o, bsum, sc)
        y0, y1, y2, y3 = bd[b0, sb], bd[b1, sb], bd[b2, sb], bd[b3, sb]
        if tiled:  # the four outputs' scalar updates side by side in one vector
            t4 = tiled_step4(fmt, t4, isum8x4(l0, l1, l2, l3), isum8x4(n0, n1, n2, n3), d, dmin, y0, y1, y2, y3)
        else:
            a0, m0, t0 = _k_vecdot_step(f, a0, m0, t0, l0, n0, d, dmin, y0)
            a1, m1, t1 = _k_vecdot_step(f, a1, m1, t1, l1, n1, d, dmin, y1)
            a2, m2, t2 = _k_vecdot_step(f, a2, m2, t2, l2, n2, d, dmin, y2)
            a3, m3, t3 = _k_vecdot_step(f, a3, m3, t3, l3, n3, d, dmin, y3)
    if tiled:
        return lane4(t4, 0), lane4(t4, 1), lane4(t4, 2), lane4(t4, 3)
    return (_k_vecdot_result(f, a0, m0, t0), _k_vecdot_result(f, a1, m1, t1), _k_vecdot_result(f, a2, m2, t2),
            _k_vecdot_result(f, a3, m3, t3))


@njit(cache=True, **_NO_NRT)
def _k_col1(fmt: int, tiled: int, abuf: np.ndarray, ro: int, K: int, bq8: np.ndarray, bd: np.ndarray,
            bsum: np.ndarray, b0: int) -> float:
    f = literal_value(fmt)
    bsz = _k_bytes(f)
    acc, accm, t = zero_f32x8(), zero_f32x4(), np.float32(0.0)
    for sb in range(K // 256):
        o = ro + sb * bsz
        d, dmin = ksb_d(fmt, abuf, o)
        sc = (b0 * (K // 16) + sb * 16,)
        (lanes,) = ksb_lanes(fmt, abuf, o, bq8, bsum, (b0 * K + sb * 256,), sc)
        (mins,) = ksb_mins(fmt, abuf, o, bsum, sc)
        if tiled:
            t = _k_tiled_step(f, t, lanes, mins, d, dmin, bd[b0, sb])
        else:
            acc, accm, t = _k_vecdot_step(f, acc, accm, t, lanes, mins, d, dmin, bd[b0, sb])
    return t if tiled else _k_vecdot_result(f, acc, accm, t)


@njit(cache=True, **_NO_NRT)
def _k_item(fmt: int, it: int, nch: int, rows: int, abuf: np.ndarray, nb01: int, M: int, K: int,
            goff: np.ndarray, gcols: np.ndarray, gmode: np.ndarray, colb: np.ndarray, colo: np.ndarray,
            bq8: np.ndarray, bd: np.ndarray, bsum: np.ndarray, out: np.ndarray) -> None:
    g, r0, r1 = _item(it, nch, rows, M)
    c0, c1, mode = gcols[g], gcols[g + 1], gmode[g]
    for r in range(r0, r1):
        ro = goff[g] + r * nb01
        c = c0
        while c + 4 <= c1:
            t0, t1, t2, t3 = _k_cols4(fmt, mode, abuf, ro, K, bq8, bd, bsum, colb[c], colb[c + 1], colb[c + 2],
                                      colb[c + 3])
            out[colo[c] + r], out[colo[c + 1] + r] = t0, t1
            out[colo[c + 2] + r], out[colo[c + 3] + r] = t2, t3
            c += 4
        for cc in range(c, c1):
            out[colo[cc] + r] = _k_col1(fmt, mode, abuf, ro, K, bq8, bd, bsum, colb[cc])


# --- F32 / F16 / BF16 ------------------------------------------------------------------------------------

@njit(cache=True, **_NO_NRT)
def _f_sgemm(fmt: int, abuf: np.ndarray, ro: int, K: int, bf: np.ndarray, b: int) -> float:
    """llamafile sgemm: acc = fma(a, b, acc) over 8-element steps (a zero-padded last one), hsum."""
    f = literal_value(fmt)
    esz = 4 if f == F32 else 2
    acc = zero_f32x8()
    for k in range(0, K, 8):
        n = min(8, K - k)
        acc = fma8(acc, load8_f(fmt, abuf, ro + k * esz, n), load_f32x8(bf, b * K + k, n))
    return hsum8(acc)


@njit(cache=True, **_NO_NRT)
def _f_vecdot(fmt: int, abuf: np.ndarray, ro: int, K: int, bf: np.ndarray, b: int) -> float:
    """ggml_vec_dot_f32/f16/bf16 (AVX2): four 8-lane accumulators over steps of 32, ggml's reduction, then
    the leftovers one by one (F16/BF16 in double precision)."""
    f = literal_value(fmt)
    esz = 4 if f == F32 else 2
    x0, x1, x2, x3 = zero_f32x8(), zero_f32x8(), zero_f32x8(), zero_f32x8()
    np_ = K - K % 32
    e = b * K
    for i in range(0, np_, 32):
        x0 = fma8(x0, load8_f(fmt, abuf, ro + i * esz, 8), load_f32x8(bf, e + i, 8))
        x1 = fma8(x1, load8_f(fmt, abuf, ro + (i + 8) * esz, 8), load_f32x8(bf, e + i + 8, 8))
        x2 = fma8(x2, load8_f(fmt, abuf, ro + (i + 16) * esz, 8), load_f32x8(bf, e + i + 16, 8))
        x3 = fma8(x3, load8_f(fmt, abuf, ro + (i + 24) * esz, 8), load_f32x8(bf, e + i + 24, 8))
    if f == BF16:  # (c1+c3) + (c2+c4), then hsum_float_8's tree
        res = hsum8(add8(add8(x0, x2), add8(x1, x3)))
    else:
        res = reduce_dot4(x0, x1, x2, x3)
    if f == F32:  # GCC's code for ggml's `sumf += x*y` leftovers: runs of 8, then of 4, with the products
        i = np_   # rounded before the (in-order) adds; the last 1-3 with FMA
        while K - i >= 8:
            for j in range(i, i + 8):
                res += load_f(fmt, abuf, ro + j * esz) * bf[e + j]
            i += 8
        if K - i >= 4:
            for j in range(i, i + 4):
                res += load_f(fmt, abuf, ro + j * esz) * bf[e + j]
            i += 4
        for j in range(i, K):
            res = fma_f(load_f(fmt, abuf, ro + j * esz), bf[e + j], res)
        return res
    total = np.float64(res)
    for i in range(np_, K):
        total += np.float64(load_f(fmt, abuf, ro + i * esz) * bf[e + i])
    return np.float32(total)


@njit(cache=True, **_NO_NRT)
def _f_item(fmt: int, it: int, nch: int, rows: int, abuf: np.ndarray, nb01: int, M: int, K: int,
            goff: np.ndarray, gcols: np.ndarray, gmode: np.ndarray, colb: np.ndarray, colo: np.ndarray,
            bf: np.ndarray, out: np.ndarray) -> None:
    g, r0, r1 = _item(it, nch, rows, M)
    c0, c1, mode = gcols[g], gcols[g + 1], gmode[g]
    for r in range(r0, r1):
        ro = goff[g] + r * nb01
        for c in range(c0, c1):
            if mode:
                out[colo[c] + r] = _f_sgemm(fmt, abuf, ro, K, bf, colb[c])
            else:
                out[colo[c] + r] = _f_vecdot(fmt, abuf, ro, K, bf, colb[c])


# --- drains: a thread pulls work items from counter[0] until none is left; counter[1] counts the
# finished ones (the caller waits for all of them). `post` (empty for helpers) gets its job number
# bumped first: see threads.py --------------------------------------------------------------------

@njit(cache=True, nogil=True, **_NO_NRT)
def q32_drain(fmt: int, post: np.ndarray, counter: np.ndarray, nitems: int, nch: int, rows: int,
              abuf: np.ndarray, nb01: int, M: int, K: int, goff: np.ndarray, gcols: np.ndarray,
              gmode: np.ndarray, colb: np.ndarray, colo: np.ndarray, bq8: np.ndarray, bd: np.ndarray,
              bs: np.ndarray, ycorr: np.ndarray, dyv: np.ndarray, out: np.ndarray) -> None:
    if post.shape[0]:  # the caller announces the job to polling helpers with the GIL already released
        atomic_add(post, 0, 1)
    while True:
        it = atomic_next(counter)
        if it >= nitems:
            return
        _q32_item(fmt, it, nch, rows, abuf, nb01, M, K, goff, gcols, gmode, colb, colo, bq8, bd, bs, ycorr, dyv,
                  out)
        atomic_add(counter, 1, 1)


@njit(cache=True, nogil=True, **_NO_NRT)
def k_drain(fmt: int, post: np.ndarray, counter: np.ndarray, nitems: int, nch: int, rows: int,
            abuf: np.ndarray, nb01: int, M: int, K: int, goff: np.ndarray, gcols: np.ndarray,
            gmode: np.ndarray, colb: np.ndarray, colo: np.ndarray, bq8: np.ndarray, bd: np.ndarray,
            bsum: np.ndarray, out: np.ndarray) -> None:
    if post.shape[0]:
        atomic_add(post, 0, 1)
    while True:
        it = atomic_next(counter)
        if it >= nitems:
            return
        _k_item(fmt, it, nch, rows, abuf, nb01, M, K, goff, gcols, gmode, colb, colo, bq8, bd, bsum, out)
        atomic_add(counter, 1, 1)


@njit(cache=True, nogil=True, **_NO_NRT)
def f_drain(fmt: int, post: np.ndarray, counter: np.ndarray, nitems: int, nch: int, rows: int,
            abuf: np.ndarray, nb01: int, M: int, K: int, goff: np.ndarray, gcols: np.ndarray,
            gmode: np.ndarray, colb: np.ndarray, colo: np.ndarray, bf: np.ndarray, out: np.ndarray) -> None:
    if post.shape[0]:
        atomic_add(post, 0, 1)
    while True:
        it = atomic_next(counter)
        if it >= nitems:
            return
        _f_item(fmt, it, nch, rows, abuf, nb01, M, K, goff, gcols, gmode, colb, colo, bf, out)
        atomic_add(counter, 1, 1)
