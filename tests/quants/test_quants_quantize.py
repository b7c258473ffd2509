"""quantize() against the peer's ggml-cpu `from_float` (ctypes), gguf.quants.quantize, and scalar
formulas written from the spec / C semantics; plus round-trip error bounds.

Which Q8_0/Q8_1 quantizer is right: the peer wheel's libggml-cpu is an AVX2 build, whose
`quantize_row_q8_0/q8_1` use `id = 127/amax` and `vroundps` (round half to even), while the portable
reference (`*_ref`, gguf) uses `id = 1/d` and `roundf` (half away from zero). `quantize` matches the
AVX2 code; `test_q8_0_ties_simd_vs_ref` shows the two differ and that the peer runs the AVX2 one.
"""
from __future__ import annotations

import gguf
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra.numpy import arrays

import quants_oracle as oracle
from hybridllm.ggml.types import GGMLType as T, TRAITS
from hybridllm.quants import QUANTIZE_TYPES, dequantize, quantize, vec_dot_type
from hybridllm.quants.legacy import quantize_q8_0_ref

# The near-f16-limit rows overflow f16 scales to inf in gguf and in the scalar formulas, as in ggml.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")

REQUIRED = {T.F16, T.BF16, T.Q8_0, T.Q8_1, T.Q8_K, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.IQ4_NL}
F = np.float32


def edge_rows(bs: int, rng: np.random.Generator) -> np.ndarray:
    """Rows of 4 blocks (>= 128 elements) covering the cases quantizers get wrong."""
    n = max(bs, 32) * 4
    rows = [rng.standard_normal(n) * s for s in (1e-3, 0.02, 1.0, 37.0)]
    rows += [np.zeros(n), np.full(n, -0.0), np.full(n, 0.75), np.full(n, -3.0)]
    r = rng.standard_normal(n); r[5] = -9.0; rows.append(r)                 # max |x| negative
    r = rng.standard_normal(n); r[5], r[6] = -9.0, 9.0; rows.append(r)       # tie for max |x|
    rows.append((np.arange(n) % 255 - 127) / 2.0)                           # many exact halves
    rows.append(np.where(np.arange(n) % 2, 127.0, np.arange(n) % 64 + 0.5))  # .5 ties after scaling
    r = np.zeros(n); r[::7] = 1.0; rows.append(r)                           # sparse
    rows.append(rng.standard_normal(n) * 1e-20)                            # tiny (IQ4 eps path)
    rows.append(rng.standard_normal(n) * 3e4)                              # near the f16 limit
    rows.append(rng.integers(-8, 8, n).astype(float))                       # exact small integers
    return np.array(rows, dtype=np.float32)


