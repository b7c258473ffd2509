"""Codebook I-quants: IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S, IQ1_S, IQ1_M (dequantize only).

Each 256-element super-block holds 8 sub-blocks of 32 = 4 groups of 8; a group is a row of a fixed
codebook ("grid") picked by an index, with per-element signs (IQ2/IQ3) or a shared ±1/8 shift (IQ1).
The codebooks are data, taken from the `gguf` package (a dependency) rather than re-typed here.
Float operations follow ggml-base (e.g. IQ2 `db = (d*(0.5+s))*0.25`, `y = (db*grid)*sign`).

Sign bytes: IQ2_XXS/IQ2_XS/IQ3_XXS store 7 sign bits per group; the 8th is their parity
(ggml's `ksigns_iq2xs` table: i | parity(i) << 7). IQ2_S/IQ3_S store full sign bytes.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from ..ggml.types import GGMLType
from ._common import F32, f16_field

_BIT8 = np.arange(8, dtype=np.uint8)
IQ1S_DELTA = F32(0.125)


@lru_cache(maxsize=None)
def grid(name: str) -> np.ndarray:
    """The codebook of an I-quant as float32 (rows, 8 or 4), from gguf.quants."""
    import gguf.quants
    cls = getattr(gguf.quants, name)
    cls.init_grid()
    return np.ascontiguousarray(cls.grid, dtype=np.float32).reshape(cls.grid_shape)


def _ksigns() -> np.ndarray:
    i = np.arange(128, dtype=np.uint8)
    parity = np.unpackbits(i[:, None], axis=1).sum(axis=1) & 1
    return (i | (parity << 7).astype(np.uint8)).astype(np.uint8)


_KSIGNS = _ksigns()


_SIGN_LUT = np.where((np.arange(256, dtype=np.uint8)[:, None] >> _BIT8) & 1, F32(-1), F32(1)).astype(np.float32)


def _sign_values(signs: np.ndarray) -> np.ndarray:
    """Sign bytes (...) -> (..., 8) float32 of ±1.0 (bit j set -> -1)."""
    return np.take(_SIGN_LUT, signs, axis=0)


def _u32(b: np.ndarray, off: int, count: int) -> np.ndarray:
    return np.ascontiguousarray(b[:, off:off + 4 * count]).view("<u4")


def _u16(b: np.ndarray, off: int, count: int) -> np.ndarray:
    return np.ascontiguousarray(b[:, off:off + 2 * count]).view("<u2")


def _iq2_db(d: np.ndarray, s: np.ndarray) -> np.ndarray:
    return d * (F32(0.5) + s.astype(np.float32)) * F32(0.25)


def dequantize_iq2_xxs(b: np.ndarray) -> np.ndarray:
    n = b.shape[0]
    aux = _u32(b, 2, 16).reshape(n, 8, 2)                                      # (sub-block, word)
    db = _iq2_db(f16_field(b, 0), aux[:, :, 1] >> 28)[:, :, None, None]
    idx = np.ascontiguousarray(aux[:, :, 0]).view(np.uint8).reshape(n, 8, 4)
    sg = _KSIGNS[(aux[:, :, 1:2] >> np.array([0, 7, 14, 21], np.uint32)) & 127]
    return (db * np.take(grid("IQ2_XXS"), idx, axis=0) * _sign_values(sg)).reshape(n, 256)


def dequantize_iq2_xs(b: np.ndarray) -> np.ndarray:
    n = b.shape[0]
    q = _u16(b, 2, 32).reshape(n, 8, 4)
    sc = b[:, 66:74]
    db = _iq2_db(f16_field(b, 0)[:, :, None], np.stack([sc & 0x0F, sc >> 4], axis=2))  # (n, 8, 2)
    db = np.repeat(db, 2, axis=2)[..., None]                                    # group l uses db[l // 2]
    return (db * np.take(grid("IQ2_XS"), q & 511, axis=0) * _sign_values(_KSIGNS[q >> 9])).reshape(n, 256)


def dequantize_iq2_s(b: np.ndarray) -> np.ndarray:
    n = b.shape[0]
    qs, signs = b[:, 2:34].reshape(n, 8, 4), b[:, 34:66].reshape(n, 8, 4)
    qh = b[:, 66:74].astype(np.uint16)[:, :, None]
    idx = qs | ((qh << np.array([8, 6, 4, 2], np.uint16)) & 0x300)             # 2 high bits per group
    sc = b[:, 74:82]
    db = _iq2_db(f16_field(b, 0)[:, :, None], np.stack([sc & 0x0F, sc >> 4], axis=2))
    db = np.repeat(db, 2, axis=2)[..., None]
    return (db * np.take(grid("IQ2_S"), idx, axis=0) * _sign_values(signs)).reshape(n, 256)


def dequantize_iq3_xxs(b: np.ndarray) -> np.ndarray:
    n = b.shape[0]
    aux = _u32(b, 66, 8)                                                        # (n, 8)
    db = (f16_field(b, 0) * (F32(0.5) + (aux >> 28).astype(np.float32)) * F32(0.5))[:, :, None, None]
    g = np.take(grid("IQ3_XXS"), b[:, 2:66], axis=0).reshape(n, 8, 4, 8)         # two 4-wide rows per group
    sg = _KSIGNS[(aux[:, :, None] >> np.array([0, 7, 14, 21], np.uint32)) & 127]
    return (db * g * _sign_values(sg)).reshape(n, 256)


def dequantize_iq3_s(b: np.ndarray) -> np.ndarray:
    n = b.shape[0]
    qh = b[:, 66:74].astype(np.uint16)[:, :, None]
    high = ((qh >> np.arange(8, dtype=np.uint16)) & 1) << 8                    # bit k -> index k of the sub-block
    idx = b[:, 2:66].reshape(n, 8, 8) | high
    g = np.take(grid("IQ3_S"), idx, axis=0).reshape(n, 8, 4, 8)
    sc = b[:, 106:110]
    mult = (1 + 2 * np.stack([sc & 0x0F, sc >> 4], axis=2).reshape(n, 8)).astype(np.float32)
    db = (f16_field(b, 0) * mult)[:, :, None, None]
    return (db * g * _sign_values(b[:, 74:106].reshape(n, 8, 4))).reshape(n, 256)


def _iq1_values(dl: np.ndarray, idx: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """dl * (grid[idx] + ±delta), dl (n, 8, 4, 1), idx/neg (n, 8, 4)."""
    delta = np.where(neg, -IQ1S_DELTA, IQ1S_DELTA)[..., None]
    return dl * (np.take(grid("IQ1_S"), idx, axis=0) + delta)


def dequantize_iq1_s(b: np.ndarray) -> np.ndarray:
    n = b.shape[0]
    qh = _u16(b, 34, 8)                                                         # (n, 8)
    dl = f16_field(b, 0) * (2 * ((qh >> 12) & 7) + 1).astype(np.float32)
    idx = b[:, 2:34].reshape(n, 8, 4) | (((qh[:, :, None] >> np.array([0, 3, 6, 9], np.uint16)) & 7) << 8)
    neg = np.broadcast_to((qh & 0x8000)[:, :, None] != 0, idx.shape)
    return _iq1_values(np.repeat(dl[:, :, None], 4, axis=2)[..., None], idx, neg).reshape(n, 256)


def dequantize_iq1_m(b: np.ndarray) -> np.ndarray:
    n = b.shape[0]
    sc = _u16(b, 48, 4)                                                         # (n, 4)
    dbits = (sc[:, 0] >> 12) | ((sc[:, 1] >> 8) & 0xF0) | ((sc[:, 2] >> 4) & 0xF00) | (sc[:, 3] & 0xF000)
    d = np.ascontiguousarray(dbits.astype("<u2")).view("<f2").astype(np.float32)[:, None, None]
    s3 = (np.repeat(sc, 2, axis=1)[:, :, None] >> np.array([0, 3], np.uint16)) >> (
        6 * (np.arange(8) % 2)).astype(np.uint16)[None, :, None]                # (n, 8 sub-blocks, 2 halves)
    dl = np.repeat(d * (2 * (s3 & 7) + 1).astype(np.float32), 2, axis=2)[..., None]  # groups 0,1 | 2,3
    qh = b[:, 32:48].reshape(n, 8, 2).astype(np.uint16)
    qh4 = np.stack([qh[:, :, 0], qh[:, :, 0] >> 4, qh[:, :, 1], qh[:, :, 1] >> 4], axis=2)   # nibble per group
    idx = b[:, 0:32].reshape(n, 8, 4) | ((qh4 & 7) << 8)
    return _iq1_values(dl, idx, (qh4 & 8) != 0).reshape(n, 256)


IQGRID_DEQUANT = {
    GGMLType.IQ2_XXS: dequantize_iq2_xxs, GGMLType.IQ2_XS: dequantize_iq2_xs, GGMLType.IQ2_S: dequantize_iq2_s,
    GGMLType.IQ3_XXS: dequantize_iq3_xxs, GGMLType.IQ3_S: dequantize_iq3_s,
    GGMLType.IQ1_S: dequantize_iq1_s, GGMLType.IQ1_M: dequantize_iq1_m,
}
