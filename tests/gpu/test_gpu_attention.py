"""FLASH_ATTN_EXT on the GPU backend: decode and prefill shapes over permuted F16 KV-cache views, GQA,
masks, softcap, ALiBi and sinks; against float64 attention (the kernel keeps f32 throughout) and the
numpy backend (which, like ggml's CPU, rounds Q and the V accumulator to f16: looser tolerance)."""
from __future__ import annotations

import numpy as np
import pytest

from harness import assert_close, run_both
from hybridllm.ggml.types import GGMLOp, GGMLType

F32, F16 = GGMLType.F32, GGMLType.F16


def exact_attention(q, k, v, mask, scale, softcap, slopes, sinks):
    """q (S, n_q, H, D), k/v (S, n_kv, Hkv, D) float64 -> (S, n_q, H, Dv)."""
    S, n_q, H, _ = q.shape
    hk, hv = H // k.shape[2], H // v.shape[2]
    out = np.zeros((S, n_q, H, v.shape[3]))
    for s in range(S):
        for h in range(H):
            sc = q[s, :, h] @ k[s, :, h // hk].T * scale
            if softcap:
                sc = softcap * np.tanh(sc)
            if mask is not None:
                sc = sc + slopes[h] * mask[: n_q, : k.shape[1]]
            mx = sc.max(axis=1, keepdims=True)
            if sinks is not None:
                mx = np.maximum(mx, sinks[h])
            e = np.exp(sc - mx)
            den = e.sum(axis=1, keepdims=True) + (np.exp(sinks[h] - mx) if sinks is not None else 0)
            out[s, :, h] = (e / den) @ v[s, :, h // hv]
    return out


CASES = {
    "decode": dict(n_q=1, n_kv=70, H=4, Hkv=2, D=64),
    "prefill": dict(n_q=7, n_kv=40, H=2, Hkv=2, D=32),
    "softcap": dict(n_q=3, n_kv=33, H=2, Hkv=1, D=32, softcap=30.0),
    "alibi": dict(n_q=2, n_kv=20, H=4, Hkv=4, D=32, max_bias=8.0),
    "sinks": dict(n_q=2, n_kv=20, H=2, Hkv=1, D=32, sinks=True),
    "nomask": dict(n_q=2, n_kv=17, H=2, Hkv=2, D=40, mask=False),
    "head256": dict(n_q=1, n_kv=9, H=1, Hkv=1, D=256),
    "head512": dict(n_q=1, n_kv=5, H=1, Hkv=1, D=320),
    "f32-cache": dict(n_q=2, n_kv=37, H=2, Hkv=1, D=24, kv=F32),
    "long": dict(n_q=1, n_kv=300, H=2, Hkv=1, D=16),
    # several query blocks of the prefill kernel (8 queries each; the last partial), head 128: vector V loads
    "prefill-blocks": dict(n_q=19, n_kv=40, H=2, Hkv=1, D=128),
    "decode-128": dict(n_q=1, n_kv=70, H=2, Hkv=1, D=128),
    "prefill-head256": dict(n_q=6, n_kv=20, H=1, Hkv=1, D=160),
    # the split decode kernel (k_fad_*): GQA groups of 8 heads per block, several tiles per split, extras
    "decode-gqa8-sinks": dict(n_q=1, n_kv=100, H=16, Hkv=2, D=128, sinks=True),
    "decode-gqa3": dict(n_q=1, n_kv=45, H=6, Hkv=2, D=64),
    "decode-softcap-alibi": dict(n_q=1, n_kv=50, H=4, Hkv=4, D=64, softcap=30.0, max_bias=8.0),
    "decode-multitile": dict(n_q=1, n_kv=2100, H=2, Hkv=1, D=32),
    "decode-head256": dict(n_q=1, n_kv=40, H=2, Hkv=1, D=256),
    "decode-nomask": dict(n_q=1, n_kv=35, H=2, Hkv=2, D=64, mask=False),
    # the one-block-per-head decode kernel, still used for other caches and head sizes
    "decode-block": dict(n_q=1, n_kv=70, H=4, Hkv=2, D=64, env="block"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_flash_attn(gpu, case, rng, monkeypatch):
    c = CASES[case]
    if "env" in c:
        monkeypatch.setenv("HYBRIDLLM_FA_DECODE", c["env"])
    n_q, n_kv, H, Hkv, D = c["n_q"], c["n_kv"], c["H"], c["Hkv"], c["D"]
    softcap, max_bias = c.get("softcap", 0.0), c.get("max_bias", 0.0)
    n_ctx = n_kv + 5  # cache longer than the attended window
    q = rng.standard_normal((n_q, H, D)).astype(np.float32)  # stored (D, H, n_q): a projection's layout
    kv, kdt = c.get("kv", F16), (np.float16 if c.get("kv", F16) == F16 else np.float32)
    es = np.dtype(kdt).itemsize
    kc = rng.standard_normal((n_ctx, Hkv, D)).astype(kdt)
    vc = rng.standard_normal((n_ctx, Hkv, D)).astype(kdt)
    mask = np.zeros((n_q + 3, n_kv), dtype=np.float32)
    for i in range(n_q):  # causal over the last n_q positions, plus one hole
        mask[i, n_kv - n_q + i + 1:] = -np.inf
        mask[i, 3] = -np.inf
    sinks = rng.standard_normal(H).astype(np.float32)
    scale = 1.0 / np.sqrt(D)
    use_mask, use_sinks = c.get("mask", True), c.get("sinks", False)

    def build(g):
        tq = g.tensor(F32, (D, H, n_q), q)
        tk = g.tensor(kv, (D, Hkv, n_ctx), kc)
        tv = g.tensor(kv, (D, Hkv, n_ctx), vc)
        # permute(0, 2, 1, 3) views: (D, tokens, heads)
        vq = g.view(tq, (D, n_q, H, 1), (4, 4 * D * H, 4 * D, 4 * D * H * n_q), op=GGMLOp.PERMUTE)
        vk = g.view(tk, (D, n_kv, Hkv, 1), (es, es * D * Hkv, es * D, es * D * Hkv * n_ctx), op=GGMLOp.PERMUTE)
        vv = g.view(tv, (D, n_kv, Hkv, 1), (es, es * D * Hkv, es * D, es * D * Hkv * n_ctx), op=GGMLOp.PERMUTE)
        tm = g.tensor(F16, (n_kv, n_q + 3), mask.astype(np.float16)) if use_mask else None
        ts = g.tensor(F32, (H,), sinks) if use_sinks else None
        return [g.node(GGMLOp.FLASH_ATTN_EXT, F32, (D, H, n_q, 1), [vq, vk, vv, tm, ts],
                       params=(float(scale), float(max_bias), float(softcap), 10, 0))]

    # decode runs twice: the split kernel's last block must leave its counters ready for the next run
    [(got, ref)] = run_both(gpu, build, runs=2 if n_q == 1 else 1)
    from hybridllm.backends.cupy_ops.norm import alibi

    m0, m1, h2 = alibi(H, max_bias)
    slopes = [1.0 if max_bias <= 0 else (m0 ** (h + 1) if h < h2 else m1 ** (2 * (h - h2) + 1)) for h in range(H)]
    exact = exact_attention(q.astype(np.float64)[None], kc[:n_kv].astype(np.float64)[None],
                            vc[:n_kv].astype(np.float64)[None], mask.astype(np.float64) if use_mask else None,
                            scale / softcap if softcap else scale, softcap, slopes,
                            sinks.astype(np.float64) if use_sinks else None)
    assert_close(got, exact[:, :, :, :].reshape(got.shape), rtol=1e-4, atol=1e-5, what=f"{case} vs exact")
    assert_close(got, ref, rtol=2e-2, atol=1e-2, what=f"{case} vs numpy backend")
