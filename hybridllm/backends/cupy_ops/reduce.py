"""SUM_ROWS, MEAN, ARGSORT and TOP_K on the GPU (kernels/reduce.cu): what a MoE router needs besides
SOFT_MAX, GET_ROWS and the elementwise ops."""
from __future__ import annotations

from ...ggml.tensor import Tensor
from ...ggml.types import GGMLOp, GGMLType
from . import register
from .common import I32, BuildCtx, elem_threads, launch, nb_args, require, row_grid, src

SORT_MAX = 4096  # kernels/reduce.cu


@register(GGMLOp.SUM_ROWS, GGMLOp.MEAN)
def build_sum_rows(node: Tensor, ctx: BuildCtx):
    x = src(node, 0)
    require(x.type == GGMLType.F32 and node.type == GGMLType.F32, node, "only f32 is supported")
    require(node.ne == (1,) + x.ne[1:], node, f"result {node.ne} is not (1, {x.ne[1:]})")
    n0, n1, n2, n3 = x.ne
    gx, gy = row_grid(n1 * n2 * n3)
    args = (ctx.ptr(x), ctx.ptr(node), I32(node.op == GGMLOp.MEAN), I32(n0), I32(n1), I32(n2), I32(n3),
            *nb_args(x), *nb_args(node)[1:])
    return [launch(ctx.fn("reduce", "k_sum_rows"), (gx, gy), (elem_threads(n0, ctx.warp),), args)]


@register(GGMLOp.ARGSORT, GGMLOp.TOP_K)
def build_argsort(node: Tensor, ctx: BuildCtx):
    x = src(node, 0)
    require(x.type == GGMLType.F32 and node.type == GGMLType.I32, node, "f32 -> i32 only")
    n0, n1, n2, n3 = x.ne
    require(n0 <= SORT_MAX, node, f"rows longer than {SORT_MAX} are not sorted on GPU")
    if node.op == GGMLOp.ARGSORT:
        require(node.ne == x.ne, node, "shapes differ")
        desc, k = node.param_i32(0) == 1, n0
    else:
        k = node.ne[0]
        require(node.ne[1:] == x.ne[1:] and 0 < k <= n0, node, f"bad top-k shape {node.ne} for {x.ne}")
        desc = True
    gx, gy = row_grid(n1 * n2 * n3)
    args = (ctx.ptr(x), ctx.ptr(node), I32(desc), I32(k), I32(n0), I32(n1), I32(n2), I32(n3), *nb_args(x),
            *nb_args(node))
    return [launch(ctx.fn("reduce", "k_argsort"), (gx, gy), (elem_threads(n0, ctx.warp),), args)]


def build_moe_router(ctx: BuildCtx, sm: Tensor, order: Tensor, wts: Tensor, norm: Tensor | None,
                     clamp: Tensor | None):
    """SOFT_MAX -> ARGSORT -> GET_ROWS of the top n_used [-> SUM_ROWS -> CLAMP -> DIV] per token in one launch
    (see fusion.match_moe_router); writes the ARGSORT result and the final weights."""
    from .common import F32, I64

    logits = src(sm, 0)
    n_exp, n_tok = logits.ne[0], logits.ne[1]
    n_used = wts.ne[1]
    out = norm if norm is not None else wts
    cmin, cmax = (clamp.param_f32(0), clamp.param_f32(1)) if clamp is not None else (0.0, 0.0)
    gx, gy = row_grid(n_tok)
    token_stride = out.nb[1] if norm is not None else out.nb[2]  # (n_used, T) or (1, n_used, T), contiguous
    args = (ctx.ptr(logits), ctx.ptr(order), ctx.ptr(out), I32(n_exp), I32(n_used), I32(n_tok),
            I32(norm is not None), F32(cmin), F32(cmax), I64(logits.nb[1]), I64(order.nb[1]), I64(token_stride))
    return [launch(ctx.fn("reduce", "k_moe_router"), (gx, gy), (elem_threads(n_exp, ctx.warp),), args)]


def build_moe_wsum(ctx: BuildCtx, ex: Tensor, w: Tensor, out: Tensor, res: Tensor | None):
    """out = sum over slots of router weight x expert result (+ residual): MUL -> views -> ADD chain."""
    from .common import I64, NULL

    M, n_used, T = ex.ne[0], ex.ne[1], ex.ne[2]
    r = (ctx.ptr(res), I64(res.nb[1])) if res is not None else (NULL, I64(0))
    args = (ctx.ptr(ex), ctx.ptr(w), r[0], ctx.ptr(out), I32(M), I32(n_used), I64(ex.nb[1]), I64(ex.nb[2]),
            I64(w.nb[1]), I64(w.nb[2]), r[1], I64(out.nb[1]))
    require(T <= 65535, out, "too many tokens for one launch")
    return [launch(ctx.fn("reduce", "k_moe_wsum"), ((M + 255) // 256, T), (256,), args)]
