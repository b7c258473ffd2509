"""Valid blocks of every supported type, for tests and synthetic GGUF files.

    w = random_blocks(GGMLType.Q4_K, 64, 512, np.random.default_rng(0))   # uint8 (64, row_bytes)
    raw = encode(x, GGMLType.Q6_K)                                          # float32 (..., n) -> rows

`encode` is `quantize` where that exists (bit-exact with ggml); for the K-quants and IQ4_XS, which
ggml quantizes with an iterative search we do not reproduce, it is a plain round-to-nearest encoder:
the bytes are valid and decode close to x, but they are not the bytes llama-quantize would write.
"""
from __future__ import annotations

import numpy as np

from ..ggml.types import GGMLType, TRAITS, type_name
from . import QUANTIZE_TYPES, quantize
from ._common import F32, f16_bits, nibbles_pack, put_f16
from .iquants import best_index_iq4


def random_blocks(qtype: int, n_rows: int, n_cols: int, rng: np.random.Generator,
                  scale: float = 0.02) -> np.ndarray:
    """Rows of `qtype` whose values look like trained weights: ~N(0, scale), each block centred."""
    bs = TRAITS[qtype].blck_size
    if bs > 1 and n_cols % bs:
        raise ValueError(f"{type_name(qtype)}: {n_cols} columns is not a multiple of {bs}")
    if qtype in _CODEBOOK_SCALE:
        return _random_codebook(qtype, n_rows, n_cols, rng, scale)
    x = rng.standard_normal((n_rows, n_cols)).astype(np.float32) * F32(scale)
    if bs > 1:
        xb = x.reshape(-1, bs)
        xb -= xb.mean(axis=1, keepdims=True)
    return encode(x, qtype)


