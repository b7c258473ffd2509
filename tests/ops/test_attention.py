"""SOFT_MAX and FLASH_ATTN_EXT against real ggml (and FA against an independent float64 formula)."""
from __future__ import annotations

import numpy as np
import pytest

from hybridllm.ggml.types import GGMLType as T


def _mask(rng, n_kv, n_rows, typ_pad=1, causal_from=None):
    m = np.where(rng.random((n_rows, n_kv)) < 0.2, -np.inf, 0.0)
    m[:, 0] = 0.0
    return m


@pytest.mark.parametrize("mask_type", [None, T.F16, T.F32])
def test_soft_max(g, rng, mask_type):
    x = g.new(T.F32, (37, 5, 4, 2), rng.standard_normal(37 * 40) * 3)
    outs = [g.soft_max(x)]
    if mask_type is not None:
        m = g.new(mask_type, (37, 8, 2, 1), np.where(rng.random(37 * 16) < 0.3, -np.inf, rng.standard_normal(37 * 16)))
        outs += [g.soft_max_ext(x, m, 0.125, 0.0), g.soft_max_ext(x, m, 1.0, 8.0)]
        sm = g.soft_max_ext(x, m, 0.5, 0.0)
        g.soft_max_add_sinks(sm, g.new(T.F32, (4,), rng.standard_normal(4)))
        outs.append(sm)
    g.run(*outs).assert_close(rtol=1e-6, atol=1e-7)


def _fa_inputs(g, rng, D, Dv, n_q, n_kv, H, H_kv, S, kv_type, mask=True):
    q = g.new(T.F32, (D, H, n_q, S), rng.standard_normal(D * H * n_q * S))
    qp = g.permute(q, 0, 2, 1, 3)                                       # (D, n_q, H, S) as llama.cpp builds it
    kc = g.new(kv_type, (D, H_kv, n_kv, S), rng.standard_normal(D * H_kv * n_kv * S))
    vc = g.new(kv_type, (Dv, H_kv, n_kv, S), rng.standard_normal(Dv * H_kv * n_kv * S))
    k, v = g.permute(kc, 0, 2, 1, 3), g.permute(vc, 0, 2, 1, 3)       # permuted cache views
    m = None
    if mask:
        mv = np.where(rng.random((S, 1, n_q, n_kv)) < 0.25, -np.inf, 0.0)
        mv[..., 0] = 0
        m = g.new(T.F16, (n_kv, n_q, 1, S), mv)
    return qp, k, v, m


