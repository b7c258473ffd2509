"""dequantize() against two independent decoders: the peer's own ggml-base (ctypes) and gguf.quants.

Both comparisons are bit-exact: our float32 arithmetic follows ggml's operation order, and ggml-base is
built without FMA, so there is nothing to round differently. gguf.quants happens to agree exactly too.
"""
from __future__ import annotations

import gguf
import numpy as np
import pytest

import quants_oracle as oracle
from hybridllm.ggml.types import GGMLType as T, TRAITS, row_size
from hybridllm.quants import DEQUANTIZE_TYPES, dequantize

# Byte offsets of the f16 scale fields of each block type (quant-formats.md); Q8_K has an f32 d at 0.
F16_FIELDS = {T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2], T.Q8_0: [0], T.Q8_1: [0, 2],
              T.Q2_K: [80, 82], T.Q3_K: [108], T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208],
              T.IQ4_NL: [0], T.IQ4_XS: [0], T.Q1_0: [0], T.Q2_0: [0], T.TQ1_0: [52], T.TQ2_0: [64],
              T.IQ2_XXS: [0], T.IQ2_XS: [0], T.IQ2_S: [0], T.IQ3_XXS: [0], T.IQ3_S: [0], T.IQ1_S: [0]}
REQUIRED = {T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q8_1, T.Q8_K, T.Q2_K,
            T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.IQ4_NL, T.IQ4_XS, T.MXFP4}
BLOCK_TYPES = sorted(t for t in DEQUANTIZE_TYPES if TRAITS[t].blck_size > 1)


