"""GET_ROWS and SET_ROWS on the GPU (kernels/rows.cu); indices are validated on the device."""
from __future__ import annotations

from ...ggml.tensor import Tensor
from ...ggml.types import GGMLOp, GGMLType, TRAITS, type_name
from . import register
from .common import ELEM_SIZE, I32, I64, BuildCtx, dense_rows, elem_threads, launch, require, row_grid, src
from .matmul import WEIGHT_TYPES


@register(GGMLOp.GET_ROWS)
def build_get_rows(node: Tensor, ctx: BuildCtx):
    table, idx = src(node, 0), src(node, 1)
    require(idx.type == GGMLType.I32, node, "indices must be i32")
    n00, nr, a2, a3 = table.ne
    n, b1, b2, _ = idx.ne
    require(node.ne == (n00, n, b1, b2), node, "dst shape differs from (ne00, n, b1, b2)")
    if table.type == GGMLType.I32:
        require(node.type == GGMLType.I32, node, "an i32 table gives an i32 result")
        kname = "get_rows_i32"
        require(table.nb[0] == 4, node, "table rows are not dense")
    else:
        require(table.type in WEIGHT_TYPES, node, f"table type {type_name(table.type)} not supported")
        require(node.type == GGMLType.F32, node, "dst must be f32")
        dense_rows(node, table)
        require(int(ctx.ptr(table)) % WEIGHT_TYPES[table.type] == 0, node, "table is misaligned")
        kname = f"get_rows_{TRAITS[table.type].name}"
    require(node.nb[0] == ELEM_SIZE[node.type], node, "dst rows are not dense")
    require(b1 == a2 and b2 == a3, node, "table dims 2/3 must equal the index dims 1/2")
    groups = (n00 + 7) // 8 if table.type != GGMLType.I32 else n00
    threads = elem_threads(groups, ctx.warp)
    gy, gz = row_grid(n * b1 * b2)
    args = (ctx.ptr(table), ctx.ptr(idx), ctx.ptr(node), ctx.err_ptr, ctx.error_code(node, "row index out of range"),
            I32(n00), I32(nr), I64(table.nb[1]), I64(table.nb[2]), I64(table.nb[3]), I32(n), I32(b1),
            I32(b2), I64(idx.nb[0]), I64(idx.nb[1]), I64(idx.nb[2]), I64(node.nb[1]), I64(node.nb[2]),
            I64(node.nb[3]))
    return [launch(ctx.fn("rows", kname), ((groups + threads - 1) // threads, gy, gz), (threads,), args)]


@register(GGMLOp.SET_ROWS)
def build_set_rows(node: Tensor, ctx: BuildCtx):
    rows, idx = src(node, 0), src(node, 1)
    require(rows.type in (GGMLType.F32, GGMLType.F16), node, "rows must be f32/f16")
    require(idx.type in (GGMLType.I32, GGMLType.I64), node, "indices must be i32/i64")
    require(node.type in (GGMLType.F32, GGMLType.F16, GGMLType.BF16), node,
            f"destination type {type_name(node.type)} not supported on GPU")
    ne0, n, ne2, ne3 = rows.ne
    require(node.ne[0] == ne0 and node.ne[2] == ne2 and node.ne[3] == ne3, node, "row shapes differ")
    require(idx.ne[0] == n and ne2 % idx.ne[1] == 0 and ne3 % idx.ne[2] == 0, node, "index shape mismatch")
    threads = elem_threads(ne0, ctx.warp)
    gy, gz = row_grid(n * ne2 * ne3)
    args = (ctx.ptr(rows), ctx.ptr(idx), ctx.ptr(node), ctx.err_ptr, ctx.error_code(node, "row index out of range"),
            I32(rows.type), I32(node.type), I32(idx.type == GGMLType.I64), I32(ne0), I32(n), I32(ne2),
            I32(ne3), *(I64(x) for x in rows.nb), I32(idx.ne[1]), I32(idx.ne[2]), I64(idx.nb[0]),
            I64(idx.nb[1]), I64(idx.nb[2]), I64(node.ne[1]), *(I64(x) for x in node.nb))
    return [launch(ctx.fn("rows", "k_set_rows"), ((ne0 + threads - 1) // threads, gy, gz), (threads,), args)]
