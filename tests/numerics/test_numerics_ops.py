"""Bit-exactness of the non-matmul ops a llama.cpp master sends, against the real ggml CPU library.

Quantized matmuls re-quantize their activations, so a one-ulp difference upstream can flip a rounding and
grow to ~1e-2 relative logit error a few layers later (hybridllm.testing.diffgraph measured this on
gemma3-270m and on the synthetic models). Each test below pins one root cause found that way:
* SOFT_MAX, SILU, SWIGLU: ggml's AVX2 build uses its own vector expf (ggml_v_expf) in blocks of 8 lanes,
  glibc's expf for a row's tail, and (softmax) 8-lane partial sums added in double;
* ROPE: cos/sin come from glibc's cosf/sinf, which are not correctly rounded (~1% of angles);
* scalar libm ops (EXP, SIGMOID, TANH, GELU's tanh table, ...): glibc's float functions, not numpy's
  float32 SIMD versions nor the correctly rounded double result;
* FLASH_ATTN_EXT with an F16 K/V cache and < 64 queries: ggml keeps the V accumulator in F16; the
  default path replays that loop (its F16 dot product order, expf, F16 rounding per step);
* FLASH_ATTN_EXT with >= 64 queries: ggml's tiled kernel (64-entry KV tiles, sequential FMA chains,
  per-tile softmax with its AVX2 expf) differs from exact float32 attention by ~1e-7; replayed too.
"""
from __future__ import annotations

import numpy as np
import pytest
from bitexact import assert_bitexact

from hybridllm.ggml.types import GGMLType as T
from hybridllm.ggml.types import GluOp, RopeMode, UnaryOp


def _special(n: int) -> np.ndarray:
    """Values that take every branch of ggml_v_expf (|n| > 126 and > 192) and the overflow edges."""
    v = [0.0, -0.0, 1e-30, -1e-30, 88.0, 88.5, -88.0, 89.0, -103.9, -104.5, -110.0, 127.5, -127.5, 150.0,
         -150.0, 200.0, -200.0, 1000.0, -1000.0, np.inf, -np.inf, np.nan]
    return np.resize(np.array(v), n)


def test_soft_max_rows_masks_alibi_sinks(g, rng):
    """ggml_vec_soft_max_f32: AVX2 expf per 8 lanes, float partial sums added in double, a scalar tail
    (rows of 37 = 4 blocks + 5), F16/F32 masks broadcast over heads, ALiBi slopes, sinks."""
    outs = []
    for n in (37, 256):
        x = g.new(T.F32, (n, 6, 4, 2), rng.standard_normal(n * 48) * 4)
        outs.append(g.soft_max(x))
        for mtype in (T.F16, T.F32):
            mv = np.where(rng.random(n * 16) < 0.3, -np.inf, rng.standard_normal(n * 16))
            m = g.new(mtype, (n, 8, 2, 1), mv)
            outs += [g.soft_max_ext(x, m, 0.125, 0.0), g.soft_max_ext(x, m, 1.0, 8.0)]
            sm = g.soft_max_ext(x, m, 0.5, 0.0)
            g.soft_max_add_sinks(sm, g.new(T.F32, (4,), rng.standard_normal(4) * 3))
            outs.append(sm)
    wide = g.new(T.F32, (64, 3), np.concatenate([rng.uniform(-300, 0, 160), _special(32)]))
    outs.append(g.soft_max(wide))
    assert_bitexact(g.run(*outs, n_threads=2), *outs)


def test_silu_and_swiglu_rows(g, rng):
    """ggml_vec_silu_f32 / ggml_vec_swiglu_f32: v_silu in blocks of 8 lanes, glibc silu for the tail
    (rows of 1028 = 128 blocks + 4); fused and split GLU, swapped halves."""
    x = np.concatenate([rng.standard_normal(2000) * 6, _special(56)])
    a = g.new(T.F32, (1028, 2), x)
    b = g.new(T.F32, (1028, 2), rng.standard_normal(2056))
    both = g.new(T.F32, (2 * 1028, 3), rng.standard_normal(6168) * 5)
    outs = [g.silu(a), g.glu_split(a, b, int(GluOp.SWIGLU)), g.swiglu(both), g.swiglu_swapped(both),
            g.unary(a, int(UnaryOp.SILU))]
    assert_bitexact(g.run(*outs, n_threads=2), *outs)


