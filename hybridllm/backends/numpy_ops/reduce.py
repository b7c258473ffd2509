"""Reductions and sorting: SUM, SUM_ROWS, MEAN, CUMSUM, ARGMAX, ARGSORT, TOP_K (ggml-rpc.md §12.17-18).

Sums accumulate in double and round once to float, like ggml's F32 kernels. ARGSORT is a stable sort
(ggml's std::sort leaves ties unspecified); TOP_K returns the k largest in descending order (ggml gives no
order and deliberately swaps the first two).
"""
from __future__ import annotations

import numpy as np

from ...ggml.tensor import Tensor
from ...ggml.types import GGMLOp, GGMLType
from . import Kernel, register
from .common import require, view
from .elementwise import f32_source, require_float

F32 = np.float32
F64 = np.float64


def _src(node: Tensor) -> Tensor:
    src = node.src[0]
    require(src is not None, node, "needs a source")
    assert src is not None
    return src


@register(GGMLOp.SUM)
def build_sum(node: Tensor) -> Kernel:
    src = _src(node)
    require_float(node, src)
    require(node.type == src.type and node.nelements == 1, node, "result must be one element of the source type")
    read, out = f32_source(src), view(node).reshape(-1)
    return lambda: np.copyto(out, np.add.reduce(read(), axis=None, dtype=F64), casting="unsafe")


@register(GGMLOp.SUM_ROWS, GGMLOp.MEAN)
def build_sum_rows(node: Tensor) -> Kernel:
    src = _src(node)
    require(src.type == GGMLType.F32 and node.type == GGMLType.F32, node, "only f32 is supported")
    require(node.ne == (1,) + src.ne[1:], node, f"result {node.ne} is not (1, {src.ne[1:]})")
    x, y = view(src), view(node)
    if node.op == GGMLOp.SUM_ROWS:
        return lambda: np.copyto(y, np.add.reduce(x, axis=-1, dtype=F64, keepdims=True), casting="unsafe")
    n = F32(src.ne[0])
    return lambda: np.divide(np.add.reduce(x, axis=-1, dtype=F64, keepdims=True).astype(F32), n, out=y)


@register(GGMLOp.CUMSUM)
def build_cumsum(node: Tensor) -> Kernel:
    src = _src(node)
    require(src.type == GGMLType.F32 and node.type == GGMLType.F32, node, "only f32 is supported")
    require(src.ne == node.ne, node, "shapes differ")
    x, y = view(src), view(node)
    return lambda: np.cumsum(x, axis=-1, dtype=F32, out=y)     # sequential float adds, as ggml


@register(GGMLOp.ARGMAX)
def build_argmax(node: Tensor) -> Kernel:
    src = _src(node)
    require(src.type == GGMLType.F32 and node.type == GGMLType.I32, node, "f32 -> i32 only")
    require(src.ne[2] == 1 and src.ne[3] == 1 and node.nelements == src.ne[1], node, "2-D source only")
    x, y = view(src)[0, 0], view(node).reshape(-1)
    last = src.ne[0] - 1

    def kernel() -> None:
        # ggml keeps the last index that attains the maximum
        y[:] = last - np.argmax(np.where(np.isnan(x), -np.inf, x)[:, ::-1], axis=-1)
    return kernel


@register(GGMLOp.ARGSORT)
def build_argsort(node: Tensor) -> Kernel:
    src = _src(node)
    require(src.type == GGMLType.F32 and node.type == GGMLType.I32, node, "f32 -> i32 only")
    require(src.ne == node.ne, node, "shapes differ")
    x, y = view(src), view(node)
    desc = node.param_i32(0) == 1
    if desc:
        return lambda: np.copyto(y, np.argsort(-x, axis=-1, kind="stable"), casting="unsafe")
    return lambda: np.copyto(y, np.argsort(x, axis=-1, kind="stable"), casting="unsafe")


@register(GGMLOp.TOP_K)
def build_top_k(node: Tensor) -> Kernel:
    src = _src(node)
    require(src.type == GGMLType.F32 and node.type == GGMLType.I32, node, "f32 -> i32 only")
    k = node.ne[0]
    require(node.ne[1:] == src.ne[1:] and 0 < k <= src.ne[0], node, f"bad top-k shape {node.ne} for {src.ne}")
    x, y = view(src), view(node)

    def kernel() -> None:
        part = np.argpartition(-x, k - 1, axis=-1)[..., :k]
        order = np.argsort(-np.take_along_axis(x, part, axis=-1), axis=-1, kind="stable")
        np.copyto(y, np.take_along_axis(part, order, axis=-1), casting="unsafe")
    return kernel
