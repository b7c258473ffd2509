"""Reductions, sorting, layout/generator ops and vision-tower ops against real ggml."""
from __future__ import annotations

import numpy as np
import pytest

from hybridllm.ggml.types import GGMLType as T


def test_sums(g, rng):
    x = g.new(T.F32, (33, 5, 3, 2), rng.standard_normal(990) * 10)
    xp = g.permute(x, 0, 2, 1, 3)
    outs = [g.sum(x), g.sum_rows(x), g.mean(x), g.sum_rows(xp), g.cumsum(x), g.sum(xp)]
    outs.append(g.sum(g.new(T.F16, (40, 3), rng.standard_normal(120))))
    g.run(*outs).assert_close(rtol=1e-6, atol=1e-6)


def test_argmax_argsort_top_k(g, rng):
    x = g.new(T.F32, (50, 7), rng.standard_normal(350))
    ties = g.new(T.F32, (10, 3), np.repeat([1.0, 3.0, 2.0], 10) * np.tile([1, 1, 0, 1, 1, 0, 1, 1, 1, 0], 3))
    x4 = g.new(T.F32, (16, 3, 2, 2), rng.standard_normal(192))
    outs = [g.argmax(x), g.argmax(ties), g.argsort(x, 0), g.argsort(x, 1), g.argsort(x4, 1)]
    res = g.run(*outs)
    res.assert_close(rtol=0, atol=0)
    tk = g.top_k(x, 5)
    res = g.run(tk)
    # the order of top-k indices is unspecified (ggml swaps the first two): compare as sets
    assert np.array_equal(np.sort(res.ours(tk), axis=-1), np.sort(res.ref(tk), axis=-1))
    vals = res.ref(x)[0, 0]
    assert np.all(np.diff(np.take_along_axis(vals, res.ours(tk)[0, 0], axis=-1), axis=-1) <= 0)


@pytest.mark.parametrize("typ", [T.F32, T.F16, T.I32])
def test_repeat_concat(g, rng, typ):
    a = g.new(typ, (4, 3, 2), rng.integers(-9, 9, 24))
    b = g.new(typ, (4, 3, 5), rng.integers(-9, 9, 60))
    outs = [g.repeat_4d(a, 8, 6, 4, 2), g.repeat_4d(a, 4, 3, 2, 3), g.concat(a, b, 2),
            g.concat(a, g.new(typ, (4, 1, 2), rng.integers(-9, 9, 8)), 1),
            g.concat(g.permute(a, 1, 0, 2, 3), g.new(typ, (2, 4, 2), rng.integers(-9, 9, 16)), 0)]
    g.run(*outs).assert_close(rtol=0, atol=0)


def test_pad_fill_arange_tri(g, rng):
    x = g.new(T.F32, (5, 4, 3), rng.standard_normal(60))
    sq = g.new(T.F32, (6, 6, 2), rng.standard_normal(72))
    outs = [g.pad(x, 3, 1, 0, 2), g.pad_ext(x, 1, 2, 0, 1, 2, 0, 1, 1), g.pad_ext_circular(x, 2, 1, 1, 2, 0, 1, 0, 0),
            g.fill(x, 0.5), g.arange(0.0, 10.0, 0.75), g.arange(-3.0, 3.0, 0.1)]
    outs += [g.tri(sq, k) for k in range(4)]
    g.run(*outs).assert_close(rtol=0, atol=0)


@pytest.mark.parametrize("dst_type", [T.F16, T.F32])
def test_im2col(g, rng, dst_type):
    img = g.new(T.F32, (13, 11, 3, 2), rng.standard_normal(858))
    kern = g.new(T.F16, (3, 3, 3, 4))
    img1 = g.new(T.F32, (20, 3, 2), rng.standard_normal(120))
    k1 = g.new(T.F16, (5, 3, 4))
    outs = [g.im2col(kern, img, 1, 1, 1, 1, 1, 1, True, int(dst_type)),
            g.im2col(kern, img, 2, 3, 0, 2, 2, 1, True, int(dst_type)),
            g.im2col(k1, img1, 2, 0, 1, 0, 1, 0, False, int(dst_type))]
    g.run(*outs).assert_close(rtol=0, atol=0)


@pytest.mark.parametrize("mode", [0, 1, 1 | 0x100])
def test_upscale(g, rng, mode):
    x = g.new(T.F32, (7, 5, 3, 2), rng.standard_normal(210))
    outs = [g.interpolate(x, 14, 10, 3, 2, mode), g.interpolate(x, 11, 3, 6, 2, mode),
            g.interpolate(x, 4, 9, 3, 2, mode)]
    g.run(*outs).assert_close(rtol=1e-6, atol=1e-6)