@pytest.mark.parametrize("mode", [RopeMode.NORMAL, RopeMode.NEOX])
def test_rope_glibc_cos_sin(g, rng, mode):
    """rope_yarn: theta by repeated float products, cos/sin from glibc's cosf/sinf (large positions
    too), YaRN blend and magnitude, frequency factors, partial rotation."""
    outs = []
    for base, hd, nd in [(10000.0, 64, 64), (1e6, 256, 256), (500000.0, 128, 128), (75000.0, 80, 64)]:
        n = 11
        pos = g.new(T.I32, (n,), np.concatenate([np.arange(4), rng.integers(100, 40000, n - 4)]))
        x = g.new(T.F32, (hd, 3, n), rng.standard_normal(hd * 3 * n))
        ff = g.new(T.F32, (nd // 2,), rng.uniform(1, 8, nd // 2))
        outs += [g.rope_ext(x, pos, None, nd, int(mode), 4096, base, 1.0, 0.0, 1.0, 32.0, 1.0),
                 g.rope_ext(x, pos, None, nd, int(mode), 4096, base, 0.25, 1.0, 1.0, 32.0, 1.0),
                 g.rope_ext(x, pos, ff, nd, int(mode), 8192, base, 0.125, 0.0, 1.0, 32.0, 1.0)]
    assert_bitexact(g.run(*outs, n_threads=2), *outs)


def test_libm_unary_ops_and_gelu_tables(g, rng):
    """Scalar float functions are glibc's (tanhf differs from the rounded double result in ~5% of
    cases, expf/logf rarely); GELU goes through its F16 table built with tanhf, on every F16 value."""
    grid = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)
    grid = grid[np.isfinite(grid)]
    every = g.new(T.F32, (grid.size,), grid)
    x = g.new(T.F32, (4096,), np.concatenate([rng.standard_normal(4000) * 8, _special(96)]))
    pos = g.new(T.F32, (4096,), rng.uniform(1e-3, 1e3, 4096))
    gate = g.new(T.F32, (grid.size,), rng.standard_normal(grid.size))
    outs = [g.gelu(every), g.glu_split(every, gate, int(GluOp.GEGLU)), g.gelu_quick(every),
            g.unary(x, int(UnaryOp.EXP)), g.sigmoid(x), g.tanh(x), g.elu(x), g.log(pos), g.sin(x), g.cos(x),
            g.softplus(x)]
    assert_bitexact(g.run(*outs, n_threads=2), *outs)


def _fa(g, rng, D, Dv, n_q, n_kv, H, H_kv, S, *, visible=None, full_mask_row=False, kv_type=T.F16):
    q = g.new(T.F32, (D, H, n_q, S), rng.standard_normal(D * H * n_q * S))
    kc = g.new(kv_type, (D, H_kv, n_kv, S), rng.standard_normal(D * H_kv * n_kv * S))
    vc = g.new(kv_type, (Dv, H_kv, n_kv, S), rng.standard_normal(Dv * H_kv * n_kv * S))
    mv = np.where(rng.random((S, 1, n_q, n_kv)) < 0.2, -np.inf, 0.0)
    if visible is not None:        # causal with a padded, never visible tail
        mv[:] = np.where(np.arange(n_kv)[None, :] <= visible - n_q + np.arange(n_q)[:, None], 0.0, -np.inf)
    if full_mask_row:
        mv[..., 0, :] = -np.inf
    m = g.new(T.F16, (n_kv, n_q, 1, S), mv)
    return g.permute(q, 0, 2, 1, 3), g.permute(kc, 0, 2, 1, 3), g.permute(vc, 0, 2, 1, 3), m


def test_flash_attn_f16_cache_is_bitexact_by_default(g, rng):
    """ggml's row kernel for an F16 cache (< 64 queries): F16 dot products in its lane order, expf,
    the V accumulator rounded to F16 at every step; gemma-like prompt/decode, GQA with ALiBi, softcap,
    sinks, two sequences, a head size with a leftover (80 = 64 + 16) and a fully masked row."""
    outs = []
    q, k, v, m = _fa(g, rng, 256, 256, 14, 256, 4, 1, 1, visible=14)
    outs.append(g.flash_attn_ext(q, k, v, m, 1.0, 0.0, 0.0))
    q, k, v, m = _fa(g, rng, 256, 256, 1, 256, 4, 1, 1, visible=20)
    outs.append(g.flash_attn_ext(q, k, v, m, 0.0625, 0.0, 0.0))
    q, k, v, m = _fa(g, rng, 128, 128, 7, 96, 8, 2, 1)
    outs += [g.flash_attn_ext(q, k, v, m, 0.2, 4.0, 0.0), g.flash_attn_ext(q, k, v, m, 0.2, 0.0, 30.0)]
    sunk = g.flash_attn_ext(q, k, v, m, 0.2, 0.0, 0.0)
    g.flash_attn_ext_add_sinks(sunk, g.new(T.F32, (8,), rng.standard_normal(8) * 2))
    outs.append(sunk)
    q, k, v, m = _fa(g, rng, 80, 64, 3, 64, 4, 2, 2, full_mask_row=True)
    outs.append(g.flash_attn_ext(q, k, v, m, 0.125, 0.0, 0.0))
    assert_bitexact(g.run(*outs, n_threads=2), *outs)


def test_flash_attn_split_kv_decode_follows_thread_count(g, rng, monkeypatch):
    """One query over >= 512 entries: ggml splits the KV range over its threads and merges the partial
    softmaxes; ggml_threads() (here 3, as ggml runs) picks the same chunks."""
    from hybridllm.backends.numpy_ops import attention
    monkeypatch.setattr(attention, "GGML_THREADS", 3)
    q, k, v, m = _fa(g, rng, 64, 64, 1, 700, 4, 1, 1, visible=650)
    out = g.flash_attn_ext(q, k, v, m, 0.125, 0.0, 0.0)
    g.flash_attn_ext_add_sinks(out, g.new(T.F32, (4,), rng.standard_normal(4)))
    assert_bitexact(g.run(out, n_threads=3), out)


def test_flash_attn_tiled_kernel_for_long_prompts(g, rng):
    """>= 64 queries: ggml's tiled kernel (F16 and F32 caches), with a causal mask over a partly visible
    cache, ALiBi, softcap, sinks, two sequences, no mask, odd head sizes and a fully masked row."""
    outs = []
    q, k, v, m = _fa(g, rng, 128, 128, 70, 300, 8, 2, 1, visible=150)
    outs.append(g.flash_attn_ext(q, k, v, m, 0.125, 0.0, 0.0))
    q, k, v, m = _fa(g, rng, 64, 64, 64, 128, 4, 4, 2, full_mask_row=True)
    outs += [g.flash_attn_ext(q, k, v, m, 0.2, 4.0, 0.0), g.flash_attn_ext(q, k, v, m, 0.2, 0.0, 20.0),
             g.flash_attn_ext(q, k, v, None, 0.2, 0.0, 0.0)]
    sunk = g.flash_attn_ext(q, k, v, m, 0.2, 0.0, 0.0)
    g.flash_attn_ext_add_sinks(sunk, g.new(T.F32, (4,), rng.standard_normal(4)))
    outs.append(sunk)
    q, k, v, m = _fa(g, rng, 80, 48, 65, 100, 2, 1, 1, kv_type=T.F32)
    outs.append(g.flash_attn_ext(q, k, v, m, 0.3, 0.0, 0.0))
    assert_bitexact(g.run(*outs, n_threads=2), *outs)
