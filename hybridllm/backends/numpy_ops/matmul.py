"""MUL_MAT and MUL_MAT_ID (ggml-rpc.md §12.7-12.8) with ggml's CPU numerics.

ggml's CPU backend first converts src1 (the activations) to the weight type's vec_dot type (Q8_0, Q8_1,
Q8_K, F16, BF16 or F32) and then takes integer/half dot products. Both paths here do the same:
* the fast path (`cpu_kernels`, numba) keeps weights in their block format;
* the reference path (numpy, float64) dequantizes weight rows chunk by chunk and multiplies them with
  the dequantized converted activations. It is the test reference and the fallback for other types.
With the hint GGML_HINT_SRC0_IS_HADAMARD ggml skips the product and runs a fast Walsh-Hadamard
transform of src1; so do we.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ...ggml.tensor import Tensor
from ...ggml.types import TRAITS, GGMLOp, GGMLType, type_name
from ...quants import DEQUANTIZE_TYPES, dequantize, quantize, vec_dot_type
from . import Kernel, register
from .common import read_f32, require, rows_view, storage, view

try:
    from ..base import ComputeError
except ImportError:  # pragma: no cover - older base without ComputeError
    ComputeError = RuntimeError  # type: ignore[misc,assignment]

try:
    from ..cpu_kernels import get_matmul, mul_mat_id_mode, mul_mat_mode
except ImportError:  # pragma: no cover - numba missing: reference path only
    def get_matmul(atype: int, btype: int) -> Callable[..., Kernel] | None:  # type: ignore[misc]
        return None

HINT_SRC0_IS_HADAMARD = 1
_FLOAT_TYPES = (GGMLType.F32, GGMLType.F16, GGMLType.BF16)
_REF_CHUNK_ROWS = 4096  # weight rows dequantized at a time by the reference path


# --- reference (numpy) -----------------------------------------------------------------------------

def convert_activations(b: np.ndarray, btype: int, atype: int) -> tuple[np.ndarray, np.ndarray | None]:
    """src1 values (float32 [..., K], stored as `btype`) as ggml's vec_dot type of `atype` sees them:
    (dequantized values, Q8_1 block sums `s` as float32 or None)."""
    vt = vec_dot_type(atype)
    if vt == GGMLType.F32 or vt == btype:
        return b, None
    q = quantize(b, vt)
    vals = dequantize(q, vt, b.shape[-1])
    if vt != GGMLType.Q8_1:
        return vals, None
    blocks = q.reshape(*q.shape[:-1], -1, TRAITS[vt].type_size)
    return vals, blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)


def _q8_1_correction(a_rows: np.ndarray, atype: int, b_vals: np.ndarray, b_sums: np.ndarray) -> np.ndarray:
    """ggml adds m_a * s_b per block, with s_b the F16-rounded d_b*sum(q_b); dequantized values give
    m_a * d_b*sum(q_b). Returns the difference, [N, M]."""
    tr = TRAITS[atype]
    mins = a_rows.reshape(a_rows.shape[0], -1, tr.type_size)[..., 2:4].copy().view(np.float16)[..., 0]
    exact = b_vals.reshape(b_vals.shape[0], -1, 32).astype(np.float64).sum(-1)
    return (b_sums.astype(np.float64) - exact) @ mins.astype(np.float64).T


def mul_mat_ref(a_rows: np.ndarray, atype: int, b: np.ndarray, btype: int = GGMLType.F32) -> np.ndarray:
    """dst (b3, b2, N, M) = A·B per 2-D slice, A broadcast over dims 2/3, in float64.

    a_rows: uint8 (a3, a2, M, row_bytes), the weight rows as stored; b: float32 (b3, b2, N, K) values of
    src1 (of storage type `btype`)."""
    K = b.shape[-1]
    r2, r3 = b.shape[1] // a_rows.shape[1], b.shape[0] // a_rows.shape[0]
    vals, sums = convert_activations(b, btype, atype)
    out = np.empty((*b.shape[:3], a_rows.shape[2]), np.float64)
    for i3 in range(b.shape[0]):
        for i2 in range(b.shape[1]):
            rows = a_rows[i3 // r3, i2 // r2]
            bv = vals[i3, i2].astype(np.float64)
            for r0 in range(0, rows.shape[0], _REF_CHUNK_ROWS):
                chunk = rows[r0:r0 + _REF_CHUNK_ROWS]
                res = bv @ dequantize(chunk, atype, K).astype(np.float64).T
                if sums is not None:
                    res += _q8_1_correction(chunk, atype, vals[i3, i2], sums[i3, i2])
                out[i3, i2, :, r0:r0 + chunk.shape[0]] = res
    return out


def mul_mat_id_ref(a_rows: np.ndarray, atype: int, b: np.ndarray, ids: np.ndarray,
                   btype: int = GGMLType.F32) -> np.ndarray:
    """dst (n_tokens, n_used, M): dst[t, e] = A[ids[t, e]] · B[t, e % n_b] (float64).

    a_rows: uint8 (n_expert, M, row_bytes); b: float32 (n_tokens, n_b, K); ids: int (n_tokens, n_used)."""
    n_tok, n_used = ids.shape
    t_idx, e_idx = np.meshgrid(np.arange(n_tok), np.arange(n_used), indexing="ij")
    out = np.empty((n_tok, n_used, a_rows.shape[1]), np.float64)
    for x in np.unique(ids):
        hit = ids == x
        cols = b[t_idx[hit], e_idx[hit] % b.shape[1]]  # (n_hit, K)
        out[hit] = mul_mat_ref(a_rows[x][None, None], atype, cols[None, None], btype)[0, 0]
    return out


def fwht_ref(b: np.ndarray) -> np.ndarray:
    """ggml's fast Walsh-Hadamard transform of each row, scaled by 1/sqrt(n), with its float32 order:
    scale first, then butterflies (u+v, u-v) for span 1, 2, 4, ..."""
    n = b.shape[-1]
    x = b.reshape(-1, n).astype(np.float32) * np.float32(1.0 / np.sqrt(np.float32(n)))
    span = 1
    while span < n:
        y = x.reshape(x.shape[0], -1, 2, span)
        x = np.stack([y[:, :, 0] + y[:, :, 1], y[:, :, 0] - y[:, :, 1]], axis=2).reshape(x.shape[0], n)
        span *= 2
    return x.reshape(b.shape)


# --- node validation ----------------------------------------------------------------------------------

def _check_operands(node: Tensor, a: Tensor, b: Tensor) -> None:
    require(node.type == GGMLType.F32, node, f"dst must be F32, got {type_name(node.type)}")
    require(node.nb[0] == 4 and node.nb[0] <= node.nb[1] <= node.nb[2] <= node.nb[3], node,
            "dst must not be transposed or permuted")
    require(a.type in DEQUANTIZE_TYPES and a.type not in (GGMLType.Q8_1, GGMLType.Q8_K), node,
            f"weight type {type_name(a.type)} is not supported")
    require(a.ne[0] == b.ne[0], node, f"K mismatch: src0 ne0={a.ne[0]}, src1 ne0={b.ne[0]}")
    require(b.type in _FLOAT_TYPES and b.nb[0] == TRAITS[b.type].type_size, node,
            f"src1 must be F32/F16/BF16 with contiguous rows, got {type_name(b.type)} nb0={b.nb[0]}")
    vt = vec_dot_type(a.type)
    require(b.type == GGMLType.F32 or b.type == vt or vt == GGMLType.F32, node,
            f"src1 type {type_name(b.type)} cannot be used with weight type {type_name(a.type)}")


def _out_view(dst: Tensor) -> np.ndarray | None:
    """dst's buffer as flat float32 (None if dst's offsets are not 4-byte aligned)."""
    if dst.offset % 4 or any(s % 4 for s in dst.nb):
        return None
    arr = storage(dst)
    return arr[:arr.size // 4 * 4].view(np.float32)


def _group_arrays(goff: list[int], cols: list[list[tuple[int, int]]]) -> tuple[np.ndarray, ...]:
    """(goff, gcols, colb, colo) int64 arrays from per-group lists of (activation row, output offset)."""
    gcols = np.cumsum([0] + [len(c) for c in cols]).astype(np.int64)
    flat = [x for c in cols for x in c]
    colb = np.array([x[0] for x in flat], np.int64)
    colo = np.array([x[1] for x in flat], np.int64)
    return np.array(goff, np.int64), gcols, colb, colo


def _activation_offsets(b: Tensor) -> np.ndarray:
    """Byte offset of every src1 row, in (i3, i2, i1) order."""
    i3, i2, i1 = np.meshgrid(np.arange(b.ne[3]), np.arange(b.ne[2]), np.arange(b.ne[1]), indexing="ij")
    return (b.offset + i1 * b.nb[1] + i2 * b.nb[2] + i3 * b.nb[3]).reshape(-1).astype(np.int64)


# --- MUL_MAT -------------------------------------------------------------------------------------------

def _fast_mul_mat(node: Tensor, a: Tensor, b: Tensor) -> Kernel | None:
    mm = get_matmul(a.type, b.type)
    out = _out_view(node)
    if mm is None or out is None:
        return None
    rows_view(a)  # validates dense rows
    M, K, N = a.ne[1], a.ne[0], b.ne[1]
    r2, r3 = b.ne[2] // a.ne[2], b.ne[3] // a.ne[3]
    goff, cols = [], []
    for i03 in range(a.ne[3]):
        for i02 in range(a.ne[2]):  # one group per weight matrix: GQA heads sharing it go together
            goff.append(a.offset + i02 * a.nb[2] + i03 * a.nb[3])
            cols.append([((i3 * b.ne[2] + i2) * N + n, (node.offset + n * node.nb[1] + i2 * node.nb[2]
                                                         + i3 * node.nb[3]) // 4)
                         for i3 in range(i03 * r3, (i03 + 1) * r3)
                         for i2 in range(i02 * r2, (i02 + 1) * r2) for n in range(N)])
    goff_a, gcols, colb, colo = _group_arrays(goff, cols)
    # ggml picks its code path (and so its float summation order) from the product's shape
    mode = mul_mat_mode(a.type, b.type, N, M, b.is_contiguous)
    gmode = np.full(goff_a.shape[0], mode, np.int64)
    return mm(storage(a), a.nb[1], M, K, goff_a, gcols, gmode, colb, colo, storage(b), _activation_offsets(b), out)


def _ref_mul_mat(node: Tensor, a: Tensor, b: Tensor) -> Kernel:
    a_rows, b_view, dst = rows_view(a), view(b), view(node)

    def run() -> None:
        bv = b_view if b.type == GGMLType.F32 else read_f32(b)
        dst[...] = mul_mat_ref(a_rows, a.type, bv, b.type)
    return run


def _fwht(node: Tensor, b: Tensor) -> Kernel:
    n = b.ne[0]
    require(n & (n - 1) == 0 and node.ne[0] == n and b.type in (GGMLType.F32, GGMLType.F16), node,
            "Hadamard hint needs F32/F16 src1 rows of a power-of-two length")
    b_view, dst = view(b), view(node)

    def run() -> None:
        dst[...] = fwht_ref(read_f32(b) if b.type != GGMLType.F32 else b_view)
    return run


@register(GGMLOp.MUL_MAT)
def build_mul_mat(node: Tensor) -> Kernel:
    a, b = node.src_at(0), node.src_at(1)
    require(a is not None and b is not None, node, "needs two sources")
    assert a is not None and b is not None
    if node.param_i32(1) == HINT_SRC0_IS_HADAMARD:  # ggml's compute checks only the hint
        return _fwht(node, b)
    _check_operands(node, a, b)
    require(b.ne[2] % a.ne[2] == 0 and b.ne[3] % a.ne[3] == 0, node, "src0 does not broadcast to src1")
    require(node.ne == (a.ne[1], b.ne[1], b.ne[2], b.ne[3]), node, f"dst shape {node.ne} is wrong")
    if node.nelements == 0:
        return lambda: None
    return _fast_mul_mat(node, a, b) or _ref_mul_mat(node, a, b)


# --- MUL_MAT_ID ----------------------------------------------------------------------------------------

def _read_ids(ids_view: np.ndarray, n_expert: int, node: Tensor) -> np.ndarray:
    """ids as int64 (n_tokens, n_used); ComputeError if any is outside [0, n_expert)."""
    ids = ids_view[0, 0].astype(np.int64)
    bad = (ids < 0) | (ids >= n_expert)
    if bad.any():
        raise ComputeError(f"MUL_MAT_ID {node.name!r}: expert id {int(ids[bad][0])} is outside "
                           f"[0, {n_expert})")
    return ids


def _fast_mul_mat_id(node: Tensor, a: Tensor, b: Tensor, ids_t: Tensor) -> Kernel | None:
    mm = get_matmul(a.type, b.type)
    out = _out_view(node)
    if mm is None or out is None:
        return None
    rows_view(a)
    M, K, n_b, n_expert = a.ne[1], a.ne[0], b.ne[1], a.ne[2]
    abuf, bbuf, boff, ids_view = storage(a), storage(b), _activation_offsets(b), view(ids_t)
    n_tok, n_used = ids_t.ne[1], ids_t.ne[0]
    t_idx, e_idx = np.meshgrid(np.arange(n_tok), np.arange(n_used), indexing="ij")
    colb_all = (t_idx * n_b + e_idx % n_b).reshape(-1)
    colo_all = ((node.offset + e_idx * node.nb[1] + t_idx * node.nb[2]) // 4).reshape(-1)

    def run() -> None:
        ids = _read_ids(ids_view, n_expert, node).reshape(-1)
        order = np.argsort(ids, kind="stable")  # group the columns by expert
        experts, starts, counts = np.unique(ids[order], return_index=True, return_counts=True)
        gcols = np.append(starts, ids.size).astype(np.int64)
        goff = (a.offset + experts * a.nb[2]).astype(np.int64)
        gmode = np.array([mul_mat_id_mode(a.type, int(n)) for n in counts], np.int64)
        mm(abuf, a.nb[1], M, K, goff, gcols, gmode, colb_all[order], colo_all[order], bbuf, boff, out)()
    return run


def _ref_mul_mat_id(node: Tensor, a: Tensor, b: Tensor, ids_t: Tensor) -> Kernel:
    a_rows, b_view, ids_view, dst = rows_view(a), view(b), view(ids_t), view(node)

    def run() -> None:
        ids = _read_ids(ids_view, a.ne[2], node)
        bv = b_view if b.type == GGMLType.F32 else read_f32(b)
        dst[0] = mul_mat_id_ref(a_rows[0], a.type, bv[0], ids, b.type)
    return run


@register(GGMLOp.MUL_MAT_ID)
def build_mul_mat_id(node: Tensor) -> Kernel:
    a, b, ids = node.src_at(0), node.src_at(1), node.src_at(2)
    require(a is not None and b is not None and ids is not None, node, "needs three sources")
    assert a is not None and b is not None and ids is not None
    _check_operands(node, a, b)
    require(ids.type == GGMLType.I32 and ids.ne[2] == 1 and ids.ne[3] == 1, node, "ids must be 2-D I32")
    require(a.ne[3] == 1 and b.ne[3] == 1 and ids.ne[1] == b.ne[2] and ids.ne[0] % b.ne[1] == 0, node,
            "src0/src1/ids shapes do not match")
    require(node.ne == (a.ne[1], ids.ne[0], b.ne[2], 1), node, f"dst shape {node.ne} is wrong")
    if node.nelements == 0:
        return lambda: None
    return _fast_mul_mat_id(node, a, b, ids) or _ref_mul_mat_id(node, a, b, ids)
