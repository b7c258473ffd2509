"""Elementwise ops against real ggml: binary broadcast and type mixes, unary ops (all 22), GLU (all 7)."""
from __future__ import annotations

import numpy as np
import pytest

from hybridllm.ggml.types import GGMLType as T
from hybridllm.ggml.types import GluOp, UnaryOp

F16_GRID = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)


@pytest.mark.parametrize("op", ["add", "sub", "mul", "div"])
@pytest.mark.parametrize("types", [(T.F32, T.F32), (T.F16, T.F32), (T.F16, T.F16), (T.BF16, T.BF16),
                                   (T.BF16, T.F32)])
def test_binary_broadcast(g, rng, op, types):
    ta, tb = types
    a = g.new(ta, (8, 6, 4, 2), rng.standard_normal(384))
    outs = []
    for bshape in [(8, 6, 4, 2), (8, 1, 1, 1), (4, 3, 2, 1), (1, 6, 1, 2), (2, 2, 4, 1), (1, 1, 1, 1)]:
        n = int(np.prod(bshape))
        b = g.new(tb, bshape, rng.uniform(0.5, 2.0, n) * rng.choice([-1, 1], n))
        outs.append(getattr(g, op)(a, b))
    res = g.run(*outs)
    res.assert_close(rtol=1e-6, atol=1e-7)


def test_binary_mixed_output_type(g, rng):
    """(F16, F32) -> F32 and (BF16, F32) -> F32: the result type comes from the destination of a cpy."""
    a16 = g.new(T.F16, (16, 3), rng.standard_normal(48))
    ab = g.new(T.BF16, (16, 3), rng.standard_normal(48))
    b = g.new(T.F32, (16, 1), rng.standard_normal(16))
    outs = [g.add(g.cast(a16, int(T.F32)), b), g.mul(ab, b), g.add(a16, b)]
    g.run(*outs).assert_close(rtol=1e-6, atol=1e-7)


def test_binary_noncontiguous_and_inplace(g, rng):
    x = g.new(T.F32, (8, 5, 3, 2), rng.standard_normal(240))
    xp = g.permute(x, 0, 2, 1, 3)                      # (8, 3, 5, 2), rows still dense
    y = g.new(T.F32, (8, 5, 3, 2), rng.standard_normal(240))
    yt = g.permute(y, 1, 0, 2, 3)                      # src1 fully strided: (5, 8, 3, 2)
    z = g.new(T.F32, (5, 8, 3, 2), rng.standard_normal(240))
    w = g.new(T.F32, (8, 5, 3, 2), rng.standard_normal(240))
    outs = [g.add(xp, g.new(T.F32, (8, 3, 1, 1), rng.standard_normal(24))),
            g.mul(z, yt), g.add_inplace(w, x), g.mul_inplace(g.view_2d(w, 8, 5, 64, 0), g.new(T.F32, (8, 1), rng.standard_normal(8)))]
    g.run(*outs).assert_close(rtol=1e-6, atol=1e-7)


def test_scale_clamp_math(g, rng):
    x = g.new(T.F32, (32, 7), rng.standard_normal(224) * 3)
    pos = g.new(T.F32, (32, 7), rng.uniform(0.01, 10, 224))
    outs = [g.scale(x, 0.125), g.scale_bias(x, -1.5, 0.25), g.clamp(x, -1.0, 0.5),
            g.sqr(x), g.sqrt(pos), g.log(pos), g.sin(x), g.cos(x), g.leaky_relu(x, 0.1, False),
            g.add1(x, g.new(T.F32, (1,), np.array([0.75])))]
    g.run(*outs).assert_close(rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("src_type", [T.F32, T.F16, T.BF16])
def test_unary_all_ops(g, src_type):
    """Every unary op on every F16 value (the GELU tables make this the interesting domain)."""
    x = g.new(src_type, (4096, 16), F16_GRID)
    outs = [g.unary(x, int(u)).set_name(u.name) for u in UnaryOp if u != UnaryOp.XIELU]
    outs.append(g.xielu(x, 0.8, 0.8, 0.5, -1e-6))
    # glibc's expf differs from the correctly rounded exp in the last bit for a few inputs
    g.run(*outs).assert_close(rtol=2e-7, atol=2e-7, ulp_outliers=4)


def test_unary_f16_to_f32_noncontiguous(g, rng):
    x = g.new(T.F32, (16, 6, 3), rng.standard_normal(288) * 4)
    xp = g.permute(x, 0, 2, 1, 3)
    outs = [g.gelu(xp), g.silu(xp), g.tanh(xp), g.gelu_quick(xp), g.exp(xp)]
    g.run(*outs).assert_close(rtol=2e-7, atol=2e-7)


@pytest.mark.parametrize("src_type", [T.F32, T.F16, T.BF16])
def test_glu_all_ops(g, rng, src_type):
    finite = F16_GRID[np.isfinite(F16_GRID)][::43][:997]
    gate = g.new(src_type, (256, 3, 2), np.concatenate([finite, [np.nan, np.inf, -np.inf], rng.standard_normal(536) * 6]))
    up = g.new(src_type, (256, 3, 2), rng.standard_normal(1536))
    both = g.new(src_type, (512, 3, 2), rng.standard_normal(3072) * 4)
    outs = []
    for op in GluOp:
        if op in (GluOp.SWIGLU_OAI, GluOp.SWIGLU_CLAMP) and src_type != T.F32:
            continue
        outs += [g.glu_split(gate, up, int(op)), g.glu(both, int(op), False), g.glu(both, int(op), True)]
    if src_type == T.F32:
        outs += [g.swiglu_oai(gate, up, 1.702, 7.0), g.swiglu_clamp(gate, up, 3.0)]
    g.run(*outs).assert_close(rtol=2e-7, atol=2e-7)


def test_geglu_f16_rounding_ties(g, rng):
    """F32 GEGLU looks its input up by F16 bits: exact ties between two F16 values must round to even."""
    h = np.arange(0, 0x4900, 7, dtype=np.uint16)                      # |x| < 10, including subnormals
    lo = h.view(np.float16).astype(np.float64)
    hi = (h + 1).view(np.float16).astype(np.float64)
    x = np.concatenate([(lo + hi) / 2, -(lo + hi) / 2, lo + (hi - lo) * 0.49, rng.uniform(-12, 12, 1000)])
    x = x[:len(x) // 64 * 64].astype(np.float32)
    gate = g.new(T.F32, (64, len(x) // 64), x)
    up = g.new(T.F32, (64, len(x) // 64), rng.standard_normal(len(x)))
    g.run(g.glu_split(gate, up, int(GluOp.GEGLU))).assert_close(rtol=0, atol=0)


def test_add_id(g, rng):
    a = g.new(T.F32, (16, 3, 5), rng.standard_normal(240))
    b = g.new(T.F32, (16, 8), rng.standard_normal(128))
    ids = g.new(T.I32, (3, 5), rng.integers(0, 8, 15))
    g.run(g.add_id(a, b, ids)).assert_close(rtol=0, atol=0)
