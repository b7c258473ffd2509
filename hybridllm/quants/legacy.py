"""The 32-element block formats Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1 (quant-formats.md).

Dequantizers follow ggml-base's `dequantize_row_*` operation by operation (float32, no FMA).

Quantizers are the ones ggml's CPU backend runs as `from_float` (matmul activations, CPY, SET_ROWS):
* Q4_0/Q4_1/Q5_0/Q5_1: ggml-base's `quantize_row_*_ref` (truncating `(int8_t)(x + 8.5f)` style rounding).
* Q8_0/Q8_1: ggml-cpu's x86 AVX/AVX2 `quantize_row_q8_0/q8_1`, which is what the peer wheel runs
  (checked in its disassembly: `vroundps $0`): `id = 127/amax` (not `1/(amax/127)`) and round to nearest
  even. The portable reference (`id = 1/d`, `roundf` half away from zero) is kept as
  `quantize_q8_0_ref`; it is what `gguf.quants` and model-file writers produce.
"""
from __future__ import annotations

import numpy as np

from ..ggml.types import GGMLType
from ._common import (F32, bits_little, decode_pairs, f16_field, first_absmax, nibbles_pack, nibbles_split,
                      pair_lut, put_f16, roundf, safe_recip)


# ---------------------------------------------------------------- dequantize

_LUT_Q4_0 = pair_lut(np.arange(16) - 8)   # (q - 8) as float: exact, so (q-8)*d is bit-identical
_LUT_U4 = pair_lut(np.arange(16))


def dequantize_q4_0(b: np.ndarray) -> np.ndarray:
    return decode_pairs(_LUT_Q4_0, b[:, 2:18], f16_field(b, 0)[:, :, None]).reshape(-1, 32)


def dequantize_q4_1(b: np.ndarray) -> np.ndarray:
    y = decode_pairs(_LUT_U4, b[:, 4:20], f16_field(b, 0)[:, :, None]).reshape(-1, 32)
    y += f16_field(b, 2)
    return y


def _q5(b: np.ndarray, qh_off: int) -> np.ndarray:
    """The 5-bit values (0..31) of Q5_0/Q5_1 blocks, uint8 (N, 32)."""
    q = nibbles_split(b[:, qh_off + 4:qh_off + 20])
    q |= bits_little(b[:, qh_off:qh_off + 4]) << 4
    return q


def dequantize_q5_0(b: np.ndarray) -> np.ndarray:
    d = f16_field(b, 0)
    return (_q5(b, 2).view(np.int8) - np.int8(16)) * d


def dequantize_q5_1(b: np.ndarray) -> np.ndarray:
    d, m = f16_field(b, 0), f16_field(b, 2)
    return _q5(b, 4) * d + m


def dequantize_q8_0(b: np.ndarray) -> np.ndarray:
    return b[:, 2:34].view(np.int8) * f16_field(b, 0)


def dequantize_q8_1(b: np.ndarray) -> np.ndarray:
    return b[:, 4:36].view(np.int8) * f16_field(b, 0)


# ---------------------------------------------------------------- reference quantizers (ggml-base)

def _trunc_u8(v: np.ndarray) -> np.ndarray:
    """C's `(int8_t)` / `(uint8_t)` of a float that is known to be in [0, 256): truncation."""
    return np.trunc(v).astype(np.int32).astype(np.uint8)


def _symmetric_scale(x: np.ndarray, div: float) -> tuple[np.ndarray, np.ndarray]:
    """d = max / div (max = signed value of largest magnitude), id = d ? 1/d : 0."""
    _, mx = first_absmax(x)
    d = (mx / F32(div)).astype(np.float32)
    return d, safe_recip(d)


def quantize_q4_0(x: np.ndarray) -> np.ndarray:
    d, idv = _symmetric_scale(x, -8.0)
    q = np.minimum(_trunc_u8(x * idv + F32(8.5)), 15)
    out = np.empty((x.shape[0], 18), np.uint8)
    put_f16(out, 0, d)
    out[:, 2:] = nibbles_pack(q)
    return out


