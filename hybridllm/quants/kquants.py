"""K-quants: 256-element super-blocks Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, and the activation format Q8_K.

Dequantizers mirror ggml-base's `dequantize_row_*` float operation order (e.g. Q4_K is
`(d*sc)*q - dmin*m`, Q6_K `(d*sc)*q`), so they are bit-exact. Element index maps are built with
reshapes: an element is addressed as (half, group, ..., lane) exactly like the C loops nest.
The Q8_K quantizer is ggml-base's `quantize_row_q8_K_ref`, which the x86 CPU backend calls directly.
"""
from __future__ import annotations

import numpy as np

from ..ggml.types import GGMLType
from ._common import F32, decode_pairs, f16_field, f32_field, pair_lut

_SHIFT2 = np.array([0, 2, 4, 6], dtype=np.uint8)
_LUT_U4 = pair_lut(np.arange(16))


def dequantize_q2_k(b: np.ndarray) -> np.ndarray:
    n = b.shape[0]
    sc = b[:, 0:16].reshape(n, 2, 4, 2)                      # (half, j, group)
    d, dmin = f16_field(b, 80)[:, :, None, None], f16_field(b, 82)[:, :, None, None]
    dl = (d * (sc & 0x0F))[..., None]
    ml = (dmin * (sc >> 4))[..., None]
    qs = b[:, 16:80].reshape(n, 2, 1, 2, 16)                 # (half, -, group, lane)
    q = (qs >> _SHIFT2[None, None, :, None, None]) & 3       # (half, j, group, lane)
    return (dl * q - ml).reshape(n, 256)


def q3_k_scales(raw: np.ndarray) -> np.ndarray:
    """The 16 signed 6-bit scales of Q3_K blocks (12 bytes each), int8 (N, 16), already minus 32."""
    low = np.concatenate([raw[:, 0:8] & 0x0F, raw[:, 0:8] >> 4], axis=1)        # i < 8: lo(b[i]), else hi(b[i-8])
    hb = raw[:, 8:12]
    high = np.concatenate([(hb >> s) & 3 for s in (0, 2, 4, 6)], axis=1)        # (b[8 + i%4] >> 2*(i//4)) & 3
    return (low | (high << 4)).view(np.int8) - np.int8(32)


def dequantize_q3_k(b: np.ndarray) -> np.ndarray:
    n = b.shape[0]
    d = f16_field(b, 108)[:, :, None, None]
    dl = (d * q3_k_scales(b[:, 96:108]).reshape(n, 2, 4, 2))[..., None]         # (half, j, group)
    q2 = (b[:, 32:96].reshape(n, 2, 1, 2, 16) >> _SHIFT2[None, None, :, None, None]) & 3
    # bit (4*half + j) of hmask[16*group + lane]
    hm = np.unpackbits(b[:, 0:32], axis=1, bitorder="little").reshape(n, 2, 16, 2, 4)  # (group, lane, half, j)
    hm = hm.transpose(0, 3, 4, 1, 2)                                                  # (half, j, group, lane)
    q = q2.view(np.int8) - np.int8(4) * (1 - hm).view(np.int8)
    return (dl * q).reshape(n, 256)


