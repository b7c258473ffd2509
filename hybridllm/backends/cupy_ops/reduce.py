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


ROUTER_MV_MAX, ROUTER_MV_THREADS = 1024, 256  # kernels/reduce.cu k_moe_router_mv


def router_mv_ok(mm: Tensor, ctx: BuildCtx) -> bool:
    """MUL_MAT(f32 router weight, one f32 column) that k_moe_router_mv computes with 16-byte loads."""
    a, b = mm.src_at(0), mm.src_at(1)
    if mm.op != GGMLOp.MUL_MAT or a is None or b is None or a.buffer is None or b.buffer is None:
        return False
    if a.type != GGMLType.F32 or b.type != GGMLType.F32 or mm.type != GGMLType.F32:
        return False
    K, n_exp = a.ne[0], a.ne[1]
    if a.ne[2:] != (1, 1) or b.ne != (K, 1, 1, 1) or mm.ne != (n_exp, 1, 1, 1) or n_exp > ROUTER_MV_MAX:
        return False
    if a.nb[0] != 4 or b.nb[0] != 4 or K % 4:
        return False
    try:
        return (int(ctx.ptr(a)) | int(ctx.ptr(b)) | a.nb[1]) % 16 == 0
    except Exception:
        return False


def build_moe_router_mv(ctx: BuildCtx, mm: Tensor, sm: Tensor, order: Tensor, wts: Tensor,
                        norm: Tensor | None, clamp: Tensor | None):
    """Decode: the router logits matvec and the router (build_moe_router) in one launch; the logits go to
    scratch memory, never to the MUL_MAT's tensor (skipped: the softmax was its only reader)."""
    from .common import F32, I64, P

    a, b = src(mm, 0), src(mm, 1)
    K, n_exp = a.ne[0], a.ne[1]
    n_used = wts.ne[1]
    out = norm if norm is not None else wts
    cmin, cmax = (clamp.param_f32(0), clamp.param_f32(1)) if clamp is not None else (0.0, 0.0)
    rows = ROUTER_MV_THREADS // ctx.warp
    args = (ctx.ptr(a), ctx.ptr(b), P(ctx.scratch(4 * n_exp)), P(ctx.counters(1)), ctx.ptr(order), ctx.ptr(out), I32(K), I64(a.nb[1]),
            I32(n_exp), I32(n_used), I32(norm is not None), F32(cmin), F32(cmax))
    return [launch(ctx.fn("reduce", "k_moe_router_mv"), ((n_exp + rows - 1) // rows,), (ROUTER_MV_THREADS,), args)]


def build_moe_wsum(ctx: BuildCtx, ex: Tensor, w: Tensor, out: Tensor, res: Tensor | None):
    """out = sum over slots of router weight x expert result (+ residual): MUL -> views -> ADD chain."""
    from .common import I64, NULL

    M, n_used, T = ex.ne[0], ex.ne[1], ex.ne[2]
    r = (ctx.ptr(res), I64(res.nb[1])) if res is not None else (NULL, I64(0))
    args = (ctx.ptr(ex), ctx.ptr(w), r[0], ctx.ptr(out), I32(M), I32(n_used), I64(ex.nb[1]), I64(ex.nb[2]),
            I64(w.nb[1]), I64(w.nb[2]), r[1], I64(out.nb[1]))
    require(T <= 65535, out, "too many tokens for one launch")
    return [launch(ctx.fn("reduce", "k_moe_wsum"), ((M + 255) // 256, T), (256,), args)]
