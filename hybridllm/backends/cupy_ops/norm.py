"""Row reductions on the GPU: RMS_NORM/NORM/L2_NORM (RMS_NORM -> MUL fused) and SOFT_MAX."""
from __future__ import annotations

import math

from ...ggml.tensor import Tensor
from ...ggml.types import GGMLOp, GGMLType, TensorFlag
from . import register
from .common import (F32, I32, I64, NULL, P, BuildCtx, elem_threads, launch, nb_args, require, row_grid,
                     src)

_KIND = {GGMLOp.RMS_NORM: 0, GGMLOp.NORM: 1, GGMLOp.L2_NORM: 2}


def _norm_launch(node: Tensor, out: Tensor, w: Tensor | None, ctx: BuildCtx, q8=None):
    x = src(node, 0)
    for t in (x, out):
        require(t.type == GGMLType.F32 and t.nb[0] == 4, node, f"{t.name!r} must be f32 with dense rows")
    require(out.ne == x.ne, node, "shapes differ")
    n0, n1, n2, n3 = x.ne
    threads = elem_threads((n0 + 3) // 4, ctx.warp, cap=1024)  # ~4 values per thread, held in registers
    gx, gy = row_grid(n1 * n2 * n3)
    if w is not None:
        wargs = (*(I32(n) for n in w.ne), *nb_args(w))
    else:
        wargs = (I32(1),) * 4 + (I64(0),) * 4
    args = (I32(_KIND[node.op]), F32(node.param_f32(0)), ctx.ptr(x), ctx.ptr(out),
            ctx.ptr(w) if w is not None else NULL, I32(n0), I32(n1), I32(n2), I32(n3),
            *nb_args(x)[1:], *nb_args(out)[1:], *wargs,
            P(q8.q) if q8 is not None else NULL, P(q8.d) if q8 is not None else NULL)
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
    """One pass: mul = rms_norm(x) * w, never writing the RMS_NORM result; with the q8 copy of the result
    when a matmul will read it as q8."""
    from .mmvq import q8_out

    q8 = q8_out(ctx, mul) if mul.ne[0] % 32 == 0 else None
    return _norm_launch(node, mul, mul.src_at(1), ctx, q8)


def norm_rope_ok(norm: Tensor, mul: Tensor, rope: Tensor) -> bool:
    """RMS_NORM -> MUL(w over dim 0 only) -> ROPE(NORMAL/NEOX, f32, plain positions) for one fused kernel."""
    from ...ggml.types import RopeMode

    w, x = mul.src_at(1), norm.src_at(0)
    if rope.op != GGMLOp.ROPE or rope.src_at(0) is not mul or rope.type != GGMLType.F32 or w is None:
        return False
    if x is None or x.type != GGMLType.F32 or x.nb[0] != 4 or rope.nb[0] != 4 or rope.ne != mul.ne:
        return False
    if w.ne[1:] != (1, 1, 1) or mul.ne[0] % w.ne[0] or mul.ne[0] > 1024 or mul.ne[0] % 2:
        return False
    pos = rope.src_at(1)
    mode, n_dims, n_offs = rope.param_i32(2), rope.param_i32(1), rope.param_i32(15)
    return (mode in (RopeMode.NORMAL, RopeMode.NEOX) and n_offs == 0 and n_dims % 2 == 0
            and 0 < n_dims <= mul.ne[0] and pos is not None and pos.type == GGMLType.I32
            and pos.ne[0] >= mul.ne[2] and mul.ne[3] == 1)


def build_norm_rope(norm: Tensor, mul: Tensor, rope: Tensor, ctx: BuildCtx, store: Tensor | None = None):
    """RMS_NORM -> MUL -> ROPE as one launch; with `store` (a SET_ROWS of the rope output viewed as rows of
    ne0*ne1), the result goes straight to the cache rows instead of the rope tensor."""
    import numpy as np

    from .rope import yarn_corr_dims

    x, w, pos, ff = norm.src[0], mul.src[1], rope.src[1], rope.src_at(2)
    assert x is not None and w is not None and pos is not None
    ne0, ne1, ne2, ne3 = x.ne
    n_dims, mode, n_ctx_orig = rope.param_i32(1), rope.param_i32(2), rope.param_i32(4)
    freq_base, freq_scale, ext_factor, attn_factor, beta_fast, beta_slow = (rope.param_f32(i) for i in range(5, 11))
    if ff is not None:
        require(ff.type == GGMLType.F32 and ff.ne[0] >= n_dims // 2, rope, "frequency factors must be f32")
    theta_scale = float(np.float32(freq_base) ** np.float32(-2.0 / n_dims))
    corr0, corr1 = yarn_corr_dims(n_dims, n_ctx_orig, freq_base, beta_fast, beta_slow)
    if store is not None:
        idx, cache = store.src[1], store
        assert idx is not None
        sargs = (ctx.ptr(idx), I32(idx.type == GGMLType.I64), ctx.ptr(cache), I32(cache.type == GGMLType.F16),
                 I64(cache.nb[1]))
    else:
        sargs = (NULL, I32(0), NULL, I32(0), I64(0))
    threads = elem_threads(ne0 // 2, ctx.warp, cap=256)
    gx, gy = row_grid(ne1 * ne2 * ne3)
    args = (ctx.ptr(x), ctx.ptr(rope), ctx.ptr(w), ctx.ptr(pos), ctx.ptr(ff), F32(norm.param_f32(0)), I32(ne0),
            I32(ne1), I32(ne2), I32(ne3), *nb_args(x)[1:], *nb_args(rope)[1:], I32(w.ne[0]), I64(w.nb[0]),
            I32(mode), I32(n_dims), F32(theta_scale), F32(freq_scale), F32(ext_factor), F32(attn_factor),
            F32(corr0), F32(corr1), *sargs)
    return [launch(ctx.fn("norm", "k_norm_rope"), (gx, gy), (threads,), args)]


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