def n_for(t: int) -> int:
    bs = TRAITS[t].blck_size
    return bs * max(1, 512 // bs) if bs > 1 else 96


def sane_rows(t: int, rows: int, rng: np.random.Generator, n: int = 0) -> np.ndarray:
    """Random bytes with finite, weight-sized scales (N(0, 0.05) as f16 / f32, MXFP4 2^-18..2^2)."""
    n = n or n_for(t)
    if t == T.F32:
        return rng.standard_normal((rows, n)).astype(np.float32).view(np.uint8)
    if t in (T.F16, T.BF16):
        bits = rng.integers(0, 1 << 16, (rows, n), dtype=np.uint16)
        bits &= 0xBFFF  # exponent MSB cleared: finite values only
        return bits.view(np.uint8)
    raw = rng.integers(0, 256, (rows, row_size(t, n)), dtype=np.uint8)
    blocks = raw.reshape(-1, TRAITS[t].type_size)
    for off in F16_FIELDS.get(t, []):
        vals = (rng.standard_normal(blocks.shape[0]) * 0.05).astype(np.float16)
        blocks[:, off:off + 2] = vals.view(np.uint8).reshape(-1, 2)
    if t == T.IQ1_M:  # its f16 scale is spread over the top nibbles of 4 u16: clear the exponent MSB
        blocks[:, 55] &= 0xBF
    if t == T.MXFP4:
        blocks[:, 0] = rng.integers(110, 131, blocks.shape[0])
    if t == T.Q8_K:
        blocks[:, 0:4] = (rng.standard_normal(blocks.shape[0]) * 0.05).astype(np.float32).view(np.uint8).reshape(-1, 4)
    return raw


def same_bits(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Elementwise bit equality, any NaN equal to any NaN (payload propagation is not specified)."""
    return (a.view(np.uint32) == b.view(np.uint32)) | (np.isnan(a) & np.isnan(b))


def test_required_types_present() -> None:
    assert REQUIRED <= DEQUANTIZE_TYPES


@pytest.mark.parametrize("t", sorted(oracle.TO_FLOAT_TYPES), ids=lambda t: T(t).name)
def test_matches_ggml_sane(t: int) -> None:
    raw = sane_rows(t, 48, np.random.default_rng(t))
    ours = dequantize(raw, t, n_for(t))
    ref = oracle.to_float(raw, t, n_for(t))
    assert np.isfinite(ref).all()
    assert same_bits(ours, ref).all()


@pytest.mark.parametrize("t", sorted(oracle.TO_FLOAT_TYPES), ids=lambda t: T(t).name)
def test_matches_ggml_garbage(t: int) -> None:
    """Fully random bytes: inf/NaN/subnormal scales decode the same as ggml, with no warnings."""
    rng = np.random.default_rng(100 + t)
    raw = rng.integers(0, 256, (32, row_size(t, n_for(t))), dtype=np.uint8)
    with np.errstate(all="raise"):
        ours = dequantize(raw, t, n_for(t))
    assert same_bits(ours, oracle.to_float(raw, t, n_for(t))).all()


@pytest.mark.parametrize("t", sorted(DEQUANTIZE_TYPES - {T.Q8_1, T.Q8_K, T.Q1_0, T.Q2_0}),  # gguf lacks these
                         ids=lambda t: T(t).name)
def test_matches_gguf(t: int) -> None:
    raw = sane_rows(t, 48, np.random.default_rng(200 + t))
    ref = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(t))
    assert same_bits(dequantize(raw, t, n_for(t)), ref).all()


def test_q8_1_formula() -> None:
    """Q8_1 (no ggml/gguf decoder): y = qs * d, d the f16 at 0; s (f16 at 2) is not used."""
    raw = sane_rows(T.Q8_1, 8, np.random.default_rng(7)).reshape(-1, 36)
    out = dequantize(raw.reshape(8, -1), T.Q8_1, n_for(T.Q8_1)).reshape(-1, 32)
    for blk, y in zip(raw[:20], out[:20]):
        d = np.frombuffer(blk[0:2].tobytes(), "<f2")[0].astype(np.float32)
        qs = np.frombuffer(blk[4:36].tobytes(), np.int8)
        assert [float(np.float32(q) * d) for q in qs] == y.tolist()


def test_q4_k_spec_formula() -> None:
    """One Q4_K block decoded straight from quant-formats.md's text, element by element."""
    blk = sane_rows(T.Q4_K, 1, np.random.default_rng(9))[0, :144]
    d, dmin = (np.frombuffer(blk[o:o + 2].tobytes(), "<f2")[0].astype(np.float32) for o in (0, 2))
    q = blk[4:16].astype(int)

    def sc_m(j: int) -> tuple[int, int]:
        if j < 4:
            return q[j] & 63, q[j + 4] & 63
        return (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4)

    want = np.zeros(256, np.float32)
    for p in range(4):
        (s0, m0), (s1, m1) = sc_m(2 * p), sc_m(2 * p + 1)
        for l in range(32):
            b = int(blk[16 + 32 * p + l])
            want[64 * p + l] = np.float32(d * s0) * (b & 0xF) - np.float32(dmin * m0)
            want[64 * p + 32 + l] = np.float32(d * s1) * (b >> 4) - np.float32(dmin * m1)
    assert same_bits(dequantize(blk[None], T.Q4_K, 256)[0], want).all()


def test_shapes_strides_and_chunking() -> None:
    """Leading dims are kept, non-contiguous rows work, and results span several internal chunks."""
    rng = np.random.default_rng(11)
    t, n = T.Q4_0, 1024
    big = sane_rows(t, 3 * 2 * 100, rng, n).reshape(3, 2, 100, row_size(t, n))
    ref = oracle.to_float(big.reshape(-1, row_size(t, n)), t, n).reshape(3, 2, 100, n)
    assert same_bits(dequantize(big, t, n), ref).all()          # 600k elements: many chunks
    view = big[:, 1, ::3]                                        # strided rows
    assert not view.flags.c_contiguous
    assert same_bits(dequantize(view, t, n), ref[:, 1, ::3]).all()
    padded = np.zeros((5, row_size(t, n) + 7), np.uint8)         # rows inside a wider buffer
    padded[:, 3:3 + row_size(t, n)] = big[0, 0, :5]
    assert same_bits(dequantize(padded[:, 3:3 + row_size(t, n)], t, n), ref[0, 0, :5]).all()
    assert dequantize(np.zeros((0, row_size(t, n)), np.uint8), t, n).shape == (0, n)


def test_plain_types_unaligned() -> None:
    x = np.random.default_rng(12).standard_normal((4, 10)).astype(np.float32)
    buf = np.zeros(4 * 40 + 1, np.uint8)
    buf[1:] = x.view(np.uint8).reshape(-1)
    assert (dequantize(buf[1:].reshape(4, 40), T.F32, 10) == x).all()
    h = x.astype(np.float16)
    assert (dequantize(h.view(np.uint8), T.F16, 10) == h.astype(np.float32)).all()


@pytest.mark.parametrize("bad", [
    lambda: dequantize(np.zeros((2, 17), np.uint8), T.Q4_0, 32),      # wrong row size
    lambda: dequantize(np.zeros((2, 18), np.uint8), T.Q4_0, 31),      # n not a block multiple
    lambda: dequantize(np.zeros((2, 18), np.uint8), T.I32, 256),      # not a dequantizable type
    lambda: dequantize(np.zeros((2, 18), np.uint8), 4, 32),           # removed type id
])
def test_bad_input_raises_value_error(bad) -> None:
    with pytest.raises(ValueError):
        bad()


def test_dtype_checked() -> None:
    with pytest.raises(TypeError):
        dequantize(np.zeros((2, 18), np.int16), T.Q4_0, 32)
