"""MUL_MAT / MUL_MAT_ID against real ggml: the peer's libggml-cpu computes the same graph (its AVX2 vec_dot,
llamafile sgemm and tiled K-quant paths). Our numba path must give the same bits (a 1-ulp difference here
grows into ~1e-2 logit differences after the next activation quantization); the float64 numpy reference
must agree to float32 rounding. A float product without ggml's activation quantization must not."""
from __future__ import annotations

import ctypes

import numpy as np
import pytest
from matmul_blocks import ALL_TYPES, FLOAT_TYPES, random_rows

from hybridllm.backends.numpy_ops.matmul import mul_mat_id_ref, mul_mat_ref
from hybridllm.ggml.types import GGMLType as T
from hybridllm.quants import dequantize
from hybridllm.testing.ggml_ref import GT, GGMLGraph

TOL = 1e-6  # relative to the largest output; float32 summation order differs, integer sums do not


def _ggml_op(g: GGMLGraph, name: str, *srcs: GT) -> GT:
    fn = getattr(g.base_lib, "ggml_" + name)
    fn.argtypes = [ctypes.c_void_p] * (len(srcs) + 1)
    fn.restype = ctypes.c_void_p
    return GT(fn(g.ctx, *(s.ptr for s in srcs)), g)


def _weights(g: GGMLGraph, atype: int, rows: np.ndarray, K: int) -> GT:
    """A weight tensor (K, M, ...) holding exactly `rows` (uint8 (..., M, row_bytes)) as raw blocks."""
    a = g.new(atype, (K, *rows.shape[:-1][::-1]))
    g.mem[a.offset:a.offset + rows.size] = rows.reshape(-1)
    return a


def _err(x: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(x - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("atype", ALL_TYPES, ids=lambda t: T(t).name)
def test_mul_mat_matches_ggml(atype: int) -> None:
    rng = np.random.default_rng(100 + int(atype))
    K, M = (512 + (13 if atype in FLOAT_TYPES else 0)), 48
    for N in (1, 3, 16):   # vec_dot, llamafile sgemm (N >= 2), tiled K-quants (N >= 8)
        with GGMLGraph(16 << 20) as g:
            rows = random_rows(rng, atype, (M,), K)
            acts = rng.standard_normal((N, K)).astype(np.float32)
            out = _ggml_op(g, "mul_mat", _weights(g, atype, rows, K), g.new(T.F32, (K, N), acts))
            res = g.run(out)
            ggml = res.ref(out)[0, 0]
            ref = mul_mat_ref(rows[None, None], atype, acts[None, None])[0, 0]
            np.testing.assert_array_equal(res.ours(out)[0, 0], ggml, err_msg=f"numba path, N={N}")
            assert _err(ref, ggml) < TOL, f"numpy reference, N={N}"
            if atype not in (T.F32, T.F16, T.BF16):  # the test can tell ggml's numerics from plain floats
                naive = acts.astype(np.float64) @ dequantize(rows, atype, K).astype(np.float64).T
                assert _err(naive, ggml) > 20 * TOL


@pytest.mark.parametrize("atype", [T.Q8_0, T.IQ4_NL, T.Q4_K, T.F16, T.F32], ids=lambda t: T(t).name)
def test_gqa_broadcast_and_permuted_activations_match_ggml(atype: int) -> None:
    rng = np.random.default_rng(200 + int(atype))
    K, M, N = 256, 20, 5
    with GGMLGraph(16 << 20) as g:
        rows = random_rows(rng, atype, (1, 2, M), K)           # 2 kv heads
        acts = rng.standard_normal((1, N, 4, K)).astype(np.float32)
        b = g.new(T.F32, (K, 4, N), acts)                       # (K, heads, tokens) in memory
        bp = g.permute(b, 0, 2, 1, 3)                           # -> (K, tokens, heads): not contiguous
        out = _ggml_op(g, "mul_mat", _weights(g, atype, rows, K), bp)
        res = g.run(out)
        ggml = res.ref(out)
        ref = mul_mat_ref(rows, atype, acts.transpose(0, 2, 1, 3))
        np.testing.assert_array_equal(res.ours(out), ggml)
        assert _err(ref, ggml) < TOL


@pytest.mark.parametrize("atype", [T.Q4_0, T.Q8_0, T.MXFP4, T.IQ4_NL, T.Q4_K, T.Q5_K, T.Q6_K, T.F32, T.F16],
                         ids=lambda t: T(t).name)
@pytest.mark.parametrize("n_b", [1, 2], ids=["broadcast", "per_slot"])
def test_mul_mat_id_matches_ggml(atype: int, n_b: int) -> None:
    rng = np.random.default_rng(300 + int(atype))
    K, M, n_expert, n_used, n_tok = 256, 16, 5, 2, 9   # 9 tokens: some experts get >= 8 rows (tiled)
    with GGMLGraph(16 << 20) as g:
        rows = random_rows(rng, atype, (n_expert, M), K)
        acts = rng.standard_normal((n_tok, n_b, K)).astype(np.float32)
        ids = np.array([rng.permutation(n_expert)[:n_used] for _ in range(n_tok)], np.int32)
        ids[:, 0] = 1                                            # expert 1 sees every token
        out = _ggml_op(g, "mul_mat_id", _weights(g, atype, rows, K), g.new(T.F32, (K, n_b, n_tok), acts),
                       g.new(T.I32, (n_used, n_tok), ids))
        res = g.run(out)
        ggml = res.ref(out)[0]
        np.testing.assert_array_equal(res.ours(out)[0], ggml)
        assert _err(mul_mat_id_ref(rows, atype, acts, ids), ggml) < TOL


@pytest.mark.parametrize("atype", FLOAT_TYPES, ids=lambda t: T(t).name)
def test_float_paths_match_ggml_bits(atype: int) -> None:
    """llamafile's sgemm needs M % 4 == 0 (else ggml's vec_dot: 4 accumulators, 32-element steps, scalar
    leftovers that GCC splits into runs of 8, 4 and FMAs); K not a multiple of 8 or 32 exercises both."""
    rng = np.random.default_rng(400 + int(atype))
    for K, M, N in ((43, 45, 3), (47, 44, 3), (45, 12, 1), (37, 6, 2)):
        with GGMLGraph(4 << 20) as g:
            rows = random_rows(rng, atype, (M,), K)
            acts = rng.standard_normal((N, K)).astype(np.float32)
            out = _ggml_op(g, "mul_mat", _weights(g, atype, rows, K), g.new(T.F32, (K, N), acts))
            res = g.run(out)
            np.testing.assert_array_equal(res.ours(out), res.ref(out), err_msg=f"K={K} M={M} N={N}")
