"""MUL_MAT / MUL_MAT_ID op builders: the numba path against the numpy reference for every weight type,
with broadcasting (GQA), strided weights, permuted activations, expert routing and bad ids.
The reference itself is checked against real ggml in test_ggml_oracle.py."""
from __future__ import annotations

import numpy as np
import pytest
from matmul_blocks import ALL_TYPES, FLOAT_TYPES, new_buffer, place, random_rows

from hybridllm.backends.base import Unsupported
from hybridllm.backends.numpy_ops import matmul
from hybridllm.backends.numpy_ops.matmul import (
    build_mul_mat,
    build_mul_mat_id,
    fwht_ref,
    mul_mat_id_ref,
    mul_mat_ref,
)
from hybridllm.ggml.tensor import Tensor, pack_params
from hybridllm.ggml.types import TRAITS, GGMLOp
from hybridllm.ggml.types import GGMLType as T
from hybridllm.quants import dequantize, quantize

try:
    from hybridllm.backends.base import ComputeError
except ImportError:  # pragma: no cover
    ComputeError = RuntimeError  # type: ignore[misc,assignment]


def _k_for(atype: int, base: int = 512) -> int:
    return base + 7 if atype in FLOAT_TYPES else base  # float types: a K that is no multiple of 16


def _close(ours: np.ndarray, ref: np.ndarray, rtol: float = 2e-6) -> None:
    """Equal up to float32 summation order: errors relative to the largest output of the slice."""
    scale = np.abs(ref).max(axis=-1, keepdims=True) + 1e-30
    err = np.abs(ours.astype(np.float64) - ref) / scale
    assert err.max() <= rtol, f"max error {err.max():.3g} (relative to the row's largest output)"


