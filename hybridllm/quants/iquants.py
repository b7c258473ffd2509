"""Non-linear 4-bit formats: IQ4_NL, IQ4_XS (table `kvalues_iq4nl`) and the FP4 formats MXFP4, NVFP4.

Dequantizers are bit-exact with ggml-base. The IQ4_NL quantizer is ggml's `quantize_row_iq4_nl_ref`
(used by CPY/SET_ROWS into IQ4_NL caches): with no importance weights and `ntry = -1` it is a single
pass — scale guess `max/-127`, nearest table index, then the least-squares scale
`d = Σw·q·x / Σw·q²` with w = x², summed in element order in float32 as the C loop does.
"""
from __future__ import annotations

import numpy as np

from ..ggml.types import GGMLType
from ._common import F32, decode_pairs, f16_field, first_absmax, nibbles_pack, pair_lut, put_f16, u16_field

KVALUES_IQ4NL = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.int8)
KVALUES_MXFP4 = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], np.int8)
_KV_IQ4_F32 = KVALUES_IQ4NL.astype(np.float32)
_KV_FP4_F32 = KVALUES_MXFP4.astype(np.float32)
GROUP_MAX_EPS = F32(1e-15)


def e8m0_to_f32_half(e: np.ndarray) -> np.ndarray:
    """ggml_e8m0_to_fp32_half: 2^(e-128) as float32 bits (e = 0, 1 give the denormals 2^-128, 2^-127)."""
    e = e.astype(np.uint32)
    bits = np.where(e < 2, np.uint32(0x00200000) << e, (e - 1) << 23).astype(np.uint32)
    return bits.view(np.float32)


def _ue4m3_table() -> np.ndarray:
    """ggml_ue4m3_to_fp32 for all 256 byte values (the value already halved; sign bit ignored)."""
    x = np.arange(256)
    exp, man = (x >> 3) & 0xF, x & 7
    raw = np.where(exp == 0, np.ldexp(man.astype(np.float32), -9),
                   np.ldexp(F32(1) + man.astype(np.float32) / F32(8), exp - 7)).astype(np.float32)
    val = (raw * F32(0.5)).astype(np.float32)
    val[(x == 0) | (x == 0x7F)] = 0
    return val


UE4M3_HALF = _ue4m3_table()


_LUT_IQ4 = pair_lut(KVALUES_IQ4NL)
_LUT_FP4 = pair_lut(KVALUES_MXFP4)


def dequantize_iq4_nl(b: np.ndarray) -> np.ndarray:
    return decode_pairs(_LUT_IQ4, b[:, 2:18], f16_field(b, 0)[:, :, None]).reshape(-1, 32)


def iq4_xs_scales(b: np.ndarray) -> np.ndarray:
    """The 8 six-bit sub-block scales of IQ4_XS blocks minus 32, int32 (N, 8)."""
    lo = np.empty((b.shape[0], 8), np.uint8)
    lo[:, 0::2] = b[:, 4:8] & 0x0F
    lo[:, 1::2] = b[:, 4:8] >> 4
    sh = u16_field(b, 2).astype(np.int32)                                      # (N, 1)
    hi = (sh >> (2 * np.arange(8, dtype=np.int32))) & 3
    return (lo.astype(np.int32) | (hi << 4)) - 32


def dequantize_iq4_xs(b: np.ndarray) -> np.ndarray:
    n = b.shape[0]
    dl = f16_field(b, 0) * iq4_xs_scales(b).astype(np.float32)                 # float(d) * int
    return decode_pairs(_LUT_IQ4, b[:, 8:136].reshape(n, 8, 16), dl[:, :, None, None]).reshape(n, 256)


def dequantize_mxfp4(b: np.ndarray) -> np.ndarray:
    d = e8m0_to_f32_half(b[:, 0:1])
    return decode_pairs(_LUT_FP4, b[:, 1:17], d[:, :, None]).reshape(-1, 32)


def dequantize_nvfp4(b: np.ndarray) -> np.ndarray:
    n = b.shape[0]
    d = UE4M3_HALF[b[:, 0:4]][:, :, None, None]                                # (N, 4, 1, 1)
    return decode_pairs(_LUT_FP4, b[:, 4:36].reshape(n, 4, 8), d).reshape(n, 64)


def best_index_iq4(v: np.ndarray) -> np.ndarray:
    """ggml `best_index_int8(16, kvalues_iq4nl, v)`: nearest table entry, ties to the upper one."""
    mu = np.clip(np.searchsorted(_KV_IQ4_F32, v, side="right"), 1, 15)
    lo, hi = _KV_IQ4_F32[mu - 1], _KV_IQ4_F32[mu]
    idx = np.where(v - lo < hi - v, mu - 1, mu)
    idx = np.where(v <= _KV_IQ4_F32[0], 0, idx)
    return np.where(v >= _KV_IQ4_F32[15], 15, idx).astype(np.uint8)


