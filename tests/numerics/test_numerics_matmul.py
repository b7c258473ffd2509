"""MUL_MAT bit-exactness against real ggml (the kernels are the matmul helper's; this pins the root cause
diffgraph found for the remaining ~1e-2 logit differences).

ggml quantizes the activations and takes exact integer block sums, then adds the per-block float terms
in the order of its AVX2 kernel (e.g. vec_dot_q8_0_q8_0: 8 float lanes, lane l += d_x*d_y * (sum of the
products of bytes 4l..4l+3) by FMA, block after block, then ((l0+l4)+(l2+l6)) + ((l1+l5)+(l3+l7))). Any
other order is ~1 ulp off in most elements, which the next activation quantization turns into ~1e-2
logit differences a few layers later (gemma3-270m: with every other op exact, taking MUL_MAT results
from the reference made the whole graph match). Decode (1 column) and prompt (14 columns) shapes.
"""
from __future__ import annotations

import ctypes

import pytest
from bitexact import mismatches

from hybridllm.ggml.types import GGMLType as T
from hybridllm.testing.ggml_ref import GT


def _mul_mat(g, a: GT, b: GT) -> GT:
    fn = g.base_lib.ggml_mul_mat
    fn.argtypes = [ctypes.c_void_p] * 3
    fn.restype = ctypes.c_void_p
    return GT(fn(g.ctx, a.ptr, b.ptr), g)


@pytest.mark.parametrize("wtype", [T.Q8_0, T.Q5_0, T.Q4_K, T.Q6_K, T.F16], ids=lambda t: T(t).name)
def test_mul_mat_bitexact(g, rng, wtype):
    K, M = 1024, 64
    w = g.new(wtype, (K, M), rng.standard_normal(K * M) * 0.02)
    outs = [_mul_mat(g, w, g.new(T.F32, (K, n), rng.standard_normal(K * n))) for n in (1, 14)]
    res = g.run(*outs, n_threads=2)
    bad = [mismatches(res, o) for o in outs]
    assert all(b == 0 for b, _ in bad), f"{T(wtype).name}: differing elements per output {bad}"
