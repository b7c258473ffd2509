"""Plain element types F32, F16, BF16: rows of raw bytes <-> float32.

F32->F16 rounds to nearest even (x86 F16C in ggml-cpu, the same as ggml's software path);
F32->BF16 is ggml's `fp32_to_bf16`: round to nearest even on the bit pattern, NaN forced quiet.
"""
from __future__ import annotations

import numpy as np

from ..ggml.types import GGMLType
from ._common import f16_bits


def _elements(raw: np.ndarray, dtype: str) -> np.ndarray:
    """View the bytes of contiguous rows (N, row_bytes) as (N, n) elements of `dtype`."""
    return np.ascontiguousarray(raw).view(dtype)


def dequantize_f32(raw: np.ndarray) -> np.ndarray:
    return _elements(raw, "<f4").astype(np.float32, copy=True)


def dequantize_f16(raw: np.ndarray) -> np.ndarray:
    return _elements(raw, "<f2").astype(np.float32)


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def dequantize_bf16(raw: np.ndarray) -> np.ndarray:
    return bf16_to_f32(_elements(raw, "<u2"))


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """ggml's F32->BF16 bit patterns (uint16)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    # uint32 wrap-around only happens for NaN bit patterns, which the select below replaces.
    rounded = ((u + (0x7FFF + ((u >> 16) & 1))) >> 16).astype(np.uint16)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    if nan.any():
        rounded = np.where(nan, ((u >> 16) | 0x40).astype(np.uint16), rounded)
    return rounded


def quantize_f32(x: np.ndarray) -> np.ndarray:
    return np.array(x, dtype=np.float32, order="C").view(np.uint8)  # a copy: never alias the input


def quantize_f16(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(f16_bits(x)).view(np.uint8)


def quantize_bf16(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(f32_to_bf16(x)).view(np.uint8)


# Row codecs: (N, n*size) uint8 <-> (N, n) float32.
PLAIN_DEQUANT = {GGMLType.F32: dequantize_f32, GGMLType.F16: dequantize_f16, GGMLType.BF16: dequantize_bf16}
PLAIN_QUANT = {GGMLType.F32: quantize_f32, GGMLType.F16: quantize_f16, GGMLType.BF16: quantize_bf16}
