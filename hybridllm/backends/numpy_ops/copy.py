"""CPY, DUP, CONT: copy src0 into the node's storage in logical element order, converting types.

Plain types convert through f32 the way ggml does (F16 round-to-nearest-even, BF16 via common.f32_to_bf16,
F32->I32 truncation). A quantized destination quantizes each source row (ne00 values, dense) into
consecutive blocks of the (contiguous) destination; a quantized source is dequantized. Shapes may differ
as long as the element counts match; only the destination's logical elements are written.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from ...ggml.tensor import Tensor
from ...ggml.types import TRAITS, GGMLOp, GGMLType, type_name
from ..base import Unsupported
from . import Kernel, register
from .common import bf16_to_f32, f32_to_bf16, require, rows_view, storage, view


def reshaped(v: np.ndarray, shape: tuple[int, ...]) -> np.ndarray | None:
    """v with a new shape as a view of the same memory, or None when that needs a copy."""
    r = v.view()
    try:
        r.shape = shape
    except AttributeError:
        return None
    return r


def logical_pair(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
    """(src', dst', fixed): views of equal shape over the same elements in logical order. When neither
    side can be reshaped without a copy, fixed is False and src must be reshaped at run time."""
    if src.shape == dst.shape:
        return src, dst, True
    d = reshaped(dst, src.shape)
    if d is not None:
        return src, d, True
    s = reshaped(src, dst.shape)
    if s is not None:
        return s, dst, True
    return src, dst, False


def convert_fn(src_type: GGMLType, dst_type: GGMLType) -> Callable[[np.ndarray], np.ndarray] | None:
    """Values of src_type (numpy view dtype) -> values of dst_type; None for a plain same-type copy."""
    if src_type == dst_type:
        return None
    if dst_type == GGMLType.BF16:
        if src_type == GGMLType.F32:
            return f32_to_bf16
        return lambda x: f32_to_bf16(x.astype(np.float32))
    if src_type == GGMLType.BF16:
        return bf16_to_f32
    return lambda x: x   # numpy's cast on assignment: RNE to f16, truncation to int


def _copy_kernel(src_v: np.ndarray, dst_v: np.ndarray, conv: Callable[[np.ndarray], np.ndarray] | None
                 ) -> Kernel:
    s, d, fixed = logical_pair(src_v, dst_v)
    shape = d.shape
    if conv is None and fixed:
        return lambda: np.copyto(d, s, casting="unsafe")
    cv = conv or (lambda x: x)

    def kernel() -> None:
        x = cv(s if fixed else s.reshape(shape))
        with np.errstate(invalid="ignore"):
            np.copyto(d, x.reshape(shape) if x.shape != shape else x, casting="unsafe")
    return kernel


def _to_quantized(node: Tensor, src: Tensor) -> Kernel:
    from ...quants import QUANTIZE_TYPES, quantize
    from .elementwise import f32_source
    tr = TRAITS[node.type]
    require(node.type in QUANTIZE_TYPES, node, f"cannot quantize into {type_name(node.type)}")
    require(src.type in (GGMLType.F32, GGMLType.F16, GGMLType.BF16), node,
            f"cannot quantize from {type_name(src.type)}")
    require(node.is_contiguous, node, "quantized destination must be contiguous")
    require(src.ne[0] % tr.blck_size == 0, node, f"source rows of {src.ne[0]} are not whole {tr.name} blocks")
    read = f32_source(src)
    dst = storage(node)[node.offset:node.offset + node.nbytes]
    qtype = node.type

    def kernel() -> None:
        dst[:] = quantize(np.ascontiguousarray(read()), qtype).reshape(-1)
    return kernel


def _from_quantized(node: Tensor, src: Tensor) -> Kernel:
    from ...quants import DEQUANTIZE_TYPES, dequantize
    require(src.type in DEQUANTIZE_TYPES, node, f"cannot dequantize {type_name(src.type)}")
    require(node.type in (GGMLType.F32, GGMLType.F16, GGMLType.BF16), node,
            f"cannot dequantize into {type_name(node.type)}")
    rows = rows_view(src)
    qtype, n = src.type, src.ne[0]
    conv = convert_fn(GGMLType.F32, node.type)
    d = view(node)
    shape = d.shape

    def kernel() -> None:
        x = dequantize(rows, qtype, n)
        if conv is not None:
            x = conv(x)
        np.copyto(d, x.reshape(shape), casting="same_kind")
    return kernel


def _quantized_same(node: Tensor, src: Tensor) -> Kernel:
    a, b = rows_view(src), rows_view(node)
    if a.shape == b.shape:
        return lambda: np.copyto(b, a)
    require(src.is_contiguous and node.is_contiguous, node, "reshaping quantized copy needs contiguous tensors")
    sa = storage(src)[src.offset:src.offset + src.nbytes]
    sb = storage(node)[node.offset:node.offset + node.nbytes]
    return lambda: np.copyto(sb, sa)


@register(GGMLOp.CPY, GGMLOp.DUP, GGMLOp.CONT)
def build_copy(node: Tensor) -> Kernel:
    src = node.src[0]
    require(src is not None, node, "needs a source")
    assert src is not None
    require(src.nelements == node.nelements, node,
            f"element counts differ: {src.nelements} -> {node.nelements}")
    sq, dq = src.is_quantized, node.is_quantized
    if sq and dq:
        require(src.type == node.type, node, f"cannot convert {type_name(src.type)} -> {type_name(node.type)}")
        return _quantized_same(node, src)
    if dq:
        return _to_quantized(node, src)
    if sq:
        return _from_quantized(node, src)
    try:
        sv, dv = view(src), view(node)
    except Unsupported as exc:
        raise Unsupported(f"{node.op.name} {node.name!r}: {exc}") from None
    return _copy_kernel(sv, dv, convert_fn(src.type, node.type))