def _asymmetric_scale(x: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # The first extreme element, as ggml's `v < min` / `v > max` scan keeps it (this fixes the sign
    # of zero when -0.0 and 0.0 are both present, which reaches the stored f16 d and m).
    mn = np.take_along_axis(x, x.argmin(axis=1)[:, None], axis=1)
    mx = np.take_along_axis(x, x.argmax(axis=1)[:, None], axis=1)
    d = ((mx - mn) / F32(levels)).astype(np.float32)
    return d, safe_recip(d), mn


def quantize_q4_1(x: np.ndarray) -> np.ndarray:
    d, idv, mn = _asymmetric_scale(x, 15)
    q = np.minimum(_trunc_u8((x - mn) * idv + F32(0.5)), 15)
    out = np.empty((x.shape[0], 20), np.uint8)
    put_f16(out, 0, d)
    put_f16(out, 2, mn)
    out[:, 4:] = nibbles_pack(q)
    return out


def _pack_q5(out: np.ndarray, off: int, q: np.ndarray) -> None:
    """Write qh (bit 4 of each value, u32) at `off` and the low nibbles right after it."""
    out[:, off:off + 4] = np.packbits((q >> 4) & 1, axis=1, bitorder="little")
    out[:, off + 4:off + 20] = nibbles_pack(q & 0x0F)


def quantize_q5_0(x: np.ndarray) -> np.ndarray:
    d, idv = _symmetric_scale(x, -16.0)
    q = np.minimum(_trunc_u8(x * idv + F32(16.5)), 31)
    out = np.empty((x.shape[0], 22), np.uint8)
    put_f16(out, 0, d)
    _pack_q5(out, 2, q)
    return out


def quantize_q5_1(x: np.ndarray) -> np.ndarray:
    d, idv, mn = _asymmetric_scale(x, 31)
    q = _trunc_u8((x - mn) * idv + F32(0.5))  # no clamp in ggml; only the low 5 bits are stored
    out = np.empty((x.shape[0], 24), np.uint8)
    put_f16(out, 0, d)
    put_f16(out, 2, mn)
    _pack_q5(out, 4, q)
    return out


def quantize_q8_0_ref(x: np.ndarray) -> np.ndarray:
    """ggml-base `quantize_row_q8_0_ref`: id = 1/d, roundf (half away from zero)."""
    amax = np.abs(x).max(axis=1, keepdims=True)
    d = (amax / F32(127)).astype(np.float32)
    v = x * safe_recip(d)
    q = roundf(v)
    out = np.empty((x.shape[0], 34), np.uint8)
    put_f16(out, 0, d)
    out[:, 2:] = q.astype(np.int8).view(np.uint8)
    return out


# ---------------------------------------------------------------- activation quantizers (ggml-cpu x86)

def _q8_simd(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(d, qs int32, bad) as the AVX2 loop computes them: d = amax/127, q = rne(x * (127/amax)).

    `bad` marks blocks whose id overflowed (subnormal amax)."""
    amax = np.abs(x).max(axis=1, keepdims=True)
    d = (amax / F32(127)).astype(np.float32)
    nz = amax != 0
    with np.errstate(divide="ignore", over="ignore"):
        idv = np.where(nz, F32(127) / np.where(nz, amax, F32(1)), F32(0)).astype(np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        q = np.clip(np.rint(x * idv), -128, 127).astype(np.int32)
    # A subnormal amax overflows id to inf: vcvtps2dq then yields INT_MIN, saturated to -128.
    bad = ~np.isfinite(idv[:, 0])
    if bad.any():
        q[bad] = -128
    return d, q, bad


def quantize_q8_0(x: np.ndarray) -> np.ndarray:
    d, q, _ = _q8_simd(x)
    out = np.empty((x.shape[0], 34), np.uint8)
    put_f16(out, 0, d)
    out[:, 2:] = q.astype(np.int8).view(np.uint8)
    return out


def quantize_q8_1(x: np.ndarray) -> np.ndarray:
    d, q, bad = _q8_simd(x)
    out = np.empty((x.shape[0], 36), np.uint8)
    put_f16(out, 0, d)
    # s = fp16(d * sum(q)) with the unrounded float32 d, as both the AVX and the scalar code do. The AVX
    # code sums the int32 lanes before saturation: 32 x INT_MIN of a bad block wraps to 0.
    sums = q.sum(axis=1, keepdims=True)
    sums[bad] = 0
    put_f16(out, 2, d * sums.astype(np.float32))
    out[:, 4:] = q.astype(np.int8).view(np.uint8)
    return out


LEGACY_DEQUANT = {
    GGMLType.Q4_0: dequantize_q4_0, GGMLType.Q4_1: dequantize_q4_1, GGMLType.Q5_0: dequantize_q5_0,
    GGMLType.Q5_1: dequantize_q5_1, GGMLType.Q8_0: dequantize_q8_0, GGMLType.Q8_1: dequantize_q8_1,
}
LEGACY_QUANT = {
    GGMLType.Q4_0: quantize_q4_0, GGMLType.Q4_1: quantize_q4_1, GGMLType.Q5_0: quantize_q5_0,
    GGMLType.Q5_1: quantize_q5_1, GGMLType.Q8_0: quantize_q8_0, GGMLType.Q8_1: quantize_q8_1,
}