def mul_mat_node(rng: np.random.Generator, atype: int, K: int, M: int, N: int, a23: tuple[int, int] = (1, 1),
                 b23: tuple[int, int] = (1, 1), a_row_pad: int = 0, permuted_b: bool = False
                 ) -> tuple[Tensor, np.ndarray, np.ndarray]:
    """A MUL_MAT node over fresh memory: (node, weight rows uint8 (a3,a2,M,rb), activations (b3,b2,N,K))."""
    rows = random_rows(rng, atype, (a23[1], a23[0], M), K)
    rb = rows.shape[-1]
    acts = rng.standard_normal((b23[1], b23[0], N, K)).astype(np.float32)
    buf = new_buffer(rows.size + M * a23[0] * a23[1] * a_row_pad + acts.nbytes + 4 * M * N * b23[0] * b23[1] + 256)
    nb1 = rb + a_row_pad
    a_nb = (TRAITS[atype].type_size, nb1, nb1 * M, nb1 * M * a23[0])
    a = place(buf, 0, atype, (K, M, *a23), nb=a_nb, name="a")
    for i3 in range(a23[1]):
        for i2 in range(a23[0]):
            for m in range(M):
                off = i3 * a_nb[3] + i2 * a_nb[2] + m * nb1
                buf.array[off:off + rb] = rows[i3, i2, m]
    b_off = (a_nb[3] * a23[1] + 31) // 32 * 32
    if permuted_b:  # memory order (K, b2, N, b3): a permuted view like attention's q
        mem = np.ascontiguousarray(acts.transpose(0, 2, 1, 3))
        b_nb = (4, 4 * K * b23[0], 4 * K, 4 * K * b23[0] * N)
        b = place(buf, b_off, T.F32, (K, N, *b23), mem, nb=b_nb, name="b")
    else:
        b = place(buf, b_off, T.F32, (K, N, *b23), acts, name="b")
    dst = Tensor(T.F32, (M, N, *b23), op=GGMLOp.MUL_MAT, src=[a, b], buffer=buf,
                 offset=(b_off + acts.nbytes + 31) // 32 * 32, name="dst")
    return dst, rows, acts


def _result(node: Tensor) -> np.ndarray:
    return matmul.view(node).copy()


@pytest.mark.parametrize("atype", ALL_TYPES, ids=lambda t: T(t).name)
def test_mul_mat_every_type(atype: int) -> None:
    rng = np.random.default_rng(int(atype))
    K = _k_for(atype)
    for M, N in ((37, 1), (40, 6)):
        node, rows, acts = mul_mat_node(rng, atype, K, M, N)
        build_mul_mat(node)()
        _close(_result(node), mul_mat_ref(rows, atype, acts))


@pytest.mark.parametrize("atype", [T.Q8_0, T.Q4_K, T.F16, T.F32], ids=lambda t: T(t).name)
def test_broadcast_strided_weights_and_permuted_activations(atype: int) -> None:
    rng = np.random.default_rng(7)
    node, rows, acts = mul_mat_node(rng, atype, _k_for(atype, 256), M=19, N=5, a23=(2, 1), b23=(4, 3),
                                    a_row_pad=40, permuted_b=True)
    assert not node.src[1].is_contiguous and not node.src[0].is_contiguous
    build_mul_mat(node)()
    _close(_result(node), mul_mat_ref(rows, atype, acts))
    # GQA: heads 0,1 use weight matrix 0 and heads 2,3 matrix 1
    alone = mul_mat_ref(rows[:, 1:2], atype, acts[:, 3:4])
    _close(_result(node)[:, 3:4], alone)


@pytest.mark.parametrize("atype", [T.Q5_0, T.Q6_K, T.BF16], ids=lambda t: T(t).name)
def test_reference_fallback_matches_fast_path(atype: int, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(11)
    node, _, _ = mul_mat_node(rng, atype, 512, M=33, N=9, b23=(2, 1))
    build_mul_mat(node)()
    fast = _result(node)
    monkeypatch.setattr(matmul, "get_matmul", lambda a, b: None)
    node.buffer.array[node.offset:node.offset + fast.nbytes] = 0
    build_mul_mat(node)()
    _close(_result(node), fast.astype(np.float64))


def test_types_without_fast_kernel_use_reference() -> None:
    rng = np.random.default_rng(12)
    node, rows, acts = mul_mat_node(rng, T.NVFP4, 128, M=8, N=2)
    build_mul_mat(node)()
    vals = dequantize(rows, T.NVFP4, 128).astype(np.float64)  # NVFP4 x Q8_0: exact products of both
    conv = dequantize(quantize(acts, T.Q8_0), T.Q8_0, 128).astype(np.float64)
    _close(_result(node), conv @ vals.transpose(0, 1, 3, 2))


def test_bad_operands_are_unsupported() -> None:
    rng = np.random.default_rng(13)
    node, _, _ = mul_mat_node(rng, T.Q4_0, 64, M=4, N=2)
    node.src[1].type = T.F16            # quantized weights take F32 activations only (as ggml)
    with pytest.raises(Unsupported):
        build_mul_mat(node)
    node, _, _ = mul_mat_node(rng, T.Q4_0, 64, M=4, N=2, b23=(3, 1))
    node.src[0].ne = (64, 4, 2, 1)      # 3 heads cannot share 2 matrices
    with pytest.raises(Unsupported):
        build_mul_mat(node)


def test_hadamard_hint_is_a_walsh_hadamard_transform() -> None:
    rng = np.random.default_rng(14)
    node, _, acts = mul_mat_node(rng, T.F32, 64, M=64, N=3)
    node.op_params = pack_params(0, 1)  # prec, hint = GGML_HINT_SRC0_IS_HADAMARD
    build_mul_mat(node)()
    h = np.array([[1.0]])
    while h.shape[0] < 64:
        h = np.block([[h, h], [h, -h]])
    np.testing.assert_allclose(_result(node)[0, 0], acts[0, 0] @ h.T / 8.0, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(fwht_ref(acts[0, 0]), _result(node)[0, 0])


# --- MUL_MAT_ID ------------------------------------------------------------------------------------------

def mul_mat_id_node(rng: np.random.Generator, atype: int, K: int, M: int, n_expert: int, n_used: int,
                    n_b: int, n_tok: int) -> tuple[Tensor, np.ndarray, np.ndarray, np.ndarray]:
    rows = random_rows(rng, atype, (n_expert, M), K)
    acts = rng.standard_normal((n_tok, n_b, K)).astype(np.float32)
    ids = np.array([rng.permutation(n_expert)[:n_used] for _ in range(n_tok)], np.int32)
    buf = new_buffer(rows.size + acts.nbytes + ids.nbytes + 4 * M * n_used * n_tok + 256)
    a = place(buf, 0, atype, (K, M, n_expert), rows, name="experts")
    b_off = (rows.size + 31) // 32 * 32
    b = place(buf, b_off, T.F32, (K, n_b, n_tok), acts, name="b")
    i_off = (b_off + acts.nbytes + 31) // 32 * 32
    i = place(buf, i_off, T.I32, (n_used, n_tok), ids, name="ids")
    dst = Tensor(T.F32, (M, n_used, n_tok), op=GGMLOp.MUL_MAT_ID, src=[a, b, i], buffer=buf,
                 offset=(i_off + ids.nbytes + 31) // 32 * 32, name="moe")
    return dst, rows, acts, ids


@pytest.mark.parametrize("atype", [T.Q4_0, T.Q5_1, T.Q8_0, T.MXFP4, T.Q4_K, T.Q6_K, T.IQ4_XS, T.F16],
                         ids=lambda t: T(t).name)
@pytest.mark.parametrize("n_b", [1, 3], ids=["broadcast", "per_slot"])
def test_mul_mat_id(atype: int, n_b: int) -> None:
    rng = np.random.default_rng(20 + int(atype))
    node, rows, acts, ids = mul_mat_id_node(rng, atype, _k_for(atype, 256), M=24, n_expert=6, n_used=3,
                                            n_b=n_b, n_tok=5)
    build_mul_mat_id(node)()
    ref = mul_mat_id_ref(rows, atype, acts, ids)
    _close(_result(node)[0], ref)
    # independent of the grouping: token 2, slot 1 is expert ids[2,1] times activation row (2, 1 % n_b)
    one = mul_mat_ref(rows[ids[2, 1]][None, None], atype, acts[2, 1 % n_b][None, None, None])[0, 0, 0]
    _close(_result(node)[0, 2, 1], one)


@pytest.mark.parametrize("fast", [True, False], ids=["numba", "reference"])
def test_mul_mat_id_rejects_out_of_range_ids(fast: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if not fast:
        monkeypatch.setattr(matmul, "get_matmul", lambda a, b: None)
    rng = np.random.default_rng(30)
    node, _, _, _ = mul_mat_id_node(rng, T.Q8_0, 64, M=8, n_expert=4, n_used=2, n_b=1, n_tok=3)
    run = build_mul_mat_id(node)
    run()
    ids_view = matmul.view(node.src[2])
    for bad in (4, -1, 1 << 30):
        ids_view[0, 0, 1, 0] = bad
        with pytest.raises(ComputeError, match="outside"):
            run()


@pytest.mark.parametrize("atype", [T.Q8_0, T.Q5_0, T.Q4_K], ids=lambda t: T(t).name)
def test_threads_split_work_exactly(atype: int) -> None:
    """Big enough to use the helper threads: the result equals the single-threaded one bit for bit."""
    from hybridllm.backends.cpu_kernels import get_num_threads, set_num_threads
    rng = np.random.default_rng(40)
    node, rows, acts = mul_mat_node(rng, atype, 512, M=1500, N=5)
    saved = get_num_threads()
    try:
        results = []
        for threads in (1, 3):
            set_num_threads(threads)
            build_mul_mat(node)()
            results.append(_result(node))
    finally:
        set_num_threads(saved)
    np.testing.assert_array_equal(results[0], results[1])
    _close(results[1], mul_mat_ref(rows, atype, acts))