def encode(x: np.ndarray, qtype: int) -> np.ndarray:
    """float32 [..., n] -> uint8 [..., row_bytes] for every type `dequantize` supports except the
    codebook I-quants (IQ1_*, IQ2_*, IQ3_*), whose search-based encoders are out of scope."""
    x = np.asarray(x, dtype=np.float32)
    if qtype in QUANTIZE_TYPES:
        return quantize(x, qtype)
    fn = _RTN.get(qtype)
    if fn is None:
        raise ValueError(f"encode: type {type_name(qtype)} is not supported")
    tr = TRAITS[qtype]
    if x.shape[-1] % tr.blck_size:
        raise ValueError(f"encode: {type_name(qtype)} needs rows that are a multiple of {tr.blck_size}")
    blocks = np.ascontiguousarray(x).reshape(-1, tr.blck_size)
    with np.errstate(all="ignore"):
        out = fn(blocks)
    return out.reshape(*x.shape[:-1], x.shape[-1] // tr.blck_size * tr.type_size)


# ---------------------------------------------------------------- round-to-nearest helpers

def _f16_round(v: np.ndarray) -> np.ndarray:
    return f16_bits(v).view(np.float16).astype(np.float32)


def _super_scale(s: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray]:
    """Super-block f16 scale d = max(s)/levels and the integer sub-scales round(s/d) in 0..levels."""
    d = _f16_round(s.max(axis=1, keepdims=True) / F32(levels))
    sub = np.where(d > 0, np.rint(s / np.where(d > 0, d, 1)), 0)
    return d, np.clip(sub, 0, levels).astype(np.uint8)


def _rtn(x: np.ndarray, step: np.ndarray, offset: np.ndarray | float, lo: int, hi: int) -> np.ndarray:
    """round((x + offset) / step) clipped to [lo, hi]; 0 where step is 0."""
    q = np.where(step > 0, np.rint((x + offset) / np.where(step > 0, step, 1)), 0)
    return np.clip(q, lo, hi).astype(np.int32)


def _asym_subblocks(sub: np.ndarray, qmax: int, smax: int):
    """Affine encode of sub-blocks (N, S, L): y = d*sc*q - dmin*m, q in 0..qmax, sc/m in 0..smax."""
    mn = np.minimum(sub.min(axis=2), 0)
    mx = np.maximum(sub.max(axis=2), 0)
    d, sc = _super_scale((mx - mn) / F32(qmax), smax)
    dmin, m = _super_scale(-mn, smax)
    q = _rtn(sub, (d * sc)[..., None], (dmin * m)[..., None], 0, qmax)
    return d, dmin, sc, m, q


def _pack_k4_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Inverse of the Q4_K/Q5_K 12-byte scale/min packing."""
    out = np.empty((sc.shape[0], 12), np.uint8)
    out[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    out[:, 4:8] = m[:, :4] | ((m[:, 4:] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:] & 0x0F) | ((m[:, 4:] & 0x0F) << 4)
    return out


def _k4_body(x: np.ndarray, qmax: int, size: int):
    n = x.shape[0]
    d, dmin, sc, m, q = _asym_subblocks(x.reshape(n, 8, 32), qmax, 63)
    out = np.zeros((n, size), np.uint8)
    put_f16(out, 0, d)
    put_f16(out, 2, dmin)
    out[:, 4:16] = _pack_k4_scales(sc, m)
    return out, q.reshape(n, 4, 2, 32).astype(np.uint8)          # (pair, nibble, lane)


def _encode_q4_k(x: np.ndarray) -> np.ndarray:
    out, q = _k4_body(x, 15, 144)
    out[:, 16:144] = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)
    return out


def _encode_q5_k(x: np.ndarray) -> np.ndarray:
    out, q = _k4_body(x, 31, 176)
    n = x.shape[0]
    hb = ((q >> 4) & 1).transpose(0, 3, 1, 2).reshape(n, 256)     # bit (2p + nibble) of qh[lane]
    out[:, 16:48] = np.packbits(hb, axis=1, bitorder="little")
    out[:, 48:176] = ((q[:, :, 0] & 0x0F) | ((q[:, :, 1] & 0x0F) << 4)).reshape(n, 128)
    return out


def _encode_q2_k(x: np.ndarray) -> np.ndarray:
    n = x.shape[0]
    d, dmin, sc, m, q = _asym_subblocks(x.reshape(n, 16, 16), 3, 15)
    out = np.empty((n, 84), np.uint8)
    out[:, 0:16] = sc | (m << 4)
    q = q.reshape(n, 2, 4, 2, 16).astype(np.uint8)               # (half, j, group, lane)
    shifted = q << np.array([0, 2, 4, 6], np.uint8)[None, None, :, None, None]
    out[:, 16:80] = np.bitwise_or.reduce(shifted, axis=2).reshape(n, 64)
    put_f16(out, 80, d)
    put_f16(out, 82, dmin)
    return out


def _signed_subscales(sub: np.ndarray, qneg: int, smax: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric sub-block scales: the largest |x| maps to -qneg; returns f16 d and ints in ±smax."""
    idx = np.abs(sub).argmax(axis=2)[..., None]
    s = np.take_along_axis(sub, idx, axis=2)[..., 0] / F32(-qneg)
    d = _f16_round(np.abs(s).max(axis=1, keepdims=True) / F32(smax))
    ls = np.where(d > 0, np.rint(s / np.where(d > 0, d, 1)), 0)
    return d, np.clip(ls, -smax, smax).astype(np.int32)


def _encode_q3_k(x: np.ndarray) -> np.ndarray:
    n = x.shape[0]
    sub = x.reshape(n, 16, 16)
    d, ls = _signed_subscales(sub, 4, 31)
    step = (d * ls)[..., None]
    q = np.where(step != 0, np.clip(np.rint(sub / np.where(step != 0, step, 1)), -4, 3), 0).astype(np.int32)
    u = (q + 4).reshape(n, 2, 4, 2, 16).astype(np.uint8)         # (half, j, group, lane)
    out = np.zeros((n, 110), np.uint8)
    hb = (u >> 2).transpose(0, 3, 4, 1, 2).reshape(n, 256)      # bit (4h + j) of hmask[16g + l]
    out[:, 0:32] = np.packbits(hb, axis=1, bitorder="little")
    shifted = (u & 3) << np.array([0, 2, 4, 6], np.uint8)[None, None, :, None, None]
    out[:, 32:96] = np.bitwise_or.reduce(shifted, axis=2).reshape(n, 64)
    v = (ls + 32).astype(np.uint8)                               # 6-bit scales
    out[:, 96:104] = (v[:, :8] & 0x0F) | ((v[:, 8:] & 0x0F) << 4)
    hi = v >> 4
    out[:, 104:108] = hi[:, 0:4] | (hi[:, 4:8] << 2) | (hi[:, 8:12] << 4) | (hi[:, 12:16] << 6)
    put_f16(out, 108, d)
    return out


def _encode_q6_k(x: np.ndarray) -> np.ndarray:
    n = x.shape[0]
    sub = x.reshape(n, 16, 16)
    d, ls = _signed_subscales(sub, 32, 127)
    step = (d * ls)[..., None]
    q = np.where(step != 0, np.clip(np.rint(sub / np.where(step != 0, step, 1)), -32, 31), 0)
    u = (q + 32).astype(np.uint8).reshape(n, 2, 4, 32)          # (half, c, lane)
    low = (u & 0x0F).reshape(n, 2, 2, 2, 32)                     # (half, nibble, ql half, lane)
    out = np.empty((n, 210), np.uint8)
    out[:, 0:128] = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(n, 128)
    hi = (u >> 4) << np.array([0, 2, 4, 6], np.uint8)[None, None, :, None]
    out[:, 128:192] = np.bitwise_or.reduce(hi, axis=2).reshape(n, 64)
    out[:, 192:208] = ls.astype(np.int8).view(np.uint8)
    put_f16(out, 208, d)
    return out


def _encode_iq4_xs(x: np.ndarray) -> np.ndarray:
    n = x.shape[0]
    sub = x.reshape(n, 8, 32)
    d, ls = _signed_subscales(sub, 127, 31)
    step = (d * ls)[..., None]
    idx = best_index_iq4(np.where(step != 0, sub / np.where(step != 0, step, 1), 0))
    out = np.empty((n, 136), np.uint8)
    put_f16(out, 0, d)
    v = (ls + 32).astype(np.uint16)
    sh = np.bitwise_or.reduce((v >> 4) << (2 * np.arange(8, dtype=np.uint16)), axis=1).astype("<u2")
    out[:, 2:4] = sh.view(np.uint8).reshape(n, 2)
    lo = (v & 0x0F).astype(np.uint8)
    out[:, 4:8] = lo[:, 0::2] | (lo[:, 1::2] << 4)
    out[:, 8:136] = nibbles_pack(idx.reshape(n * 8, 32)).reshape(n, 128)
    return out


_RTN = {GGMLType.Q2_K: _encode_q2_k, GGMLType.Q3_K: _encode_q3_k, GGMLType.Q4_K: _encode_q4_k,
        GGMLType.Q5_K: _encode_q5_k, GGMLType.Q6_K: _encode_q6_k, GGMLType.IQ4_XS: _encode_iq4_xs}


# ---------------------------------------------------------------- codebook I-quants: random codes

def _set_iq1_m_scale(blocks: np.ndarray, bits: np.ndarray) -> None:
    """Write f16 bit patterns into the top nibbles of IQ1_M's four u16 scale words (bytes 48..55)."""
    for k in range(4):
        hi = 48 + 2 * k + 1
        blocks[:, hi] = (blocks[:, hi] & 0x0F) | (((bits >> (4 * k)) & 0xF) << 4).astype(np.uint8)


# byte offset of the f16 super-block scale (None: IQ1_M's scattered scale)
_CODEBOOK_SCALE = {GGMLType.IQ2_XXS: 0, GGMLType.IQ2_XS: 0, GGMLType.IQ2_S: 0, GGMLType.IQ3_XXS: 0,
                   GGMLType.IQ3_S: 0, GGMLType.IQ1_S: 0, GGMLType.IQ1_M: None}


def _random_codebook(qtype: int, n_rows: int, n_cols: int, rng: np.random.Generator,
                     scale: float) -> np.ndarray:
    """Random codes and sub-scales; each block's f16 scale is set so that its rms is `scale`."""
    from . import dequantize
    tr = TRAITS[qtype]
    blocks = rng.integers(0, 256, (n_rows * n_cols // tr.blck_size, tr.type_size), dtype=np.uint8)
    off = _CODEBOOK_SCALE[qtype]

    def put(d: np.ndarray) -> None:
        if off is None:
            _set_iq1_m_scale(blocks, f16_bits(d).astype(np.uint16))
        else:
            put_f16(blocks, off, d)

    put(np.ones(blocks.shape[0], np.float32))
    rms = np.sqrt((dequantize(blocks, qtype, tr.blck_size) ** 2).mean(axis=1))
    put(np.where(rms > 0, F32(scale) / np.where(rms > 0, rms, 1), 0).astype(np.float32))
    return blocks.reshape(n_rows, -1)
