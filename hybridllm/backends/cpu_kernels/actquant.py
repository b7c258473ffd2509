# mypy: disable-error-code="call-arg,var-annotated"
# (numba intrinsics are called without their typing-context parameter)
"""MUL_MAT activations (src1 rows) converted to the weight's vec_dot type, bit-exact with ggml's x86 CPU
backend, into an unpacked form the kernels read directly: q as flat int8 [C*K], scales as float32 [C, blocks].

* Q8_0 / Q8_1 (ggml's AVX2 `quantize_row_q8_0/1`): per 32 values amax = max|x|, d = amax/127,
  id = 127/amax (0 if amax = 0), q = round-half-even(x*id); d is stored as F16; Q8_1 adds
  s = F16(d * sum(q)) with the unrounded d. Output: q, F16-rounded d and s.
* Q8_K (`quantize_row_q8_K_ref`): per 256 values, max = the first value of largest |x|,
  iscale = -127/max, q = min(127, round-half-even(iscale*x)), d = 1/iscale (float32), and the sums of
  each 16 q (bsums). All-zero block: d = 0, q = 0.
* F16 / BF16: round to nearest even (BF16 NaNs forced quiet); F32 and widened F16/BF16 are exact.

Each activation row c starts at byte `boff[c]` of the uint8 buffer `bbuf` (rows are contiguous in K).
"""
from __future__ import annotations

import numpy as np
from numba import njit

from ...ggml.types import GGMLType
from .decode import load_f
from .simd import f16_bits_to_f32, f32_bits, f32_from_bits, f32_to_f16_bits

_F32 = 0  # GGMLType.F32 as a literal for load_f


@njit(cache=True, inline="always")
def _round_f16(x: np.float32) -> np.float32:
    return f16_bits_to_f32(f32_to_f16_bits(x))


@njit(cache=True, inline="always")
def _round_bf16(x: np.float32) -> np.float32:
    u = f32_bits(x)
    if (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
        return f32_from_bits((u >> np.uint32(16) | np.uint32(64)) << np.uint32(16))
    r = (u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)
    return f32_from_bits(r << np.uint32(16))


@njit(cache=True, inline="always")
def _to_int8(v: np.float32) -> int:
    """cvtps_epi32 + saturating packs: NaN and overflow give -128 as on x86."""
    if not (v > -128.5) or v >= 128.0:
        return 127 if v >= 128.0 else -128
    return int(v)


@njit(cache=True)
def quantize_q8_0(bbuf: np.ndarray, boff: np.ndarray, K: int, offset: int, bq8: np.ndarray, bd: np.ndarray,
                  bs: np.ndarray, ycorr: np.ndarray, dyv: np.ndarray) -> None:
    """Rows -> Q8_0 (bq8 int8, bd) plus the Q8_1 sums bs (ggml's AVX2 quantizers; Q8_1 has
    the same q and d). For the byte kernels, per block also the 8 sums of 4 consecutive q times -offset
    (ycorr, int32; `offset` is what the weight type adds to make its values unsigned) and 8 copies of d
    (dyv)."""
    c127 = np.float32(127.0)
    for c in range(boff.shape[0]):
        for blk in range(K // 32):
            o = boff[c] + blk * 128
            amax = np.float32(0.0)
            for k in range(32):
                a = abs(load_f(_F32, bbuf, o + 4 * k))
                amax = max(amax, a)
            d = amax / c127
            inv = c127 / amax if amax != 0 else np.float32(0.0)
            total = 0
            for k in range(32):
                q = _to_int8(np.rint(load_f(_F32, bbuf, o + 4 * k) * inv))
                bq8[c * K + blk * 32 + k] = q
                total += q
            bd[c, blk] = _round_f16(d)
            bs[c, blk] = _round_f16(d * np.float32(total))
            v = (c * (K // 32) + blk) * 8
            for k in range(8):
                e = c * K + blk * 32 + 4 * k
                ycorr[v + k] = -offset * (np.int32(bq8[e]) + bq8[e + 1] + bq8[e + 2] + bq8[e + 3])
                dyv[v + k] = bd[c, blk]


@njit(cache=True)
def quantize_q8_k(bbuf: np.ndarray, boff: np.ndarray, K: int, bq8: np.ndarray, bd: np.ndarray,
                  bsum: np.ndarray) -> None:
    """Rows -> Q8_K (q as int8, d float32, int16 bsums: 16 per super-block, flat like q)."""
    for c in range(boff.shape[0]):
        for sb in range(K // 256):
            o = boff[c] + sb * 1024
            amax = np.float32(0.0)
            vmax = np.float32(0.0)
            for k in range(256):
                v = load_f(_F32, bbuf, o + 4 * k)
                if abs(v) > amax:
                    amax = abs(v)
                    vmax = v
            if amax == 0:
                bd[c, sb] = 0.0
                for k in range(256):
                    bq8[c * K + sb * 256 + k] = 0
                for g in range(16):
                    bsum[c * (K // 16) + sb * 16 + g] = 0
                continue
            iscale = np.float32(-127.0) / vmax
            for g in range(16):
                total = 0
                for k in range(g * 16, g * 16 + 16):
                    q = min(127, _to_int8(np.rint(iscale * load_f(_F32, bbuf, o + 4 * k))))
                    bq8[c * K + sb * 256 + k] = q
                    total += q
                bsum[c * (K // 16) + sb * 16 + g] = total
            bd[c, sb] = np.float32(1.0) / iscale


@njit(cache=True, inline="always")
def _load_any(fmt: int, buf: np.ndarray, off: int) -> np.float32:
    if fmt == GGMLType.F16:
        return load_f(1, buf, off)
    if fmt == GGMLType.BF16:
        return load_f(30, buf, off)
    return load_f(0, buf, off)


@njit(cache=True)
def convert_float(fmt_a: int, fmt_b: int, bbuf: np.ndarray, boff: np.ndarray, K: int, bf: np.ndarray) -> None:
    """Rows stored as `fmt_b` (F32/F16/BF16) -> float32 values of weight type `fmt_a`'s vec_dot type."""
    size = 4 if fmt_b == GGMLType.F32 else 2
    to_f16 = fmt_a == GGMLType.F16 and fmt_b == GGMLType.F32
    to_bf16 = fmt_a == GGMLType.BF16 and fmt_b == GGMLType.F32
    for c in range(boff.shape[0]):
        o = boff[c]
        for k in range(K):
            v = _load_any(fmt_b, bbuf, o + size * k)
            if to_f16:
                v = _round_f16(v)
            elif to_bf16:
                v = _round_bf16(v)
            bf[c * K + k] = v
