"""1- and 2-bit / ternary formats: Q1_0 (128 el., 18 B), Q2_0 (64 el., 18 B), TQ1_0 and TQ2_0 (256 el.).

Layouts (ggml-common.h, own description):
* Q1_0: d f16 @0, qs[16] @2; bit j (little-endian bit order) set -> +d, else -d.
* Q2_0: d f16 @0, qs[16] @2; 2-bit q_j at bits 2(j%4) of qs[j/4]; y = (q - 1)*d.
* TQ2_0: qs[64] @0, d f16 @64; for half h, shift l, lane m: q = (qs[32h+m] >> 2l) & 3 is element
  128h + 32l + m; y = (q - 1)*d.
* TQ1_0: qs[48] @0, qh[4] @48, d f16 @52; base-3 digits packed 5 per byte (4 per qh byte) as
  fixed-point fractions: digit n of byte b is ((b*3^n mod 256) * 3) >> 8. Elements: the first 32 bytes
  give 5x32 (digit-major), the next 16 bytes 5x16, qh gives 4x4; y = (digit - 1)*d.
"""
from __future__ import annotations

import numpy as np

from ..ggml.types import GGMLType
from ._common import bits_little, f16_field, put_f16, roundf, safe_recip

_LUT_Q2 = np.array([-1, 0, 1, 2], np.float32)
_POW3 = np.array([1, 3, 9, 27, 81, 243], np.uint32)
# _TRITS[b, n] = digit n of byte b, as float (q - 1)
_TRITS = ((((np.arange(256, dtype=np.uint32)[:, None] * _POW3[None, :5]) & 0xFF) * 3 >> 8).astype(np.float32)
          - np.float32(1))


def dequantize_q1_0(b: np.ndarray) -> np.ndarray:
    d = f16_field(b, 0)
    return np.where(bits_little(b[:, 2:18]).astype(bool), d, -d)


def dequantize_q2_0(b: np.ndarray) -> np.ndarray:
    n = b.shape[0]
    q = (b[:, 2:18, None] >> np.array([0, 2, 4, 6], np.uint8)) & 3          # (N, 16 bytes, 4) = element order
    return np.take(_LUT_Q2, q.reshape(n, 64)) * f16_field(b, 0)


def dequantize_tq2_0(b: np.ndarray) -> np.ndarray:
    n = b.shape[0]
    qs = b[:, 0:64].reshape(n, 2, 1, 32)
    q = (qs >> np.array([0, 2, 4, 6], np.uint8)[None, None, :, None]) & 3    # (half, l, lane)
    return np.take(_LUT_Q2, q.reshape(n, 256)) * f16_field(b, 64)


def dequantize_tq1_0(b: np.ndarray) -> np.ndarray:
    n = b.shape[0]
    parts = [
        _TRITS[b[:, 0:32]].transpose(0, 2, 1).reshape(n, 160),             # digit-major over 32 bytes
        _TRITS[b[:, 32:48]].transpose(0, 2, 1).reshape(n, 80),
        _TRITS[b[:, 48:52]][:, :, :4].transpose(0, 2, 1).reshape(n, 16),
    ]
    return np.concatenate(parts, axis=1) * f16_field(b, 52)


LOWBIT_DEQUANT = {GGMLType.Q1_0: dequantize_q1_0, GGMLType.Q2_0: dequantize_q2_0,
                  GGMLType.TQ1_0: dequantize_tq1_0, GGMLType.TQ2_0: dequantize_tq2_0}


# ---------------------------------------------------------------- reference quantizers (ggml-base)

def quantize_q1_0(x: np.ndarray) -> np.ndarray:
    """quantize_row_q1_0_ref: d = Σ|x|/128 (summed in order, float32), bit = x >= 0."""
    s = np.zeros(x.shape[0], np.float32)
    ax = np.abs(x)
    for j in range(x.shape[1]):
        s += ax[:, j]
    out = np.empty((x.shape[0], 18), np.uint8)
    put_f16(out, 0, s / np.float32(128))
    out[:, 2:] = np.packbits(x >= 0, axis=1, bitorder="little")
    return out


def _amax_scale(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    d = np.abs(x).max(axis=1, keepdims=True)
    return d, safe_recip(d)


def quantize_q2_0(x: np.ndarray) -> np.ndarray:
    """quantize_row_q2_0_ref: d = amax, q = clamp(roundf(x/d) + 1, 0, 3)."""
    d, idv = _amax_scale(x)
    q = np.clip(roundf(x * idv) + 1, 0, 3).astype(np.uint8).reshape(x.shape[0], 16, 4)
    out = np.empty((x.shape[0], 18), np.uint8)
    put_f16(out, 0, d)
    out[:, 2:] = np.bitwise_or.reduce(q << np.array([0, 2, 4, 6], np.uint8), axis=2)
    return out


def quantize_tq2_0(x: np.ndarray) -> np.ndarray:
    """quantize_row_tq2_0_ref: d = amax, trit = lroundf(x/d) + 1 in 2 bits."""
    n = x.shape[0]
    d, idv = _amax_scale(x)
    q = (roundf(x * idv) + 1).astype(np.int32).astype(np.uint8) & 3
    q = q.reshape(n, 2, 4, 32) << np.array([0, 2, 4, 6], np.uint8)[None, None, :, None]
    out = np.empty((n, 66), np.uint8)
    out[:, 0:64] = np.bitwise_or.reduce(q, axis=2).reshape(n, 64)
    put_f16(out, 64, d)
    return out


def _pack_trits(t: np.ndarray) -> np.ndarray:
    """Digits (N, k, 5) (most significant first) -> bytes ceil(value * 256 / 243), uint8 (N, k)."""
    v = np.zeros(t.shape[:2], np.uint32)
    for i in range(t.shape[2]):
        v = (v * 3 + t[:, :, i]) & 0xFF    # the C accumulates in a uint8
    return ((v * 256 + 242) // 243).astype(np.uint8)


def quantize_tq1_0(x: np.ndarray) -> np.ndarray:
    """quantize_row_tq1_0_ref: d = amax, trits lroundf(x/d) + 1 packed 5 per byte (4 per qh byte)."""
    n = x.shape[0]
    d, idv = _amax_scale(x)
    t = (roundf(x * idv) + 1).astype(np.int32).astype(np.uint32)
    out = np.empty((n, 54), np.uint8)
    out[:, 0:32] = _pack_trits(t[:, 0:160].reshape(n, 5, 32).transpose(0, 2, 1))
    out[:, 32:48] = _pack_trits(t[:, 160:240].reshape(n, 5, 16).transpose(0, 2, 1))
    qh = t[:, 240:256].reshape(n, 4, 4).transpose(0, 2, 1)                    # 4 trits, then one 0
    out[:, 48:52] = _pack_trits(np.concatenate([qh, np.zeros((n, 4, 1), np.uint32)], axis=2))
    put_f16(out, 52, d)
    return out


LOWBIT_QUANT = {GGMLType.Q1_0: quantize_q1_0, GGMLType.Q2_0: quantize_q2_0,
                GGMLType.TQ1_0: quantize_tq1_0, GGMLType.TQ2_0: quantize_tq2_0}
