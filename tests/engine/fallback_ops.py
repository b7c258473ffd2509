"""Plain-numpy stand-ins for ops the numpy backend may not have yet (test-only, slow but independent).

`backend_with_fallbacks()` returns a NumpyBackend whose prepare() uses the real op registry first and
these formulas only for ops it lacks, so engine tests can run end to end while the backend is being
written. The formulas follow ggml-rpc.md §12 (and round MUL_MAT's src1 through ggml's vec_dot type,
and FLASH_ATTN_EXT's Q through F16, as the CPU reference does).
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from hybridllm.backends.base import Unsupported, nodes_to_run
from hybridllm.backends.numpy_backend import NumpyBackend, NumpyPlan
from hybridllm.backends.numpy_ops import OPS
from hybridllm.backends.numpy_ops.common import read_f32, rows_view, view
from hybridllm.ggml.tensor import Tensor
from hybridllm.ggml.types import GGMLOp, GGMLType, TRAITS
from hybridllm.quants import dequantize, quantize, vec_dot_type


def _matrix_f32(t: Tensor) -> np.ndarray:
    """(ne3, ne2, ne1, ne0) float32 values of any-typed tensor with dense rows."""
    if TRAITS[t.type].quantized:
        return dequantize(rows_view(t), t.type, t.ne[0])
    return read_f32(t).astype(np.float32)


def _round_src1(x: np.ndarray, wtype: int) -> np.ndarray:
    vt = vec_dot_type(wtype)
    if vt == GGMLType.F32:
        return x
    if vt == GGMLType.F16:
        return x.astype(np.float16).astype(np.float32)
    return dequantize(quantize(x, vt), vt, x.shape[-1])


def _mul_mat(node: Tensor) -> Callable[[], None]:
    a, b = node.src[0], node.src[1]
    out = view(node)

    def run() -> None:
        A, B = _matrix_f32(a), _round_src1(np.ascontiguousarray(read_f32(b), dtype=np.float32), a.type)
        r2, r3 = B.shape[1] // A.shape[1], B.shape[0] // A.shape[0]
        A = np.repeat(np.repeat(A, r2, axis=1), r3, axis=0)
        out[...] = np.matmul(B.astype(np.float64), np.swapaxes(A, -1, -2).astype(np.float64))
    return run


def _mul_mat_id(node: Tensor) -> Callable[[], None]:
    a, b, ids = node.src[0], node.src[1], node.src[2]
    out = view(node)

    def run() -> None:
        A = _matrix_f32(a)[0]                     # (n_expert, M, K)
        B = _round_src1(np.ascontiguousarray(read_f32(b)[0], dtype=np.float32), a.type)  # (T, n_b, K)
        I = view(ids)[0, 0]                       # (T, n_used)
        for t in range(I.shape[0]):
            for e in range(I.shape[1]):
                out[0, t, e] = A[I[t, e]].astype(np.float64) @ B[t, e % B.shape[1]].astype(np.float64)
    return run


def _flash_attn(node: Tensor) -> Callable[[], None]:
    q, k, v, mask = (node.src + [None] * 4)[:4]
    scale = node.param_f32(0)
    out = view(node)  # (S, n_q, H, Dv)

    def run() -> None:
        Q = read_f32(q).astype(np.float16).astype(np.float64)   # (S, H, n_q, D)
        K, V = read_f32(k).astype(np.float64), read_f32(v).astype(np.float64)  # (S, Hkv, n_kv, D)
        H, Hkv = Q.shape[1], K.shape[1]
        K, V = np.repeat(K, H // Hkv, axis=1), np.repeat(V, H // Hkv, axis=1)
        s = np.einsum("shqd,shkd->shqk", Q, K) * scale
        if mask is not None:
            m = read_f32(mask).astype(np.float64)[:, :, :Q.shape[2], :]  # (m3, m2, n_q, n_kv)
            s = s + m
        mx = np.max(s, axis=-1, keepdims=True)
        e = np.exp(s - np.where(np.isfinite(mx), mx, 0.0))
        den = e.sum(axis=-1, keepdims=True)
        o = np.einsum("shqk,shkd->shqd", e, V) / np.where(den == 0, 1.0, den)
        out[...] = np.swapaxes(o, 1, 2)
    return run


def _soft_max(node: Tensor) -> Callable[[], None]:
    a, mask = node.src[0], node.src_at(1)
    scale = node.param_f32(0)
    out = view(node)

    def run() -> None:
        x = read_f32(a).astype(np.float64) * scale
        if mask is not None:
            x = x + read_f32(mask).astype(np.float64)[..., :x.shape[2], :]
        x = np.exp(x - x.max(axis=-1, keepdims=True))
        out[...] = x / x.sum(axis=-1, keepdims=True)
    return run


def _argsort(node: Tensor) -> Callable[[], None]:
    a, desc = node.src[0], node.param_i32(0) == 1
    out = view(node)

    def run() -> None:
        x = read_f32(a)
        out[...] = np.argsort(-x if desc else x, axis=-1, kind="stable")
    return run


def _sum_rows(node: Tensor) -> Callable[[], None]:
    a = node.src[0]
    out = view(node)

    def run() -> None:
        out[...] = read_f32(a).astype(np.float64).sum(axis=-1, keepdims=True)
    return run


FALLBACKS: dict[GGMLOp, Callable[[Tensor], Callable[[], None]]] = {
    GGMLOp.MUL_MAT: _mul_mat, GGMLOp.MUL_MAT_ID: _mul_mat_id, GGMLOp.FLASH_ATTN_EXT: _flash_attn,
    GGMLOp.SOFT_MAX: _soft_max, GGMLOp.ARGSORT: _argsort, GGMLOp.SUM_ROWS: _sum_rows,
}


class FallbackBackend(NumpyBackend):
    """NumpyBackend + test-only formulas for the ops its registry does not have yet (or for `prefer`)."""

    def __init__(self, prefer: Sequence[GGMLOp] = ()) -> None:
        super().__init__()
        self.prefer = set(prefer)

    def prepare(self, nodes: Sequence[Tensor]) -> NumpyPlan:
        kernels = []
        for node in nodes_to_run(nodes):
            builder = (FALLBACKS.get(node.op) if node.op in self.prefer else None) or OPS.get(node.op) \
                or FALLBACKS.get(node.op)
            if builder is None:
                raise Unsupported(f"op {node.op.name} (node {node.name!r}) is not implemented")
            kernels.append(builder(node))
        return NumpyPlan(kernels)

    def missing(self) -> list[str]:
        return sorted(op.name for op in FALLBACKS if op not in OPS)
