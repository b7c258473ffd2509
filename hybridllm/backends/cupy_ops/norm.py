"""Row reductions on the GPU: RMS_NORM/NORM/L2_NORM (RMS_NORM -> MUL fused) and SOFT_MAX."""
from __future__ import annotations

import math

from ...ggml.tensor import Tensor
from ...ggml.types import GGMLOp, GGMLType, TensorFlag
from . import register
from .common import (F32, I32, I64, NULL, BuildCtx, elem_threads, launch, nb_args, require, row_grid,
                     src)

_KIND = {GGMLOp.RMS_NORM: 0, GGMLOp.NORM: 1, GGMLOp.L2_NORM: 2}


def _norm_launch(node: Tensor, out: Tensor, w: Tensor | None, ctx: BuildCtx):
    x = src(node, 0)
    for t in (x, out):
        require(t.type == GGMLType.F32 and t.nb[0] == 4, node, f"{t.name!r} must be f32 with dense rows")
    require(out.ne == x.ne, node, "shapes differ")
    n0, n1, n2, n3 = x.ne
    threads = elem_threads(n0, ctx.warp, cap=1024 if n0 >= 4096 else 256)
    gx, gy = row_grid(n1 * n2 * n3)
    if w is not None:
        wargs = (*(I32(n) for n in w.ne), *nb_args(w))
    else:
        wargs = (I32(1),) * 4 + (I64(0),) * 4
    args = (I32(_KIND[node.op]), F32(node.param_f32(0)), ctx.ptr(x), ctx.ptr(out),
            ctx.ptr(w) if w is not None else NULL, I32(n0), I32(n1), I32(n2), I32(n3),
            *nb_args(x)[1:], *nb_args(out)[1:], *wargs)
    return [launch(ctx.fn("norm", "k_norm"), (gx, gy), (threads,), args)]


@register(GGMLOp.RMS_NORM, GGMLOp.NORM, GGMLOp.L2_NORM)
def build_norm(node: Tensor, ctx: BuildCtx):
    return _norm_launch(node, node, None, ctx)


def fusable_rms_norm_mul(node: Tensor, nxt: Tensor, users: dict[int, int]) -> bool:
    """RMS_NORM whose only reader is the next node, a MUL by an f32 weight broadcast onto it."""
    if node.op != GGMLOp.RMS_NORM or nxt.op != GGMLOp.MUL or nxt.src_at(0) is not node:
        return False
    w = nxt.src_at(1)
    if w is None or w is node or w.type != GGMLType.F32 or nxt.type != GGMLType.F32:
        return False
    if users.get(id(node), 0) != 1 or node.flags & TensorFlag.OUTPUT:
        return False
    return nxt.ne == node.ne and all(node.ne[d] % w.ne[d] == 0 for d in range(4)) and nxt.nb[0] == 4


def build_rms_norm_mul(node: Tensor, mul: Tensor, ctx: BuildCtx):
    """One pass: mul = rms_norm(x) * w, never writing the RMS_NORM result."""
    return _norm_launch(node, mul, mul.src_at(1), ctx)


@register(GGMLOp.SOFT_MAX)
def build_soft_max(node: Tensor, ctx: BuildCtx):
    x, mask, sinks = src(node, 0), node.src_at(1), node.src_at(2)
    for t in (x, node):
        require(t.type == GGMLType.F32 and t.nb[0] == 4, node, f"{t.name!r} must be f32 with dense rows")
    require(x.ne == node.ne, node, "shapes differ")
    n0, n1, n2, n3 = x.ne
    if mask is not None:
        require(mask.type in (GGMLType.F32, GGMLType.F16) and mask.ne[0] == n0 and mask.ne[1] >= n1,
                node, "mask must be f32/f16 (n_kv, >= rows)")
        require(mask.nb[0] == (4 if mask.type == GGMLType.F32 else 2), node, "mask rows not dense")
        margs = (I32(mask.ne[2]), I32(mask.ne[3]), I64(mask.nb[1]), I64(mask.nb[2]), I64(mask.nb[3]))
    else:
        margs = (I32(1), I32(1), I64(0), I64(0), I64(0))
    if sinks is not None:
        require(sinks.type == GGMLType.F32 and sinks.ne[0] >= n2, node, "sinks must be f32, one per head")
    scale, max_bias = node.param_f32(0), node.param_f32(1)
    m0, m1, h2 = alibi(n2, max_bias)
    threads = elem_threads(n0, ctx.warp, cap=1024 if n0 >= 4096 else 256)
    gx, gy = row_grid(n1 * n2 * n3)
    args = (ctx.ptr(x), ctx.ptr(mask), ctx.ptr(sinks), ctx.ptr(node),
            I32(mask.type if mask is not None else -1), F32(scale), F32(max_bias), F32(m0), F32(m1), I32(h2),
            I32(n0), I32(n1), I32(n2), I32(n3), *nb_args(x)[1:], *margs, *nb_args(node)[1:])
    return [launch(ctx.fn("norm", "k_soft_max"), (gx, gy), (threads,), args)]


def alibi(n_head: int, max_bias: float) -> tuple[float, float, int]:
    """ggml's ALiBi constants (m0, m1, n_head_log2) for `n_head` heads, in f32 like the reference."""
    import numpy as np

    h2 = 1 << int(math.floor(math.log2(max(1, n_head))))
    m0 = np.float32(2.0) ** np.float32(-max_bias / h2)
    m1 = np.float32(2.0) ** np.float32(-(max_bias / 2.0) / h2)
    return float(m0), float(m1), h2