def k4_scales_mins(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 8 six-bit scales and 8 six-bit mins of Q4_K/Q5_K (12 packed bytes), uint8 (N, 8) each."""
    sc = np.empty((raw.shape[0], 8), np.uint8)
    mn = np.empty((raw.shape[0], 8), np.uint8)
    sc[:, :4] = raw[:, 0:4] & 63
    mn[:, :4] = raw[:, 4:8] & 63
    sc[:, 4:] = (raw[:, 8:12] & 0x0F) | ((raw[:, 0:4] >> 6) << 4)
    mn[:, 4:] = (raw[:, 8:12] >> 4) | ((raw[:, 4:8] >> 6) << 4)
    return sc, mn


def _k4_affine(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(d*sc, dmin*m) per 32-element sub-block, float32 (N, 4, 2, 1) as (pair, nibble, -)."""
    n = b.shape[0]
    sc, mn = k4_scales_mins(b[:, 4:16])
    d, dmin = f16_field(b, 0), f16_field(b, 2)
    return (d * sc).reshape(n, 4, 2, 1), (dmin * mn).reshape(n, 4, 2, 1)


def _nibble_pairs(qs: np.ndarray) -> np.ndarray:
    """(N, 128) bytes -> (N, 4, 2, 32): for 64-element pair p, low nibbles then high nibbles."""
    n = qs.shape[0]
    q = qs.reshape(n, 4, 1, 32)
    out = np.empty((n, 4, 2, 32), np.uint8)
    np.bitwise_and(q[:, :, 0], 0x0F, out=out[:, :, 0])
    np.right_shift(q[:, :, 0], 4, out=out[:, :, 1])
    return out


def dequantize_q4_k(b: np.ndarray) -> np.ndarray:
    n = b.shape[0]
    d1, m1 = _k4_affine(b)
    y = decode_pairs(_LUT_U4, b[:, 16:144].reshape(n, 4, 32), d1)            # (d*sc) * q
    y -= m1
    return y.reshape(n, 256)


def dequantize_q5_k(b: np.ndarray) -> np.ndarray:
    n = b.shape[0]
    d1, m1 = _k4_affine(b)
    q = _nibble_pairs(b[:, 48:176])
    # bit (2p + nibble) of qh[lane] is the fifth bit
    qh = np.unpackbits(b[:, 16:48], axis=1, bitorder="little").reshape(n, 32, 4, 2).transpose(0, 2, 3, 1)
    q |= qh << 4
    return (d1 * q - m1).reshape(n, 256)


def dequantize_q6_k(b: np.ndarray) -> np.ndarray:
    n = b.shape[0]
    ql = b[:, 0:128].reshape(n, 2, 1, 2, 32)                     # (half, -, ql half, lane)
    low = np.concatenate([ql & 0x0F, ql >> 4], axis=2)           # (half, nibble, ql half, lane) = (half, c, lane)
    qh = b[:, 128:192].reshape(n, 2, 1, 32)
    high = (qh >> _SHIFT2[None, None, :, None]) & 3              # (half, c, lane)
    q = (low.reshape(n, 2, 4, 32) | (high << 4)).view(np.int8) - np.int8(32)
    d = f16_field(b, 208)[:, :, None, None]
    ds = (d * b[:, 192:208].view(np.int8).reshape(n, 2, 4, 2))[..., None]   # scale 8h + 2c + lane//16
    return (ds * q.reshape(n, 2, 4, 2, 16)).reshape(n, 256)


def dequantize_q8_k(b: np.ndarray) -> np.ndarray:
    return f32_field(b, 0) * b[:, 4:260].view(np.int8)


def quantize_q8_k(x: np.ndarray) -> np.ndarray:
    """ggml `quantize_row_q8_K_ref`: iscale = -127/max, q = min(127, rne(iscale*x)), d = 1/iscale.

    All-zero blocks get d = 0, qs = 0 and bsums = 0 (ggml leaves bsums unwritten there).
    """
    n = x.shape[0]
    ax = np.abs(x)
    idx = ax.argmax(axis=1)[:, None]                  # first largest |x|, as the `ax > amax` scan keeps
    mx = np.take_along_axis(x, idx, axis=1)
    zero = np.take_along_axis(ax, idx, axis=1) == 0
    with np.errstate(divide="ignore", over="ignore"):
        iscale = (F32(-127) / np.where(zero, F32(1), mx)).astype(np.float32)
        d = np.where(zero, F32(0), F32(1) / iscale).astype(np.float32)
    v = np.rint(iscale * x)                          # nearest_int() is round-half-even
    # A subnormal max overflows iscale to -inf; nearest_int's bit trick then yields 0 for inf/NaN.
    v = np.where(np.isfinite(v), v, F32(0))
    q = np.minimum(v, 127).astype(np.int8)
    q[zero[:, 0]] = 0
    out = np.empty((n, 292), np.uint8)
    out[:, 0:4] = d.view(np.uint8)
    out[:, 4:260] = q.view(np.uint8)
    out[:, 260:292] = q.reshape(n, 16, 16).sum(axis=2, dtype=np.int16).astype("<i2").view(np.uint8)
    return out


KQUANT_DEQUANT = {
    GGMLType.Q2_K: dequantize_q2_k, GGMLType.Q3_K: dequantize_q3_k, GGMLType.Q4_K: dequantize_q4_k,
    GGMLType.Q5_K: dequantize_q5_k, GGMLType.Q6_K: dequantize_q6_k, GGMLType.Q8_K: dequantize_q8_k,
}
KQUANT_QUANT = {GGMLType.Q8_K: quantize_q8_k}