def _fa_reference(res, q, k, v, m, scale, softcap=0.0, sinks=None, q_f16=False):
    """Exact attention in float64 from the tensors' values (Q rounded to F16 if `q_f16`)."""
    qv = res.ref(q)                               # (S, H, n_q, D)
    if q_f16:
        qv = qv.astype(np.float16).astype(np.float64)
    kv, vv = res.ref(k), res.ref(v)               # (S, H_kv, n_kv, D)
    H, n_q = qv.shape[1], qv.shape[2]
    rk = H // kv.shape[1]
    kk = np.repeat(kv, rk, axis=1)
    vv = np.repeat(vv, H // vv.shape[1], axis=1)
    s = np.einsum("shqd,shkd->shqk", qv, kk) * scale
    if softcap:
        s = softcap * np.tanh(s / softcap)
    if m is not None:
        s = s + res.ref(m)[:, :, :n_q, :]
    mx = s.max(-1, keepdims=True)
    if sinks is not None:
        mx = np.maximum(mx, sinks[None, :, None, None])
    e = np.exp(s - mx)
    den = e.sum(-1, keepdims=True) + (np.exp(sinks[None, :, None, None] - mx) if sinks is not None else 0)
    return np.einsum("shqk,shkd->sqhd", e / den, vv)


@pytest.mark.parametrize("kv_type", [T.F32, T.F16])
@pytest.mark.parametrize("n_q,n_kv", [(1, 256), (1, 512), (7, 96), (64, 128)])
def test_flash_attn_ext(g, rng, kv_type, n_q, n_kv, monkeypatch):
    """The exact float32 option (the default replays ggml's F16 accumulator bit for bit: tests/numerics)."""
    from hybridllm.backends.numpy_ops import attention
    monkeypatch.setattr(attention, "GGML_F16_ACCUMULATOR", False)
    D, H, H_kv, S = 64, 4, 2, 1
    q, k, v, m = _fa_inputs(g, rng, D, D, n_q, n_kv, H, H_kv, S, kv_type)
    out = g.flash_attn_ext(q, k, v, m, 0.125, 0.0, 0.0)
    res = g.run(out)
    row_path = n_q < 64            # ggml's row-by-row kernel: Q rounded to K's type, F16 V accumulator
    ref64 = _fa_reference(res, q, k, v, m, 0.125, q_f16=row_path and kv_type == T.F16)
    # our result is exact attention in float32
    assert np.allclose(res.ours(out), ref64, rtol=1e-5, atol=2e-6)
    f16_accumulator = kv_type == T.F16 and row_path
    res.assert_close(rtol=3e-3 if f16_accumulator else 2e-5, atol=3e-3 if f16_accumulator else 2e-6)


def test_flash_attn_ext_gqa_sinks_softcap_alibi_batch(g, rng):
    D, Dv, n_q, n_kv, H, H_kv, S = 32, 48, 3, 80, 8, 2, 2
    q, k, v, m = _fa_inputs(g, rng, D, Dv, n_q, n_kv, H, H_kv, S, T.F32)
    sinks = g.new(T.F32, (H,), rng.standard_normal(H))
    o1 = g.flash_attn_ext(q, k, v, m, 0.2, 0.0, 30.0)
    o2 = g.flash_attn_ext(q, k, v, m, 0.2, 0.0, 0.0)
    g.flash_attn_ext_add_sinks(o2, sinks)
    o3 = g.flash_attn_ext(q, k, v, m, 0.2, 4.0, 0.0)
    o4 = g.flash_attn_ext(q, k, v, None, 0.2, 0.0, 0.0)
    res = g.run(o1, o2, o3, o4)
    res.assert_close(rtol=2e-5, atol=2e-6)
    assert np.allclose(res.ours(o2), _fa_reference(res, q, k, v, m, 0.2, sinks=res.ref(sinks).ravel()),
                       rtol=1e-5, atol=2e-6)


def test_flash_attn_ext_fully_masked_row(g, rng):
    D, n_q, n_kv, H = 16, 2, 32, 2
    q, k, v, _ = _fa_inputs(g, rng, D, D, n_q, n_kv, H, H, 1, T.F16, mask=False)
    mv = np.zeros((n_q, n_kv))
    mv[1, :] = -np.inf
    m = g.new(T.F16, (n_kv, n_q), mv)
    res = g.run(g.flash_attn_ext(q, k, v, m, 0.25, 0.0, 0.0))
    res.assert_close(rtol=3e-3, atol=3e-3)


@pytest.mark.parametrize("n_q,n_kv,Dv,softcap", [(1, 256, 64, 0.0), (1, 512, 64, 0.0), (3, 96, 48, 0.0),
                                                 (2, 80, 64, 20.0)])
def test_flash_attn_ext_f16_accumulator_bitexact(g, rng, monkeypatch, n_q, n_kv, Dv, softcap):
    """The opt-in replay of ggml's F16 accumulator path reproduces ggml to the last bit."""
    from hybridllm.backends.numpy_ops import attention
    monkeypatch.setattr(attention, "GGML_F16_ACCUMULATOR", True)
    D, H, H_kv = 64, 4, 2
    q, k, v, m = _fa_inputs(g, rng, D, Dv, n_q, n_kv, H, H_kv, 1, T.F16)
    o1 = g.flash_attn_ext(q, k, v, m, 0.125, 0.0, softcap)
    o2 = g.flash_attn_ext(q, k, v, m, 0.125, 3.0, softcap)
    g.flash_attn_ext_add_sinks(o2, g.new(T.F32, (H,), rng.standard_normal(H)))
    g.run(o1, o2).assert_close(rtol=0, atol=0)


def test_flash_attn_ext_f16_accumulator_split_kv_threads(g, rng, monkeypatch):
    """ggml splits a single query's KV range over its threads; the replay merges chunks the same way."""
    from hybridllm.backends.numpy_ops import attention
    monkeypatch.setattr(attention, "GGML_F16_ACCUMULATOR", True)
    monkeypatch.setattr(attention, "GGML_THREADS", 2)
    q, k, v, m = _fa_inputs(g, rng, 64, 64, 1, 600, 4, 1, 1, T.F16)
    out = g.flash_attn_ext(q, k, v, m, 0.125, 0.0, 0.0)
    g.flash_attn_ext_add_sinks(out, g.new(T.F32, (4,), rng.standard_normal(4)))
    g.run(out, n_threads=2).assert_close(rtol=0, atol=0)


@pytest.mark.parametrize("kv_type", [T.Q8_0, T.Q4_0, T.BF16])
def test_flash_attn_ext_other_cache_types(g, rng, kv_type):
    """Quantized/BF16 caches: Q is converted to K's vec_dot type (Q8_0 / BF16) as ggml does, V is decoded."""
    q, k, v, m = _fa_inputs(g, rng, 64, 64, 2, 96, 4, 2, 1, kv_type)
    out = g.flash_attn_ext(q, k, v, m, 0.125, 0.0, 0.0)
    g.run(out).assert_close(rtol=1e-5, atol=1e-5)



@pytest.mark.parametrize("window", [(40, 90), (0, 0)])
def test_flash_attn_ext_sliding_window_and_empty_mask(g, rng, window):
    """Only the KV range some query can see is read; a mask hiding everything gives zeros, as in ggml."""
    n_q, n_kv, H = 3, 128, 4
    q, k, v, _ = _fa_inputs(g, rng, 32, 32, n_q, n_kv, H, 2, 1, T.F16, mask=False)
    mv = np.full((n_q, n_kv), -np.inf)
    lo, hi = window
    mv[:, lo:hi] = np.where(rng.random((n_q, hi - lo)) < 0.3, -np.inf, 0.0)
    mv[0, lo:hi][:1] = 0.0 if hi > lo else -np.inf
    m = g.new(T.F16, (n_kv, n_q), mv)
    out = g.flash_attn_ext(q, k, v, m, 0.2, 0.0, 0.0)
    sunk = g.flash_attn_ext(q, k, v, m, 0.2, 0.0, 0.0)
    g.flash_attn_ext_add_sinks(sunk, g.new(T.F32, (H,), rng.standard_normal(H)))
    g.run(out, sunk).assert_close(rtol=3e-3, atol=3e-3)


def test_flash_attn_ext_query_blocks(g, rng, monkeypatch):
    """Long prompts are processed in query blocks (bounded score memory); results must not change."""
    from hybridllm.backends.numpy_ops import attention
    monkeypatch.setattr(attention, "FA_SCORES_BYTES", 4 * 96 * 4 * 5)     # 5 queries per block
    n_q, n_kv = 70, 96
    q, k, v, _ = _fa_inputs(g, rng, 32, 32, n_q, n_kv, 4, 2, 1, T.F16, mask=False)
    causal = np.where(np.arange(n_kv)[None, :] <= np.arange(n_q)[:, None] + 20, 0.0, -np.inf)
    out = g.flash_attn_ext(q, k, v, g.new(T.F16, (n_kv, n_q), causal), 0.2, 0.0, 0.0)
    g.run(out).assert_close(rtol=2e-5, atol=2e-6)                     # n_q >= 64: ggml's F32 tiled path
