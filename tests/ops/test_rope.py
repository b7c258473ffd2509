"""ROPE against real ggml: all modes, partial rotation, frequency factors, YaRN, F16, strided views."""
from __future__ import annotations

import numpy as np
import pytest

from hybridllm.ggml.types import GGMLType as T
from hybridllm.ggml.types import RopeMode


def _x(g, rng, typ, ne):
    return g.new(typ, ne, rng.standard_normal(int(np.prod(ne))))


@pytest.mark.parametrize("typ", [T.F32, T.F16])
@pytest.mark.parametrize("mode", [RopeMode.NORMAL, RopeMode.NEOX])
def test_rope_basic(g, rng, typ, mode):
    n_tok = 7
    pos = g.new(T.I32, (n_tok,), rng.integers(0, 5000, n_tok))
    outs = []
    for hd, n_dims in [(64, 64), (64, 32), (128, 128)]:
        x = _x(g, rng, typ, (hd, 4, n_tok))
        outs.append(g.rope_ext(x, pos, None, n_dims, int(mode), 4096, 10000.0, 1.0, 0.0, 1.0, 32.0, 1.0))
    x = _x(g, rng, typ, (64, 3, n_tok, 2))                 # a batch dim shares the positions
    outs.append(g.rope_ext(x, pos, None, 64, int(mode), 4096, 1e6, 0.25, 0.0, 1.0, 32.0, 1.0))
    g.run(*outs).assert_close(rtol=1e-6, atol=2e-6)


@pytest.mark.parametrize("mode", [RopeMode.NORMAL, RopeMode.NEOX])
def test_rope_yarn_freq_factors_offset(g, rng, mode):
    n_tok = 5
    pos = g.new(T.I32, (n_tok,), rng.integers(0, 30000, n_tok))
    ff = g.new(T.F32, (32,), rng.uniform(1.0, 8.0, 32))
    x = _x(g, rng, T.F32, (80, 4, n_tok))
    outs = [g.rope_ext(x, pos, ff, 64, int(mode), 8192, 500000.0, 0.125, 1.0, 1.0, 32.0, 1.0),
            g.rope_ext(x, pos, None, 64, int(mode), 4096, 10000.0, 0.25, 0.5, 0.9, 16.0, 2.0)]
    shifted = g.rope_ext(x, pos, None, 48, int(mode), 4096, 10000.0, 1.0, 0.0, 1.0, 32.0, 1.0)
    g.rope_set_offset(shifted, 16)                          # rotate dims 16..64 only
    outs.append(shifted)
    g.run(*outs).assert_close(rtol=1e-6, atol=2e-6)


def test_rope_strided_input_and_inplace(g, rng):
    n_tok = 6
    pos = g.new(T.I32, (n_tok,), rng.integers(0, 100, n_tok))
    qkv = _x(g, rng, T.F32, (3 * 4 * 32, n_tok))           # fused QKV projection; Q is a view
    q = g.view_3d(qkv, 32, 4, n_tok, 32 * 4, 3 * 4 * 32 * 4, 0)
    outs = [g.rope_ext(q, pos, None, 32, int(RopeMode.NEOX), 4096, 10000.0, 1.0, 0.0, 1.0, 32.0, 1.0),
            g.rope_ext_inplace(_x(g, rng, T.F32, (32, 2, n_tok)), pos, None, 32, 0, 4096, 10000.0, 1.0, 0.0,
                               1.0, 32.0, 1.0)]
    g.run(*outs).assert_close(rtol=1e-6, atol=2e-6)


@pytest.mark.parametrize("mode,sections", [(RopeMode.MROPE, (16, 24, 24, 0)), (RopeMode.IMROPE, (24, 20, 20, 0)),
                                           (RopeMode.MROPE, (8, 8, 8, 8)), (RopeMode.VISION, (16, 16, 16, 16))])
def test_rope_multi(g, rng, mode, sections):
    n_tok, hd = 5, 128
    n_dims = hd // 2 if mode == RopeMode.VISION else hd
    pos = g.new(T.I32, (4 * n_tok,), rng.integers(0, 64, 4 * n_tok))
    x = _x(g, rng, T.F32, (hd, 3, n_tok))
    outs = [g.rope_multi(x, pos, None, n_dims, sections, int(mode), 32768, 10000.0, 1.0, 0.0, 1.0, 32.0, 1.0),
            g.rope_multi(g.cast(x, int(T.F16)), pos, None, n_dims, sections, int(mode), 32768, 5e6, 1.0, 0.0,
                         1.0, 32.0, 1.0)]
    g.run(*outs).assert_close(rtol=1e-6, atol=2e-6)
