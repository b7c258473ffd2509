"""Elementwise, normalisation, softmax, rope and row ops of the GPU backend on random inputs, against the
numpy backend (the CPU reference) and, where short, an independent formula."""
from __future__ import annotations

import numpy as np
import pytest

from harness import assert_close, run_both
from hybridllm.ggml.tensor import pack_params
from hybridllm.ggml.types import GGMLOp, GGMLType, GluOp, RopeMode, UnaryOp

F32, F16 = GGMLType.F32, GGMLType.F16


def randn(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


@pytest.mark.parametrize("op", [GGMLOp.ADD, GGMLOp.SUB, GGMLOp.MUL, GGMLOp.DIV])
@pytest.mark.parametrize("bshape", [(40, 3, 2), (40, 1, 1), (1, 3, 1), (1, 1, 1)])
def test_binary_broadcast(gpu, op, bshape, rng):
    a = randn(rng, 2, 3, 40)
    b = randn(rng, *reversed(bshape)) + (3.0 if op == GGMLOp.DIV else 0.0)

    def build(g):
        ta = g.tensor(F32, (40, 3, 2), a)
        tb = g.tensor(F32, bshape, b)
        return [g.node(op, F32, (40, 3, 2), [ta, tb])]

    [(got, ref)] = run_both(gpu, build)
    assert_close(got, ref, rtol=1e-6, atol=1e-6, what=op.name)


def test_binary_mixed_types_and_strides(gpu, rng):
    """f16 src0 + f32 src1 -> f16, src0 a transposed view."""
    a = randn(rng, 24, 16).astype(np.float16)  # (ne1=24, ne0=16) storage, viewed transposed
    b = randn(rng, 1, 24)

    def build(g):
        base = g.tensor(F16, (16, 24), a)
        ta = g.view(base, (24, 16, 1, 1), (2 * 16, 2, 2 * 16 * 24, 2 * 16 * 24), op=GGMLOp.TRANSPOSE)
        tb = g.tensor(F32, (24, 1), b)
        return [g.node(GGMLOp.ADD, F16, (24, 16), [ta, tb])]

    [(got, ref)] = run_both(gpu, build)
    assert_close(got, ref, rtol=1e-3, atol=1e-3, what="f16 add")


UNARY = [UnaryOp.ABS, UnaryOp.SGN, UnaryOp.NEG, UnaryOp.STEP, UnaryOp.TANH, UnaryOp.ELU, UnaryOp.RELU,
         UnaryOp.SIGMOID, UnaryOp.GELU, UnaryOp.GELU_QUICK, UnaryOp.SILU, UnaryOp.HARDSWISH,
         UnaryOp.HARDSIGMOID, UnaryOp.EXP, UnaryOp.GELU_ERF, UnaryOp.FLOOR, UnaryOp.CEIL, UnaryOp.ROUND,
         UnaryOp.TRUNC, UnaryOp.SOFTPLUS]


F16_ROUNDED_UNARY = {UnaryOp.GELU, UnaryOp.GELU_QUICK}
F16_ROUNDED_GLU = {GluOp.GEGLU, GluOp.GEGLU_QUICK}  # separate sets: IntEnums compare by value


@pytest.mark.parametrize("uop", UNARY, ids=lambda u: u.name)
def test_unary(gpu, uop, rng):
    x = randn(rng, 5, 70, scale=3.0)
    x[0, :4] = [-12.0, 12.0, 0.0, 2.5]  # GELU's +-10 clamps, a tie for ROUND

    def build(g):
        t = g.tensor(F32, (70, 5), x)
        return [g.node(GGMLOp.UNARY, F32, (70, 5), [t], params=(int(uop),))]

    [(got, ref)] = run_both(gpu, build)
    # GELU/GELU_QUICK round through f16 like ggml's table; a 1-ulp libm difference on a device can move a
    # value across an f16 rounding boundary (1e-3 relative), so those get f16 tolerance.
    tol = 2e-3 if uop in F16_ROUNDED_UNARY else 2e-6
    assert_close(got, ref, rtol=tol, atol=tol, what=uop.name)


@pytest.mark.parametrize("op,params", [(GGMLOp.SCALE, (0.5, 0.25)), (GGMLOp.CLAMP, (-0.5, 0.75)),
                                       (GGMLOp.SQR, ()), (GGMLOp.SQRT, ()), (GGMLOp.LOG, ()),
                                       (GGMLOp.SIN, ()), (GGMLOp.COS, ())])
def test_scalar_ops(gpu, op, params, rng):
    x = np.abs(randn(rng, 3, 50)) + 0.1

    def build(g):
        t = g.tensor(F32, (50, 3), x)
        return [g.node(op, F32, (50, 3), [t], params=params)]

    [(got, ref)] = run_both(gpu, build)
    assert_close(got, ref, rtol=2e-6, atol=2e-6, what=op.name)


@pytest.mark.parametrize("gop", [GluOp.SWIGLU, GluOp.GEGLU, GluOp.REGLU, GluOp.GEGLU_ERF, GluOp.GEGLU_QUICK,
                                 GluOp.SWIGLU_OAI], ids=lambda g: g.name)
@pytest.mark.parametrize("form", ["split", "fused", "swapped"])
def test_glu(gpu, gop, form, rng):
    n, rows = 48, 3
    a, b = randn(rng, rows, n, scale=2.0), randn(rng, rows, n)
    params = (int(gop), int(form == "swapped"), 1.702, 7.0)

    def build(g):
        if form == "split":
            ta, tb = g.tensor(F32, (n, rows), a), g.tensor(F32, (n, rows), b)
            return [g.node(GGMLOp.GLU, F32, (n, rows), [ta, tb], params=params)]
        t = g.tensor(F32, (2 * n, rows), np.concatenate([a, b], axis=1))
        return [g.node(GGMLOp.GLU, F32, (n, rows), [t], params=params)]

    [(got, ref)] = run_both(gpu, build)
    tol = 4e-3 if gop in F16_ROUNDED_GLU else 2e-6
    assert_close(got, ref, rtol=tol, atol=tol, what=f"{gop.name} {form}")


@pytest.mark.parametrize("op", [GGMLOp.RMS_NORM, GGMLOp.NORM, GGMLOp.L2_NORM])
@pytest.mark.parametrize("n", [300, 8448], ids=["registers", "long-rows"])  # rows kept in registers or re-read
def test_norms(gpu, op, n, rng):
    x = randn(rng, 2, 3 if n < 1000 else 1, n) + 0.5
    shape = (n, x.shape[1], 2)

    def build(g):
        t = g.tensor(F32, shape, x)
        return [g.node(op, F32, shape, [t], params=(1e-5,))]

    [(got, ref)] = run_both(gpu, build)
    assert_close(got, ref, rtol=1e-5, atol=1e-6, what=op.name)
    if op == GGMLOp.RMS_NORM:
        x64 = x.astype(np.float64)
        exact = x64 / np.sqrt((x64 ** 2).mean(-1, keepdims=True) + 1e-5)
        assert_close(got[0], exact, rtol=1e-5, atol=1e-6, what="rms_norm exact")


@pytest.mark.parametrize("fused", [True, False])
def test_rms_norm_mul(gpu, fused, rng):
    """RMS_NORM -> MUL(weight) is fused into one launch unless the norm output has another reader."""
    x, w = randn(rng, 4, 96), randn(rng, 96)

    def build(g):
        t = g.tensor(F32, (96, 4), x)
        wt = g.tensor(F32, (96,), w)
        n = g.node(GGMLOp.RMS_NORM, F32, (96, 4), [t], params=(1e-6,))
        m = g.node(GGMLOp.MUL, F32, (96, 4), [n, wt])
        outs = [m]
        if not fused:
            outs.append(g.node(GGMLOp.SCALE, F32, (96, 4), [n], params=(2.0, 0.0)))
        return outs

    res = run_both(gpu, build)
    for got, ref in res:
        assert_close(got, ref, rtol=1e-5, atol=1e-6, what="rms_norm*w")
    from harness import Graph

    g = Graph(gpu)
    build(g)
    assert len(gpu.prepare(g.nodes).launches) == (1 if fused else 3)


@pytest.mark.parametrize("mask", [None, F16, F32])
@pytest.mark.parametrize("max_bias,sinks", [(0.0, False), (8.0, False), (0.0, True)])
def test_soft_max(gpu, mask, max_bias, sinks, rng):
    n_kv, rows, heads = 77, 5, 4
    x = randn(rng, heads, rows, n_kv, scale=3.0)
    m = randn(rng, 8, n_kv)  # mask rows >= x rows; broadcast over heads
    m[:, 60:] = -np.inf
    s = randn(rng, heads)

    def build(g):
        tx = g.tensor(F32, (n_kv, rows, heads), x)
        tm = g.tensor(mask, (n_kv, 8), m.astype(np.float16 if mask == F16 else np.float32)) if mask else None
        ts = g.tensor(F32, (heads,), s) if sinks else None
        return [g.node(GGMLOp.SOFT_MAX, F32, (n_kv, rows, heads), [tx, tm, ts], params=(0.7, max_bias))]

    [(got, ref)] = run_both(gpu, build)
    assert_close(got, ref, rtol=1e-5, atol=1e-6, what="soft_max")


def _rope_params(n_dims, mode, n_ctx_orig=4096, base=10000.0, scale=1.0, ext=0.0, attn=1.0,
                 sections=(0, 0, 0, 0), n_offs=0):
    return pack_params(0, n_dims, mode, 0, n_ctx_orig, base, scale, ext, attn, 32.0, 1.0, *sections, n_offs)


ROPE_CASES = {
    "normal": dict(mode=RopeMode.NORMAL, n_dims=32),
    "neox": dict(mode=RopeMode.NEOX, n_dims=32),
    "neox-partial": dict(mode=RopeMode.NEOX, n_dims=16, n_offs=8),
    "normal-yarn": dict(mode=RopeMode.NORMAL, n_dims=32, scale=0.25, ext=1.0, n_ctx_orig=2048),
    "neox-ff": dict(mode=RopeMode.NEOX, n_dims=32, ff=True),
    "mrope": dict(mode=RopeMode.MROPE, n_dims=32, sections=(4, 6, 6, 0)),
    "imrope": dict(mode=RopeMode.IMROPE, n_dims=32, sections=(6, 5, 5, 0)),
    "vision": dict(mode=RopeMode.VISION, n_dims=16, sections=(4, 4, 0, 0)),
}


@pytest.mark.parametrize("case", list(ROPE_CASES))
@pytest.mark.parametrize("dtype", [F32, F16])
def test_rope(gpu, case, dtype, rng):
    c = dict(ROPE_CASES[case])
    ff, mode, n_dims = c.pop("ff", False), c.pop("mode"), c.pop("n_dims")
    head, heads, tokens = 32, 3, 5
    x = randn(rng, tokens, heads, head).astype(np.float16 if dtype == F16 else np.float32)
    npos = 4 * tokens if mode & RopeMode.MROPE else tokens
    pos = rng.integers(0, 40000, npos).astype(np.int32)
    freq = (rng.random(head // 2) + 0.5).astype(np.float32)

    def build(g):
        tx = g.tensor(dtype, (head, heads, tokens), x)
        tp = g.tensor(GGMLType.I32, (npos,), pos)
        tf = g.tensor(F32, (head // 2,), freq) if ff else None
        return [g.node(GGMLOp.ROPE, dtype, (head, heads, tokens), [tx, tp, tf],
                       params=_rope_params(n_dims, int(mode), **c))]

    [(got, ref)] = run_both(gpu, build)
    tol = 2e-3 if dtype == F16 else 2e-4  # cos/sin of angles up to 4e4 rad: libm vs device ulps
    assert_close(got, ref, rtol=tol, atol=tol, what=f"rope {case}")


@pytest.mark.parametrize("ttype", [F32, F16, GGMLType.BF16, GGMLType.Q8_0, GGMLType.Q4_K, GGMLType.Q6_K,
                                   GGMLType.Q5_0, GGMLType.IQ4_NL])
def test_get_rows(gpu, ttype, rng):
    from test_matmul import weights

    ne00, nr = 256, 11
    raw, wf = weights(ttype, nr * 2, ne00, rng)
    idx = rng.integers(0, nr, (2, 6)).astype(np.int32)

    def build(g):
        t = g.tensor(ttype, (ne00, nr, 2), raw)
        i = g.tensor(GGMLType.I32, (6, 2), idx)
        return [g.node(GGMLOp.GET_ROWS, F32, (ne00, 6, 2), [t, i])]

    [(got, ref)] = run_both(gpu, build)
    exact = np.stack([wf.reshape(2, nr, ne00)[j][idx[j]] for j in range(2)])[None]
    assert_close(got, exact, rtol=1e-6, atol=1e-7, what="get_rows vs gguf dequant")
    assert_close(got, ref, rtol=1e-6, atol=1e-7, what="get_rows vs numpy backend")


def test_get_rows_i32(gpu, rng):
    table = rng.integers(-1000, 1000, (7, 5)).astype(np.int32)
    idx = np.array([6, 0, 3, 3], dtype=np.int32)

    def build(g):
        t = g.tensor(GGMLType.I32, (5, 7), table)
        i = g.tensor(GGMLType.I32, (4,), idx)
        return [g.node(GGMLOp.GET_ROWS, GGMLType.I32, (5, 4), [t, i])]

    [(got, ref)] = run_both(gpu, build)
    np.testing.assert_array_equal(got[0, 0], table[idx])
    np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("itype", [GGMLType.I64, GGMLType.I32])
@pytest.mark.parametrize("dst_type", [F16, F32, GGMLType.BF16])
def test_set_rows(gpu, itype, dst_type, rng):
    """KV-cache store: rows of src0 land in the rows of the cache named by the indices; others keep."""
    ne0, n_rows, n_new, heads = 16, 10, 3, 2
    cache = randn(rng, heads, n_rows, ne0)
    cache_raw = cache.astype(np.float16) if dst_type == F16 else cache
    if dst_type == GGMLType.BF16:
        cache_raw = (cache.view(np.uint32) >> 16).astype(np.uint16)
    new = randn(rng, heads, n_new, ne0)
    idx = np.array([7, 2, 9], dtype=np.int64 if itype == GGMLType.I64 else np.int32)

    def build(g):
        c = g.tensor(dst_type, (ne0, n_rows, heads), cache_raw)
        s = g.tensor(F32, (ne0, n_new, heads), new)
        i = g.tensor(itype, (n_new,), idx)
        return [g.node(GGMLOp.SET_ROWS, dst_type, (ne0, n_rows, heads), [s, i, c], into=c)]

    [(got, ref)] = run_both(gpu, build)
    np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("src_type,dst_type", [(F32, F16), (F16, F32), (F32, F32), (F32, GGMLType.BF16),
                                                (F32, GGMLType.I32), (F16, F16)])
def test_cpy_permuted(gpu, src_type, dst_type, rng):
    """CPY of a permuted view into a contiguous tensor of another shape (logical element order)."""
    x = randn(rng, 4, 3, 10, scale=50.0).astype(np.float16 if src_type == F16 else np.float32)
    es = 2 if src_type == F16 else 4

    def build(g):
        base = g.tensor(src_type, (10, 3, 4), x)
        perm = g.view(base, (10, 4, 3, 1), (es, es * 30, es * 10, es * 120), op=GGMLOp.PERMUTE)
        dst = g.tensor(dst_type, (40, 3))
        return [g.node(GGMLOp.CPY, dst_type, (40, 3), [perm, dst], into=dst)]

    [(got, ref)] = run_both(gpu, build)
    np.testing.assert_array_equal(got, ref)


def test_cont_and_dup(gpu, rng):
    x = randn(rng, 5, 6, 7)

    def build(g):
        base = g.tensor(F32, (7, 6, 5), x)
        t = g.view(base, (6, 7, 5, 1), (28, 4, 168, 840), op=GGMLOp.TRANSPOSE)
        c = g.node(GGMLOp.CONT, F32, (6, 7, 5), [t])
        d = g.node(GGMLOp.DUP, F32, (7, 6, 5), [base])
        return [c, d]

    (c_got, c_ref), (d_got, d_ref) = run_both(gpu, build)
    np.testing.assert_array_equal(c_got, c_ref)
    np.testing.assert_array_equal(c_got[0], np.swapaxes(x, 1, 2))
    np.testing.assert_array_equal(d_got, d_ref)
