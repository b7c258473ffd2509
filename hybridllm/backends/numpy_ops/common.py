"""Shared helpers for numpy op builders: typed views of tensor memory and ggml's numeric details."""
from __future__ import annotations

import numpy as np

from ...ggml.tensor import Tensor
from ...ggml.types import GGMLType, TRAITS, type_name
from ..base import Unsupported

NP_DTYPES: dict[int, np.dtype] = {
    GGMLType.F32: np.dtype("<f4"), GGMLType.F16: np.dtype("<f2"), GGMLType.BF16: np.dtype("<u2"),
    GGMLType.I8: np.dtype("i1"), GGMLType.I16: np.dtype("<i2"), GGMLType.I32: np.dtype("<i4"),
    GGMLType.I64: np.dtype("<i8"), GGMLType.F64: np.dtype("<f8"),
}


def storage(t: Tensor) -> np.ndarray:
    """The uint8 array of the buffer a tensor lives in; Unsupported if it has no storage."""
    buf = t.buffer
    if buf is None or getattr(buf, "array", None) is None:
        raise Unsupported(f"tensor {t.name!r} has no storage on this device")
    return buf.array  # type: ignore[attr-defined]


def view(t: Tensor) -> np.ndarray:
    """A numpy view (ne3, ne2, ne1, ne0) of a plain-typed tensor, with its real strides.

    BF16 is viewed as uint16 (bits); use `bf16_to_f32` to read it.
    """
    dt = NP_DTYPES.get(t.type)
    if dt is None:
        raise Unsupported(f"tensor {t.name!r}: type {type_name(t.type)} has no element view")
    arr = storage(t)
    n0, n1, n2, n3 = t.ne
    b0, b1, b2, b3 = t.nb
    return np.ndarray((n3, n2, n1, n0), dtype=dt, buffer=arr, offset=t.offset, strides=(b3, b2, b1, b0))


def rows_view(t: Tensor) -> np.ndarray:
    """Raw bytes of each row of a (quantized or plain) tensor: uint8 (ne3, ne2, ne1, row_bytes).

    Rows must be dense (nb0 == block size), as ggml requires of quantized operands.
    """
    tr = TRAITS[t.type]
    if t.nb[0] != tr.type_size:
        raise Unsupported(f"tensor {t.name!r}: rows are not dense (nb0={t.nb[0]})")
    if t.ne[0] % tr.blck_size:
        raise Unsupported(f"tensor {t.name!r}: ne0={t.ne[0]} is not a multiple of the block size")
    arr = storage(t)
    n0, n1, n2, n3 = t.ne
    _, b1, b2, b3 = t.nb
    rb = tr.type_size * n0 // tr.blck_size
    return np.ndarray((n3, n2, n1, rb), dtype=np.uint8, buffer=arr, offset=t.offset, strides=(b3, b2, b1, 1))


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """ggml's F32->BF16: round to nearest even, NaN forced quiet (ggml-rpc.md §11)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    return np.where(nan, ((u >> 16) | 0x40).astype(np.uint16), rounded)


def read_f32(t: Tensor) -> np.ndarray:
    """The tensor's values as float32 (copy for F16/BF16, view for F32), shape (ne3, ne2, ne1, ne0)."""
    v = view(t)
    if t.type == GGMLType.F32:
        return v
    if t.type == GGMLType.BF16:
        return bf16_to_f32(v)
    return v.astype(np.float32)


def write_from_f32(t: Tensor, dst: np.ndarray, values: np.ndarray) -> None:
    """Store float32 `values` into view `dst` of tensor t with ggml's rounding for t's type."""
    if t.type == GGMLType.BF16:
        dst[...] = f32_to_bf16(values)
    else:
        dst[...] = values  # F32 as is, F16 by numpy's round-to-nearest-even


def require(cond: bool, node: Tensor, what: str) -> None:
    if not cond:
        raise Unsupported(f"{node.op.name} {node.name!r}: {what}")
