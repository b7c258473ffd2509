"""Row normalizations: RMS_NORM, NORM (LayerNorm without affine), L2_NORM (ggml-rpc.md §12.6).

ggml sums squares of f32 values in double and forms the scale in float; we do the same on all rows at
once (sums over the last axis with a float64 accumulator).
"""
from __future__ import annotations

import functools
import math
from typing import Callable

import numpy as np

from ...ggml.tensor import Tensor
from ...ggml.types import GGMLOp, GGMLType
from . import Kernel, register
from .common import require, view
from .elementwise import njit_in_place

F32 = np.float32
F64 = np.float64


def _operands(node: Tensor) -> tuple[np.ndarray, np.ndarray, np.float32, int]:
    src = node.src[0]
    require(src is not None, node, "needs a source")
    assert src is not None
    require(src.type == GGMLType.F32 and node.type == GGMLType.F32, node, "only f32 is supported")
    require(src.ne == node.ne, node, f"source shape {src.ne} differs from result shape {node.ne}")
    eps = F32(node.param_f32(0))
    require(eps >= 0, node, "eps must be >= 0")
    return view(src), view(node), eps, node.ne[0]


def _sum_sq(x: np.ndarray) -> np.ndarray:
    """Per row: sum of float32 squares, accumulated in double (keepdims)."""
    return np.add.reduce(np.square(x), axis=-1, dtype=F64, keepdims=True)


def _rms_norm_rows(x: np.ndarray, y: np.ndarray, eps: np.float32) -> None:  # numba
    """ggml's loop: float squares summed in double in order, mean and scale in float, y = x * scale."""
    n3, n2, n1, n0 = x.shape
    for a in range(n3):
        for b in range(n2):
            for c in range(n1):
                acc = 0.0
                for i in range(n0):
                    v = x[a, b, c, i]
                    acc += np.float64(v * v)
                scale = np.float32(1) / np.float32(math.sqrt(np.float32(acc / n0) + eps))
                for i in range(n0):
                    y[a, b, c, i] = x[a, b, c, i] * scale


@functools.cache
def _rms_norm_kernel() -> Callable[[np.ndarray, np.ndarray, np.float32], None]:
    njit_in_place(globals(), "_rms_norm_rows")
    return globals()["_rms_norm_rows"]


@register(GGMLOp.RMS_NORM)
def build_rms_norm(node: Tensor) -> Kernel:
    x, y, eps, _ = _operands(node)
    rms_norm = _rms_norm_kernel()
    return lambda: rms_norm(x, y, eps)


@register(GGMLOp.NORM)
def build_norm(node: Tensor) -> Kernel:
    x, y, eps, n = _operands(node)
    one = F32(1)

    def kernel() -> None:
        mean = np.add.reduce(x, axis=-1, dtype=F64, keepdims=True).astype(F32) / F32(n)
        d = x - mean
        var = (_sum_sq(d) / n).astype(F32)
        np.multiply(d, one / np.sqrt(var + eps), out=y)
    return kernel


@register(GGMLOp.L2_NORM)
def build_l2_norm(node: Tensor) -> Kernel:
    x, y, eps, _ = _operands(node)
    one = F32(1)

    def kernel() -> None:
        norm = np.sqrt(_sum_sq(x).astype(F32))
        np.multiply(x, one / np.fmax(norm, eps), out=y)
    return kernel