def iq4_nl_comparable(x: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Mask of IQ4_NL bytes ggml defines: the qs of blocks with max |x| < 1e-15 are stale stack bytes."""
    mask = np.ones(q.shape, bool).reshape(-1, 18)
    small = np.abs(x.reshape(-1, 32)).max(axis=1) < 1e-15
    mask[small, 2:] = False
    return mask.reshape(q.shape)


def test_required_types_present() -> None:
    assert REQUIRED <= QUANTIZE_TYPES


@pytest.mark.parametrize("t", sorted(QUANTIZE_TYPES & oracle.FROM_FLOAT_TYPES), ids=lambda t: T(t).name)
def test_matches_ggml_cpu(t: int) -> None:
    x = edge_rows(TRAITS[t].blck_size, np.random.default_rng(t))
    ours, ref = quantize(x, t), oracle.from_float(x, t)
    mask = iq4_nl_comparable(x, ref) if t == T.IQ4_NL else np.ones(ref.shape, bool)
    assert ours.shape == ref.shape
    assert (ours[mask] == ref[mask]).all()


@settings(max_examples=60, deadline=None)
@given(x=arrays(np.float32, (2, 256), elements=st.floats(-1e6, 1e6, width=32)),
       t=st.sampled_from(sorted(QUANTIZE_TYPES & oracle.FROM_FLOAT_TYPES)))
def test_matches_ggml_cpu_hypothesis(x: np.ndarray, t: int) -> None:
    """Arbitrary finite floats (subnormals, repeated values, signed zeros) byte-for-byte with ggml-cpu."""
    ours, ref = quantize(x, t), oracle.from_float(x, t)
    mask = iq4_nl_comparable(x, ref) if t == T.IQ4_NL else np.ones(ref.shape, bool)
    assert (ours[mask] == ref[mask]).all()


@pytest.mark.parametrize("t", [T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1], ids=lambda t: T(t).name)
def test_matches_gguf(t: int) -> None:
    x = edge_rows(TRAITS[t].blck_size, np.random.default_rng(50 + t))
    x = x[np.signbit(x[:, 0]) == (x[:, 0] < 0)]  # gguf keeps a leading -0.0 as max; ggml does not
    ref = gguf.quants.quantize(x, gguf.GGMLQuantizationType(t)).view(np.uint8).reshape(len(x), -1)
    assert (quantize(x, t) == ref).all()


def test_q8_0_ref_matches_gguf_and_ggml() -> None:
    x = edge_rows(32, np.random.default_rng(3))
    blocks = quantize_q8_0_ref(x.reshape(-1, 32)).reshape(len(x), -1)
    assert (blocks == gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0)).all()
    assert (blocks == oracle.from_float(x, T.Q8_0, ref=True)).all()


def test_q8_0_ties_simd_vs_ref() -> None:
    """amax = 127 makes id = 1, so halves stay exact ties: AVX2 rounds them to even, roundf away."""
    x = np.array([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5] + [0.0] * 24], np.float32)
    want_simd = [127, 0, 2, 2, 0, -2, -2, 4]
    want_ref = [127, 1, 2, 3, -1, -2, -3, 4]
    peer = oracle.from_float(x, T.Q8_0)[0, 2:10].view(np.int8).tolist()
    assert peer == want_simd                                     # the peer's CPU backend runs AVX2
    assert quantize(x, T.Q8_0)[0, 2:10].view(np.int8).tolist() == want_simd
    assert quantize_q8_0_ref(x)[0, 2:10].view(np.int8).tolist() == want_ref
    assert oracle.from_float(x, T.Q8_0, ref=True)[0, 2:10].view(np.int8).tolist() == want_ref


def _f16(v: float) -> int:
    return int(np.array([v], np.float32).astype(np.float16).view(np.uint16)[0])


def _rne(v: np.float32) -> int:
    return int(np.rint(v))  # numpy rint is round-half-even


def q8_0_scalar(block: np.ndarray) -> bytes:
    """ggml-cpu AVX2 quantize_row_q8_0 for one block, written element by element."""
    amax = max(abs(float(v)) for v in block)
    d = F(amax) / F(127)
    idv = F(127) / F(amax) if amax != 0 else F(0)
    qs = [max(-128, min(127, _rne(F(v) * idv))) for v in block]
    return _f16(d).to_bytes(2, "little") + np.array(qs, np.int8).tobytes()


def q8_1_scalar(block: np.ndarray) -> bytes:
    b = q8_0_scalar(block)
    amax = max(abs(float(v)) for v in block)
    s = F(amax) / F(127) * F(sum(np.frombuffer(b[2:], np.int8).astype(int)))
    return b[:2] + _f16(s).to_bytes(2, "little") + b[2:]


def q8_k_scalar(block: np.ndarray) -> bytes:
    """quantize_row_q8_K_ref for one block: iscale = -127/max (max = first value of largest |x|)."""
    amax, mx = 0.0, 0.0
    for v in block:
        if abs(float(v)) > amax:
            amax, mx = abs(float(v)), float(v)
    if amax == 0:
        return bytes(292)
    iscale = F(-127) / F(mx)
    qs = [min(127, _rne(iscale * F(v))) for v in block]
    bsums = [sum(qs[16 * j:16 * j + 16]) for j in range(16)]
    return (np.array([F(1) / iscale], "<f4").tobytes() + np.array(qs, np.int8).tobytes()
            + np.array(bsums, "<i2").tobytes())


@pytest.mark.parametrize("t,fn", [(T.Q8_0, q8_0_scalar), (T.Q8_1, q8_1_scalar), (T.Q8_K, q8_k_scalar)],
                         ids=["Q8_0", "Q8_1", "Q8_K"])
def test_activation_quantizers_scalar_formula(t: int, fn) -> None:
    x = edge_rows(TRAITS[t].blck_size, np.random.default_rng(70 + t))
    bs = TRAITS[t].blck_size
    want = b"".join(fn(blk) for blk in x.reshape(-1, bs))
    assert quantize(x, t).tobytes() == want


def test_q8_k_edge_cases() -> None:
    x = np.zeros((3, 256), np.float32)
    x[1] = np.linspace(-1, 1, 256); x[1, 9] = -2.0      # max |x| negative -> d > 0, q[9] = -127
    x[2, :] = 0.25; x[2, 0] = -127.0; x[2, 1:5] = [2.5, 3.5, -2.5, 0.5]  # iscale = 1: exact ties
    q = quantize(x, T.Q8_K)
    d = q[:, 0:4].view("<f4")[:, 0]
    qs = q[:, 4:260].view(np.int8)
    bsums = q[:, 260:].view("<i2")
    assert d[0] == 0 and not qs[0].any() and not bsums[0].any()
    assert d[1] == np.float32(1) / (np.float32(-127) / np.float32(-2.0)) > 0 and qs[1, 9] == -127
    assert qs[2, :5].tolist() == [-127, 2, 4, -2, 0] and d[2] == 1.0
    assert (bsums == qs.astype(int).reshape(3, 16, 16).sum(-1)).all()
    y = quantize(-x[1:2], T.Q8_K)                        # positive max -> negative d, q = -127 there too
    assert y[0, 0:4].view("<f4")[0] < 0 and y[0, 4 + 9].astype(np.int8) == -127
    assert (dequantize(q, T.Q8_K, 256)[2, :5] == [-127, 2, 4, -2, 0]).all()


# Round trip bound per element, in units of the block's largest |x| (or absolute for plain types).
_BOUND = {T.Q8_0: 0.6 / 127, T.Q8_1: 0.6 / 127, T.Q8_K: 0.501 / 127, T.Q4_0: 1.01 / 8, T.Q5_0: 1.01 / 16,
          T.Q4_1: 0.6 * 2 / 15, T.Q5_1: 0.6 * 2 / 31, T.IQ4_NL: 0.14,
          # MXFP4 clips: its largest value 6*2^E can lie below amax < 2^(E+1)
          T.MXFP4: 0.5, T.NVFP4: 0.25,
          # d = amax and values {-d, 0, d}; Q1_0 keeps only signs and d = mean |x|
          T.Q2_0: 0.501, T.TQ1_0: 0.501, T.TQ2_0: 0.501, T.Q1_0: 1.001}


@pytest.mark.parametrize("t", sorted(QUANTIZE_TYPES), ids=lambda t: T(t).name)
def test_round_trip_error(t: int) -> None:
    rng = np.random.default_rng(90 + t)
    bs = max(TRAITS[t].blck_size, 32)
    x = (rng.standard_normal((300, bs * 2)) * rng.uniform(0.01, 10, (300, 1))).astype(np.float32)
    y = dequantize(quantize(x, t), t, x.shape[1])
    err = np.abs(y - x)
    if t == T.F32:
        assert (err == 0).all()
    elif t in (T.F16, T.BF16):
        assert (err <= np.abs(x) * (2.0 ** -11 if t == T.F16 else 2.0 ** -8)).all()
    else:
        amax = np.abs(x.reshape(-1, TRAITS[t].blck_size)).max(axis=1, keepdims=True)
        assert (err.reshape(amax.shape[0], -1) <= _BOUND[t] * amax).all()


def test_shapes_and_errors() -> None:
    x = np.random.default_rng(5).standard_normal((2, 3, 64)).astype(np.float32)
    q = quantize(x, T.Q8_0)
    assert q.shape == (2, 3, 68) and q.dtype == np.uint8
    assert (quantize(x[:, ::2], T.Q8_0) == q[:, ::2]).all()        # non-contiguous input
    assert quantize(np.zeros((0, 64), np.float32), T.Q4_0).shape == (0, 36)
    assert (quantize(x.astype(np.float64), T.Q8_0) == q).all()     # converted to float32 first
    with pytest.raises(ValueError):
        quantize(x[..., :40], T.Q8_0)
    with pytest.raises(ValueError):
        quantize(x, T.IQ2_XXS)


@pytest.mark.parametrize("t", [T.MXFP4, T.NVFP4], ids=["MXFP4", "NVFP4"])
def test_fp4_scale_boundaries(t: int) -> None:
    """amax at, just below and just above every power of two (subnormals included): the shared
    exponent (MXFP4 floor(log2f)) and the UE4M3 rounding/saturation (NVFP4) agree with ggml."""
    p = (2.0 ** np.arange(-140, 100)).astype(np.float32)
    v = np.concatenate([p, np.nextafter(p, np.float32(0)), np.nextafter(p, np.float32(np.inf))])
    x = np.zeros((len(v), TRAITS[t].blck_size), np.float32)
    x[:, 3], x[:, 5], x[:, -1] = v, -v * np.float32(0.3), v * np.float32(6 * 448)
    assert (quantize(x, t) == oracle.from_float(x, t)).all()


@pytest.mark.parametrize("t", sorted(TRAITS), ids=lambda t: T(t).name)
def test_vec_dot_type_matches_ggml_cpu(t: int) -> None:
    """vec_dot_type() against the peer's ggml-cpu type traits, for every type id it knows."""
    has_dot, want = oracle.cpu_vec_dot(t)
    if has_dot:
        assert vec_dot_type(t) == want
    elif t != T.Q8_1:  # Q8_1 carries vec_dot_type Q8_1 in ggml's table but has no dot product
        with pytest.raises(ValueError):
            vec_dot_type(t)
