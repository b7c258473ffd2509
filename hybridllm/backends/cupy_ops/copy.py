"""CPY, DUP and CONT on the GPU: logical element order with f32/f16/bf16/i32 conversion (kernels/rows.cu)."""
from __future__ import annotations

from ...ggml.tensor import Tensor
from ...ggml.types import GGMLOp, GGMLType, type_name
from . import register
from .common import ELEM_SIZE, I32, I64, BuildCtx, launch, require, src

_COPY_TYPES = (GGMLType.F32, GGMLType.F16, GGMLType.BF16, GGMLType.I32)
_BLOCK = 256


@register(GGMLOp.CPY, GGMLOp.DUP, GGMLOp.CONT)
def build_copy(node: Tensor, ctx: BuildCtx):
    a = src(node, 0)
    for t in (a, node):
        require(t.type in _COPY_TYPES, node, f"type {type_name(t.type)} not supported for copies on GPU")
    require(a.nelements == node.nelements, node, "element counts differ")
    if a.type != node.type:
        require(GGMLType.I32 not in (a.type, node.type) or GGMLType.F32 in (a.type, node.type), node,
                "i32 converts only to/from f32")
    count = node.nelements
    if a.type == node.type and a.is_contiguous and node.is_contiguous:
        nbytes = count * ELEM_SIZE[a.type]
        blocks = min(4096, max(1, (nbytes // 16 + _BLOCK - 1) // _BLOCK))
        return [launch(ctx.fn("rows", "k_memcpy"), (blocks,), (_BLOCK,),
                       (ctx.ptr(a), ctx.ptr(node), I64(nbytes)))]
    blocks = min(65535 * 16, (count + _BLOCK - 1) // _BLOCK)
    args = (ctx.ptr(a), ctx.ptr(node), I32(a.type), I32(node.type), I64(count),
            I32(a.ne[0]), I32(a.ne[1]), I32(a.ne[2]), *(I64(x) for x in a.nb),
            I32(node.ne[0]), I32(node.ne[1]), I32(node.ne[2]), *(I64(x) for x in node.nb))
    return [launch(ctx.fn("rows", "k_copy"), (blocks,), (_BLOCK,), args)]
