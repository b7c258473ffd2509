"""Small helpers shared by the block codecs: field extraction, f16 packing, nibble splitting.

Every codec works on a 2-D array of whole blocks, `uint8 (N, type_size)` in and `float32 (N, block_size)`
out (or the reverse for quantizers). Arithmetic is done in float32 in the same order as ggml's C code
(ggml-base is compiled without FMA), so results are bit-identical to ggml's, not just close.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

DequantFn = Callable[[np.ndarray], np.ndarray]   # uint8 (N, type_size) -> float32 (N, block_size)
QuantFn = Callable[[np.ndarray], np.ndarray]     # float32 (N, block_size) -> uint8 (N, type_size)

F32 = np.float32


def f16_field(blocks: np.ndarray, off: int) -> np.ndarray:
    """The little-endian f16 at byte `off` of each block, as float32 (N, 1) (exact)."""
    return np.ascontiguousarray(blocks[:, off:off + 2]).view("<f2").astype(np.float32)


def f32_field(blocks: np.ndarray, off: int) -> np.ndarray:
    return np.ascontiguousarray(blocks[:, off:off + 4]).view("<f4").astype(np.float32)


def u16_field(blocks: np.ndarray, off: int) -> np.ndarray:
    return np.ascontiguousarray(blocks[:, off:off + 2]).view("<u2")


def f16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> f16 bit patterns (uint16), round to nearest even, NaN kept quiet.

    Matches both ggml's software converter (ggml-base) and x86 F16C `vcvtps2ph` (ggml-cpu) for all
    non-NaN inputs; NaNs get the quiet bit set as F16C does.
    """
    h = np.asarray(x, dtype=np.float32).astype(np.float16).view(np.uint16)
    nan = (h & 0x7C00) == 0x7C00
    if nan.any():
        h = np.where(nan & ((h & 0x3FF) != 0), h | 0x200, h)
    return h


def put_f16(out: np.ndarray, off: int, x: np.ndarray) -> None:
    """Store float32 values x (N, 1) or (N,) as f16 at byte `off` of each block of `out`."""
    out[:, off:off + 2] = f16_bits(np.asarray(x).reshape(-1)).view(np.uint8).reshape(-1, 2)


def pair_lut(values: np.ndarray) -> np.ndarray:
    """(256, 2) float32 table: byte b -> (values[b & 15], values[b >> 4])."""
    b = np.arange(256)
    return np.stack([values[b & 15], values[b >> 4]], axis=1).astype(np.float32)


def decode_pairs(lut: np.ndarray, qs: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Packed nibbles (..., k) -> float32 (..., 2, k): the k low-nibble values then the k high-nibble
    values, each looked up in `lut` (see pair_lut) and multiplied by `scale` (broadcast to (..., 2, k)).

    One table lookup per byte replaces split + int->float conversion: about twice as fast.
    """
    v = np.take(lut, qs, axis=0)                               # (..., k, 2)
    out = np.empty(qs.shape[:-1] + (2, qs.shape[-1]), np.float32)
    np.multiply(v.swapaxes(-1, -2), scale, out=out)
    return out


def nibbles_split(qs: np.ndarray) -> np.ndarray:
    """(N, 16) packed bytes -> (N, 32): the 16 low nibbles, then the 16 high nibbles (ggml's layout)."""
    out = np.empty((qs.shape[0], 2 * qs.shape[1]), dtype=np.uint8)
    h = qs.shape[1]
    np.bitwise_and(qs, 0x0F, out=out[:, :h])
    np.right_shift(qs, 4, out=out[:, h:])
    return out


def nibbles_pack(q: np.ndarray) -> np.ndarray:
    """(N, 32) values 0..15 -> (N, 16) bytes: element j in the low nibble, element j+16 in the high one."""
    h = q.shape[1] // 2
    return (q[:, :h] & 0x0F) | (q[:, h:] << 4)


def bits_little(b: np.ndarray) -> np.ndarray:
    """(N, k) bytes -> (N, 8k) bits with bit i of the little-endian integer at position i."""
    return np.unpackbits(b, axis=1, bitorder="little")


def first_absmax(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(amax, max) per row: the largest |x| and the signed value that first reaches it.

    ggml scans with `if (amax < fabsf(v))`, so ties keep the first one and an all-zero row gives
    max = +0.0 (never -0.0, which would flip the sign of a stored zero scale).
    """
    ax = np.abs(x)
    idx = ax.argmax(axis=1)[:, None]
    amax = np.take_along_axis(ax, idx, axis=1)
    mx = np.take_along_axis(x, idx, axis=1)
    mx = np.where(amax == 0, F32(0), mx)
    return amax, mx


def roundf(v: np.ndarray) -> np.ndarray:
    """C roundf (half away from zero), exactly: floor(|v| + 0.5) would round 0.49999997 up."""
    a = np.abs(v)
    fl = np.floor(a)
    return np.copysign(fl + np.floor(F32(2) * (a - fl)), v)


def safe_recip(d: np.ndarray) -> np.ndarray:
    """`d ? 1.0f/d : 0.0f` in float32."""
    with np.errstate(divide="ignore"):
        return np.where(d != 0, F32(1) / np.where(d != 0, d, F32(1)), F32(0)).astype(np.float32)
