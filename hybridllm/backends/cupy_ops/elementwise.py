"""Elementwise ops on the GPU: ADD/SUB/MUL/DIV with broadcasting, UNARY and friends, SCALE, CLAMP, GLU."""
from __future__ import annotations

from ...ggml.tensor import Tensor
from ...ggml.types import GGMLOp, GluOp, UnaryOp
from . import register
from .common import (F32, I32, I64, BuildCtx, check_float, elem_threads, launch, nb_args, ne_args, require,
                     row_grid, src)

_U_SCALE, _U_CLAMP, _U_SQR, _U_SQRT, _U_LOG, _U_SIN, _U_COS, _U_LEAKY = 100, 101, 102, 103, 104, 105, 106, 107
_PSEUDO_UNARY = {GGMLOp.SQR: _U_SQR, GGMLOp.SQRT: _U_SQRT, GGMLOp.LOG: _U_LOG, GGMLOp.SIN: _U_SIN,
                 GGMLOp.COS: _U_COS}
_UNARY_OK = {UnaryOp.ABS, UnaryOp.SGN, UnaryOp.NEG, UnaryOp.STEP, UnaryOp.TANH, UnaryOp.ELU, UnaryOp.RELU,
             UnaryOp.SIGMOID, UnaryOp.GELU, UnaryOp.GELU_QUICK, UnaryOp.SILU, UnaryOp.HARDSWISH,
             UnaryOp.HARDSIGMOID, UnaryOp.EXP, UnaryOp.EXPM1, UnaryOp.SOFTPLUS, UnaryOp.GELU_ERF,
             UnaryOp.FLOOR, UnaryOp.CEIL, UnaryOp.ROUND, UnaryOp.TRUNC}
_GLU_OK = {GluOp.REGLU, GluOp.GEGLU, GluOp.SWIGLU, GluOp.SWIGLU_OAI, GluOp.GEGLU_ERF, GluOp.GEGLU_QUICK,
           GluOp.SWIGLU_CLAMP}


def _grid(node: Tensor, ctx: BuildCtx) -> tuple[tuple[int, int, int], tuple[int]]:
    n0, n1, n2, n3 = node.ne
    threads = elem_threads(n0, ctx.warp)
    gy, gz = row_grid(n1 * n2 * n3)
    return ((n0 + threads - 1) // threads, gy, gz), (threads,)


@register(GGMLOp.ADD, GGMLOp.SUB, GGMLOp.MUL, GGMLOp.DIV)
def build_binary(node: Tensor, ctx: BuildCtx):
    a, b = src(node, 0), src(node, 1)
    check_float(node, a, b, node)
    require(a.ne == node.ne, node, "src0 and dst shapes differ")
    require(all(a.ne[d] % b.ne[d] == 0 for d in range(4)), node, "src1 does not broadcast onto src0")
    grid, block = _grid(node, ctx)
    args = (I32(node.op), ctx.ptr(a), ctx.ptr(b), ctx.ptr(node), I32(a.type), I32(b.type), I32(node.type),
            *ne_args(node), *nb_args(a), *ne_args(b), *nb_args(b), *nb_args(node))
    return [launch(ctx.fn("elementwise", "k_binary"), grid, block, args)]


def _unary_launch(node: Tensor, ctx: BuildCtx, op: int, p0: float = 0.0, p1: float = 0.0):
    a = src(node, 0)
    check_float(node, a, node)
    require(a.nelements == node.nelements and a.ne == node.ne, node, "src0 and dst shapes differ")
    grid, block = _grid(node, ctx)
    args = (I32(op), F32(p0), F32(p1), ctx.ptr(a), ctx.ptr(node), I32(a.type), I32(node.type),
            *ne_args(node), *nb_args(a), *nb_args(node))
    return [launch(ctx.fn("elementwise", "k_unary"), grid, block, args)]


@register(GGMLOp.UNARY)
def build_unary(node: Tensor, ctx: BuildCtx):
    op = node.param_i32(0)
    require(op in _UNARY_OK, node, f"unary op {op} not supported")
    return _unary_launch(node, ctx, op)


@register(GGMLOp.SCALE)
def build_scale(node: Tensor, ctx: BuildCtx):
    return _unary_launch(node, ctx, _U_SCALE, node.param_f32(0), node.param_f32(1))


@register(GGMLOp.CLAMP)
def build_clamp(node: Tensor, ctx: BuildCtx):
    return _unary_launch(node, ctx, _U_CLAMP, node.param_f32(0), node.param_f32(1))


@register(GGMLOp.LEAKY_RELU)
def build_leaky_relu(node: Tensor, ctx: BuildCtx):
    return _unary_launch(node, ctx, _U_LEAKY, node.param_f32(0))


@register(*_PSEUDO_UNARY)
def build_math(node: Tensor, ctx: BuildCtx):
    return _unary_launch(node, ctx, _PSEUDO_UNARY[node.op])


@register(GGMLOp.GLU)
def build_glu(node: Tensor, ctx: BuildCtx):
    op, swapped = node.param_i32(0), node.param_i32(1)
    require(op in _GLU_OK, node, f"glu op {op} not supported")
    a = src(node, 0)
    b = node.src_at(1)
    check_float(node, a, node)
    pa = ctx.ptr(a)
    if b is not None:  # gate = src0, up = src1 (`swapped` only applies to the one-input form)
        require(b.type == a.type and b.ne == a.ne == node.ne, node, "operands differ in type or shape")
        pb, nba, nbb = ctx.ptr(b), a.nb, b.nb
    else:  # one input: each row holds [first half | second half]
        n = node.ne[0]
        require(a.ne[0] == 2 * n and a.ne[1:] == node.ne[1:], node, "src0 rows are not twice dst rows")
        half = n * a.nb[0]
        first, second = pa, type(pa)(int(pa) + half)
        pa, pb = (second, first) if swapped else (first, second)
        nba = nbb = a.nb
    grid, block = _grid(node, ctx)
    args = (I32(op), F32(node.param_f32(2)), F32(node.param_f32(3)), pa, pb, ctx.ptr(node), I32(a.type),
            I32(node.type), *ne_args(node), *(I64(x) for x in nba), *(I64(x) for x in nbb), *nb_args(node))
    return [launch(ctx.fn("elementwise", "k_glu"), grid, block, args)]

