"""GET_ROWS and SET_ROWS: row gather/scatter by index tensors (ggml-rpc.md §12.9, §12.10).

Indices are data: they are checked on every run and an out-of-range index raises ComputeError (the
reference aborts the process). GET_ROWS dequantizes any table type; SET_ROWS converts/quantizes rows into
the destination type, which is how KV caches are written (including the transposed-V form, where the
destination is viewed as (1, n) and every "row" is one element).
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from ...ggml.tensor import Tensor
from ...ggml.types import GGMLOp, GGMLType, type_name
from ..base import ComputeError, Unsupported
from . import Kernel, register
from .common import bf16_to_f32, f32_to_bf16, require, rows_view, view

F32 = np.float32


def check_indices(idx: np.ndarray, n: int, node: Tensor) -> None:
    """Raise ComputeError unless every index is in [0, n)."""
    if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= n):
        bad = idx[(idx < 0) | (idx >= n)].ravel()[0]
        raise ComputeError(f"{node.op.name} {node.name!r}: row index {int(bad)} out of range [0, {n})")


def _row_reader(src: Tensor) -> Callable[[np.ndarray], np.ndarray]:
    """Gather rows (by a tuple of index arrays into the (ne3, ne2, ne1) axes) as output-ready values."""
    if src.is_quantized:
        from ...quants import DEQUANTIZE_TYPES, dequantize
        if src.type not in DEQUANTIZE_TYPES:
            raise Unsupported(f"GET_ROWS: cannot dequantize {type_name(src.type)}")
        raw, qtype, n = rows_view(src), src.type, src.ne[0]
        return lambda ix: dequantize(raw[ix], qtype, n)
    v = view(src)
    if src.type == GGMLType.BF16:
        return lambda ix: bf16_to_f32(v[ix])
    return lambda ix: v[ix]


@register(GGMLOp.GET_ROWS)
def build_get_rows(node: Tensor) -> Kernel:
    src, ids = node.src[0], node.src_at(1)
    require(src is not None and ids is not None, node, "needs a table and indices")
    assert src is not None and ids is not None
    require(ids.type == GGMLType.I32, node, f"indices must be i32, not {type_name(ids.type)}")
    require(src.ne[2] == ids.ne[1] and src.ne[3] == ids.ne[2] and ids.ne[3] == 1, node,
            f"table {src.ne} and indices {ids.ne} do not match")
    require(node.ne == (src.ne[0], ids.ne[0], ids.ne[1], ids.ne[2]), node, f"result shape {node.ne} is wrong")
    if src.type == GGMLType.I32 or node.type == GGMLType.I32:
        require(src.type == node.type, node, "i32 rows only gather into i32")
    else:
        require(node.type in (GGMLType.F32, GGMLType.F16, GGMLType.BF16), node,
                f"cannot gather into {type_name(node.type)}")
    read, n_rows = _row_reader(src), src.ne[1]
    iv, dv = view(ids)[0], view(node)          # (ne12, ne11, ne10), (ne12, ne11, ne10, ne0)
    to_bf16 = node.type == GGMLType.BF16
    if src.ne[2] == 1 and src.ne[3] == 1:
        flat_i, flat_d = iv[0, 0], dv[0, 0]

        def kernel() -> None:
            check_indices(flat_i, n_rows, node)
            rows = read((0, 0, flat_i))
            np.copyto(flat_d, f32_to_bf16(rows) if to_bf16 else rows, casting="same_kind")
        return kernel
    g3 = np.arange(ids.ne[2])[:, None, None]
    g2 = np.arange(ids.ne[1])[None, :, None]

    def kernel_nd() -> None:
        check_indices(iv, n_rows, node)
        rows = read((g3, g2, iv))
        np.copyto(dv, f32_to_bf16(rows) if to_bf16 else rows, casting="same_kind")
    return kernel_nd


def _row_writer(node: Tensor, src: Tensor) -> Callable[[tuple, np.ndarray], None]:
    """Store source rows (float32/float16 values) at an index tuple into the destination's rows."""
    if node.is_quantized:
        from ...quants import QUANTIZE_TYPES, quantize
        require(node.type in QUANTIZE_TYPES, node, f"cannot quantize rows into {type_name(node.type)}")
        raw, qtype = rows_view(node), node.type

        def put_q(ix: tuple, rows: np.ndarray) -> None:
            raw[ix] = quantize(np.ascontiguousarray(rows, dtype=F32), qtype)
        return put_q
    dv = view(node)
    if node.type == GGMLType.BF16:
        def put_bf16(ix: tuple, rows: np.ndarray) -> None:
            dv[ix] = f32_to_bf16(rows.astype(F32, copy=False))
        return put_bf16
    require(node.type in (GGMLType.F32, GGMLType.F16), node, f"cannot store rows into {type_name(node.type)}")

    def put(ix: tuple, rows: np.ndarray) -> None:
        dv[ix] = rows       # numpy's cast: f32 -> f16 round-to-nearest-even
    return put


@register(GGMLOp.SET_ROWS)
def build_set_rows(node: Tensor) -> Kernel:
    src, ids = node.src[0], node.src_at(1)
    require(src is not None and ids is not None, node, "needs rows and indices")
    assert src is not None and ids is not None
    require(src.type in (GGMLType.F32, GGMLType.F16), node, f"rows must be f32/f16, not {type_name(src.type)}")
    require(ids.type in (GGMLType.I32, GGMLType.I64), node, f"indices must be i32/i64, not {type_name(ids.type)}")
    nc, nr, ne02, ne03 = src.ne
    require(node.ne[0] == nc and node.ne[2] == ne02 and node.ne[3] == ne03, node,
            f"rows {src.ne} do not fit the destination {node.ne}")
    require(ids.ne[0] == nr and ids.ne[3] == 1 and ne02 % ids.ne[1] == 0 and ne03 % ids.ne[2] == 0, node,
            f"indices {ids.ne} do not match rows {src.ne}")
    sv, iv, n_dst = view(src), view(ids)[0], node.ne[1]   # iv: (ne12, ne11, nr)
    put = _row_writer(node, src)
    if ne02 == 1 and ne03 == 1:
        rows2, idx1 = sv[0, 0], iv[0, 0]

        def kernel() -> None:
            check_indices(idx1, n_dst, node)
            put((0, 0, idx1), rows2)
        return kernel
    m3 = (np.arange(ne03) % ids.ne[2])[:, None]
    m2 = (np.arange(ne02) % ids.ne[1])[None, :]
    g3 = np.arange(ne03)[:, None, None]
    g2 = np.arange(ne02)[None, :, None]

    def kernel_nd() -> None:
        idx = iv[m3, m2]                  # (ne03, ne02, nr): indices broadcast by modulo
        check_indices(idx, n_dst, node)
        put((g3, g2, idx), sv)
    return kernel_nd
