"""random_blocks()/encode(): valid blocks of every type, decoded by the peer's ggml, look like weights."""
from __future__ import annotations

import numpy as np
import pytest

import quants_oracle as oracle
from hybridllm.ggml.types import GGMLType as T, TRAITS, row_size
from hybridllm.quants import DEQUANTIZE_TYPES, dequantize
from hybridllm.quants.blocks import encode, random_blocks

# rms(decode(encode(x)) - x) / rms(x) for Gaussian x: what round-to-nearest reaches with each format.
_REL_RMS = {T.Q2_K: 0.42, T.Q3_K: 0.2, T.Q4_K: 0.1, T.Q5_K: 0.05, T.Q6_K: 0.025, T.IQ4_XS: 0.1,
            T.Q4_0: 0.11, T.Q4_1: 0.1, T.Q5_0: 0.055, T.Q5_1: 0.05, T.Q8_0: 0.008, T.Q8_1: 0.008,
            T.Q8_K: 0.009, T.IQ4_NL: 0.1, T.MXFP4: 0.15, T.NVFP4: 0.12, T.F16: 1e-3, T.BF16: 5e-3, T.F32: 0,
            # binary/ternary formats are made for ternary-trained weights: Gaussian data fits them badly
            T.Q1_0: 0.65, T.Q2_0: 0.78, T.TQ1_0: 0.87, T.TQ2_0: 0.87}


def decode(raw: np.ndarray, t: int, n: int) -> np.ndarray:
    if t in oracle.TO_FLOAT_TYPES:
        return oracle.to_float(raw, t, n)   # the peer's decoder: proves the bytes mean what we think
    return dequantize(raw, t, n)


@pytest.mark.parametrize("t", sorted(DEQUANTIZE_TYPES), ids=lambda t: T(t).name)
def test_random_blocks_look_like_weights(t: int) -> None:
    n = 512
    raw = random_blocks(t, 64, n, np.random.default_rng(t), scale=0.02)
    assert raw.dtype == np.uint8 and raw.shape == (64, row_size(t, n))
    w = decode(raw, t, n)
    assert np.isfinite(w).all()
    assert 0.014 < w.std() < 0.026
    bs = TRAITS[t].blck_size
    if bs > 1:   # blocks are centred before encoding: block means are tiny compared to the spread
        assert np.abs(w.reshape(-1, bs).mean(axis=1)).mean() < 0.1 * 0.02


@pytest.mark.parametrize("t", sorted(_REL_RMS), ids=lambda t: T(t).name)
def test_encode_accuracy(t: int) -> None:
    x = np.random.default_rng(3).standard_normal((32, 1024)).astype(np.float32) * np.float32(0.5)
    x[0] = 0  # an all-zero row encodes to zeros
    y = decode(encode(x, t), t, 1024)
    assert (y[0] == 0).all()
    rel = np.sqrt(((y - x) ** 2).mean()) / np.sqrt((x ** 2).mean())
    assert rel <= _REL_RMS[t]


def test_encode_outliers_and_shapes() -> None:
    x = np.random.default_rng(4).standard_normal((2, 3, 256)).astype(np.float32)
    x[0, 0, 17] = 40.0  # one outlier per super-block must not break the packing
    for t in (T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.IQ4_XS):
        raw = encode(x, t)
        assert raw.shape == (2, 3, row_size(t, 256))
        y = decode(raw.reshape(6, -1), t, 256).reshape(x.shape)
        assert abs(y[0, 0, 17] - 40.0) < 0.15 * 40.0
    with pytest.raises(ValueError):
        random_blocks(T.Q4_K, 2, 100, np.random.default_rng(0))
    with pytest.raises(ValueError):
        encode(x, T.IQ2_XXS)
