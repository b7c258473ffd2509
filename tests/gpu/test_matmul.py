"""MUL_MAT / MUL_MAT_ID on the GPU backend against exact float64 math on the dequantized weights
(gguf.quants, independent of our code) and against the numpy backend (which, like ggml's CPU, rounds
activations to Q8 first, hence the looser tolerance there).

Decode-sized products (<= 8 columns) of the integer-path weight types run on int8 activations
(kernels/q8.cuh: scale max|x|/127 per 32 values, round half away from zero); their exact reference uses
activations rounded the same way (`q8_round`, written here from that rule), so the comparison stays tight.
Larger products on tensor cores (kernels/mma.cu) multiply f16 roundings of both operands, and so does their
exact reference."""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from harness import assert_close, run_both
from hybridllm.ggml.types import GGMLOp, GGMLType, TRAITS
from hybridllm.quants.blocks import random_blocks

WEIGHT_TYPES = [GGMLType.F32, GGMLType.F16, GGMLType.BF16, GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0,
                GGMLType.Q5_1, GGMLType.Q8_0, GGMLType.IQ4_NL, GGMLType.MXFP4, GGMLType.Q2_K, GGMLType.Q3_K,
                GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K, GGMLType.IQ4_XS]


def weights(qtype: int, rows: int, k: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(raw bytes [rows, row_bytes], float64 values [rows, k]) with an independent decoder."""
    if qtype == GGMLType.F32:
        w = (rng.standard_normal((rows, k)) * 0.05).astype(np.float32)
        return w.view(np.uint8), w.astype(np.float64)
    if qtype == GGMLType.F16:
        w = (rng.standard_normal((rows, k)) * 0.05).astype(np.float16)
        return w.view(np.uint8), w.astype(np.float64)
    if qtype == GGMLType.BF16:
        bits = ((rng.standard_normal((rows, k)).astype(np.float32) * 0.05).view(np.uint32) >> 16).astype(np.uint16)
        return bits.view(np.uint8), (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    raw = random_blocks(qtype, rows, k, rng, scale=0.05)
    ref = gguf_dequantize(raw, GGMLQuantizationType(int(qtype)))
    return raw, ref.astype(np.float64).reshape(rows, k)


Q8_PATH = {GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1, GGMLType.Q8_0, GGMLType.Q4_K,
           GGMLType.Q5_K, GGMLType.Q6_K}


def q8_round(x: np.ndarray) -> np.ndarray:
    """x (..., K) float32 -> float64 values as the int8 kernels see them: per 32 values d = max|x| / 127
    (f32), q = round(x / d) half away from zero (the f32 quotient), value = q * d."""
    xb = np.asarray(x, np.float32).reshape(-1, 32)
    amax = np.abs(xb).max(axis=1, keepdims=True)
    d = amax / np.float32(127)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = (xb / d).astype(np.float64)
    q = np.where(amax == 0, 0.0, np.trunc(r + np.copysign(0.5, r)))
    return (q * d.astype(np.float64)).reshape(np.shape(x))


def tensor_cores(gpu) -> bool:
    """Whether products of > 8 columns run on tensor-core tiles (kernels/mma.cu): f16 operands."""
    return gpu.rt.warp == 32 and not getattr(gpu.rt, "is_hip", False)


def operands(gpu, qtype: int, w: np.ndarray, x: np.ndarray, n_cols: int,
             expert_ids: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(weights, activations) as the kernels multiply them, in float64: int8 activations for decode-sized
    products of the integer types, f16 weights and activations on tensor cores, else exact. MUL_MAT_ID
    (expert_ids) without tensor cores keeps the per-pair int8 products at any size."""
    if n_cols <= 8 or (expert_ids and not tensor_cores(gpu)):
        return w, q8_round(x) if qtype in Q8_PATH else x.astype(np.float64)
    if tensor_cores(gpu):
        return w.astype(np.float16).astype(np.float64), x.astype(np.float16).astype(np.float64)
    return w, x.astype(np.float64)


def mul_mat_case(gpu, qtype: int, K: int, M: int, N: int, batch: tuple[int, int], rng) -> None:
    a2, b2 = batch
    raw, wf = weights(qtype, M * a2, K, rng)
    x = rng.standard_normal((b2, N, K)).astype(np.float32)

    def build(g):
        a = g.tensor(qtype, (K, M, a2), raw, name="w")
        b = g.tensor(GGMLType.F32, (K, N, b2), x, name="x")
        return [g.node(GGMLOp.MUL_MAT, GGMLType.F32, (M, N, b2), [a, b], name="y")]

    [(got, ref)] = run_both(gpu, build)
    wa, xa = operands(gpu, qtype, wf, x, N)
    w3 = wa.reshape(a2, M, K)
    exact = np.stack([xa[i] @ w3[i // (b2 // a2)].T for i in range(b2)])[None]
    scale = np.abs(exact).max()
    assert_close(got, exact, rtol=1e-4, atol=1e-5 * scale, what=f"{TRAITS[qtype].name} vs exact")
    assert_close(got, ref, rtol=3e-2, atol=3e-2 * scale, what=f"{TRAITS[qtype].name} vs numpy backend")


@pytest.mark.parametrize("qtype", WEIGHT_TYPES, ids=lambda t: TRAITS[t].name)
def test_mul_mat_vec(gpu, qtype, rng):
    mul_mat_case(gpu, qtype, K=512, M=37, N=1, batch=(1, 2), rng=rng)


@pytest.mark.parametrize("qtype", [GGMLType.F32, GGMLType.F16, GGMLType.Q8_0, GGMLType.Q4_K, GGMLType.Q5_K,
                                   GGMLType.Q6_K], ids=lambda t: TRAITS[t].name)
@pytest.mark.parametrize("N", [5, 70])
def test_mul_mat_batched(gpu, qtype, N, rng):
    K = 100 if TRAITS[qtype].blck_size == 1 else 256  # plain types: a K that ends mid-group and mid-tile
    mul_mat_case(gpu, qtype, K=K, M=67, N=N, batch=(2, 4), rng=rng)


@pytest.mark.parametrize("qtype,shared_input,n_tok", [
    (q, s, 3) for q in (GGMLType.F32, GGMLType.Q4_0, GGMLType.Q4_K) for s in (True, False)] + [
    (GGMLType.Q4_K, True, 20), (GGMLType.F32, False, 20)], ids=lambda v: str(getattr(v, "name", v)))
def test_mul_mat_id(gpu, qtype, shared_input, n_tok, rng):
    """Decode batches: q8 matvecs per (slot, token); more tokens: per-expert tensor-core tiles over routed
    pairs (one expert gets none: ids use 4 of 5 experts)."""
    K, M, n_expert, n_used = 256, 21 if n_tok < 8 else 140, 5, 2
    raw, wf = weights(qtype, M * n_expert, K, rng)
    ne11 = 1 if shared_input else n_used
    x = rng.standard_normal((n_tok, ne11, K)).astype(np.float32)
    ids = np.stack([rng.permutation(n_expert - 1)[:n_used] for _ in range(n_tok)]).astype(np.int32)

    def build(g):
        a = g.tensor(qtype, (K, M, n_expert), raw)
        b = g.tensor(GGMLType.F32, (K, ne11, n_tok), x)
        i = g.tensor(GGMLType.I32, (n_used, n_tok), ids)
        return [g.node(GGMLOp.MUL_MAT_ID, GGMLType.F32, (M, n_used, n_tok), [a, b, i])]

    [(got, ref)] = run_both(gpu, build)
    wa, xa = operands(gpu, qtype, wf, x, n_tok, expert_ids=True)
    w3 = wa.reshape(n_expert, M, K)
    exact = np.zeros((1, n_tok, n_used, M))
    for t in range(n_tok):
        for e in range(n_used):
            exact[0, t, e] = w3[ids[t, e]] @ xa[t, e % ne11]
    scale = np.abs(exact).max()
    assert_close(got, exact, rtol=1e-4, atol=1e-5 * scale, what="mul_mat_id vs exact")
    assert_close(got, ref, rtol=3e-2, atol=3e-2 * scale, what="mul_mat_id vs numpy backend")


@pytest.mark.parametrize("qtype", [GGMLType.Q6_K, GGMLType.Q4_0, GGMLType.Q5_0, GGMLType.Q8_0],
                         ids=lambda t: TRAITS[t].name)
def test_mul_mat_vec_rows_2_aligned(gpu, qtype, rng):
    """K = 768: Q6_K rows of 630 bytes, so every other row (and super-block) starts 2 bytes past a word."""
    mul_mat_case(gpu, qtype, K=768, M=9, N=1, batch=(1, 1), rng=rng)


@pytest.mark.parametrize("qtype", [GGMLType.Q4_K, GGMLType.F16], ids=lambda t: TRAITS[t].name)
def test_mul_mat_wide_tiles(gpu, qtype, rng, monkeypatch):
    """The 128-column tensor-core tile (chosen for large grids; forced here), partial in M and N."""
    import hybridllm.backends.cupy_ops.matmul as mm

    monkeypatch.setattr(mm, "MMA_SMALL_GRID", 0)
    mul_mat_case(gpu, qtype, K=256, M=140, N=130, batch=(1, 1), rng=rng)


def test_mul_mat_shared_input_prefill(gpu, rng):
    """Three prefill matmuls of one weight type reading one src1 (Q/K/V) run as one tensor-core launch
    (where there are tensor cores), each result exact up to the f16 operands."""
    from harness import Graph

    K, N, Ms = 256, 20, (140, 40, 24)
    raws = [weights(GGMLType.Q4_K, M, K, rng) for M in Ms]
    x = rng.standard_normal((N, K)).astype(np.float32)

    def build(g):
        b = g.tensor(GGMLType.F32, (K, N), x)
        return [g.node(GGMLOp.MUL_MAT, GGMLType.F32, (M, N), [g.tensor(GGMLType.Q4_K, (K, M), raw), b])
                for M, (raw, _) in zip(Ms, raws)]

    res = run_both(gpu, build)
    for M, (raw, wf), (got, ref) in zip(Ms, raws, res):
        wa, xa = operands(gpu, GGMLType.Q4_K, wf, x, N)
        exact = (xa @ wa.T)[None, None]
        assert_close(got, exact, rtol=1e-4, atol=1e-5 * np.abs(exact).max(), what=f"M={M} vs exact")
    g = Graph(gpu)
    build(g)
    assert len(gpu.prepare(g.nodes).launches) == (2 if tensor_cores(gpu) else 3)  # f16 copy of src1 + one launch


@pytest.mark.parametrize("qtype", [GGMLType.Q6_K, GGMLType.Q8_0, GGMLType.Q4_0], ids=lambda t: TRAITS[t].name)
def test_mul_mat_prefill_rows_2_aligned(gpu, qtype, rng):
    """Prefill tiles on K = 768: Q6_K super-blocks and Q8_0 blocks that start 2 bytes past a word."""
    mul_mat_case(gpu, qtype, K=768, M=9, N=12, batch=(1, 1), rng=rng)