def quantize_iq4_nl(x: np.ndarray) -> np.ndarray:
    """ggml `quantize_row_iq4_nl_ref`. Blocks with max |x| < 1e-15 get d = 0 and index 8 (value 1)
    everywhere; ggml leaves their indices stale (whatever the previous block left), which only matters
    bit-wise: they dequantize to 0 either way."""
    amax, mx = first_absmax(x)
    small = amax < GROUP_MAX_EPS
    with np.errstate(divide="ignore", invalid="ignore"):
        d0 = (mx / F32(-127)).astype(np.float32)
        idv = (F32(1) / d0).astype(np.float32)
        idx = best_index_iq4(idv * x)
    q = _KV_IQ4_F32[idx]
    wq = (x * x) * q
    sumqx = np.zeros(x.shape[0], np.float32)
    sumq2 = np.zeros(x.shape[0], np.float32)
    for j in range(x.shape[1]):  # sequential float32 sums, as the C loop accumulates
        sumqx += wq[:, j] * x[:, j]
        sumq2 += wq[:, j] * q[:, j]
    with np.errstate(divide="ignore", invalid="ignore"):
        d = np.where(sumq2 > 0, sumqx / sumq2, F32(0)).astype(np.float32)
    d[small[:, 0]] = 0
    idx[small[:, 0]] = 8
    out = np.empty((x.shape[0], 18), np.uint8)
    put_f16(out, 0, d)
    out[:, 2:] = nibbles_pack(idx)
    return out


def best_index_fp4(x: np.ndarray, d: np.ndarray) -> np.ndarray:
    """ggml `best_index_mxfp4(x, d)`: the first index minimising |kv[i]*d - x| (float32), uint8."""
    err = np.abs(_KV_FP4_F32 * d[..., None] - x[..., None])
    return err.argmin(axis=-1).astype(np.uint8)


def quantize_mxfp4(x: np.ndarray) -> np.ndarray:
    """ggml `quantize_row_mxfp4_ref`: e = floor(log2f(amax)) - 2 + 127, then nearest FP4 value.

    log2f is taken as float64 log2 rounded to float32 (glibc's log2f is correctly rounded in practice),
    which matters only for amax just below a power of two, where it can round up to the integer.
    """
    amax = np.abs(x).max(axis=1)
    with np.errstate(divide="ignore"):
        lg = np.log2(amax.astype(np.float64)).astype(np.float32)
    e = np.where(amax > 0, np.floor(lg) - 2 + 127, 0)
    e = np.where(np.isfinite(e), e, 0).astype(np.int32).astype(np.uint8)  # (uint8_t) of the float
    d = e8m0_to_f32_half(e)
    out = np.empty((x.shape[0], 17), np.uint8)
    out[:, 0] = e
    out[:, 1:] = nibbles_pack(best_index_fp4(x, d[:, None]))
    return out


def f32_to_ue4m3(x: np.ndarray) -> np.ndarray:
    """ggml_fp32_to_ue4m3 (positive x; NaN and x <= 0 give 0; saturates at 0x7E)."""
    pos = x > 0
    x = np.minimum(np.where(pos, x, F32(1)), F32(448)).astype(np.float32)
    bits = x.view(np.uint32)
    exp = ((bits >> 23) & 0xFF).astype(np.int32) - 127 + 7
    man = ((bits >> 20) & 7).astype(np.int32) + ((bits >> 19) & 1).astype(np.int32)
    exp = np.where(man > 7, exp + 1, exp)
    man = np.where(man > 7, 0, man)
    normal = np.where(exp >= 15, 0x7E, (exp << 3) | man)
    sub = np.trunc(x * F32(512) + F32(0.5)).astype(np.int32)
    sub = np.where(sub < 1, 0, np.minimum(sub, 7))
    raw_exp = ((bits >> 23) & 0xFF).astype(np.int32) - 127 + 7
    return np.where(pos, np.where(raw_exp <= 0, sub, normal), 0).astype(np.uint8)


def quantize_nvfp4(x: np.ndarray) -> np.ndarray:
    """ggml `quantize_row_nvfp4_ref`: per 16 values ue = ue4m3(amax/6), then nearest FP4 value."""
    n = x.shape[0]
    xs = x.reshape(n, 4, 16)
    ue = f32_to_ue4m3((np.abs(xs).max(axis=2) / F32(6)).astype(np.float32))     # (N, 4)
    idx = best_index_fp4(xs, UE4M3_HALF[ue][:, :, None])                        # (N, 4, 16)
    out = np.empty((n, 36), np.uint8)
    out[:, 0:4] = ue
    out[:, 4:] = nibbles_pack(idx.reshape(n * 4, 16)).reshape(n, 32)
    return out


IQUANT_DEQUANT = {
    GGMLType.IQ4_NL: dequantize_iq4_nl, GGMLType.IQ4_XS: dequantize_iq4_xs,
    GGMLType.MXFP4: dequantize_mxfp4, GGMLType.NVFP4: dequantize_nvfp4,
}
IQUANT_QUANT = {GGMLType.IQ4_NL: quantize_iq4_nl, GGMLType.MXFP4: quantize_mxfp4,
                GGMLType.NVFP4: quantize_nvfp4}
