"""Whole graphs against real ggml: a gemma-3-like decoder layer (without its matmuls) with in-place KV
cache writes, permuted cache views and flash attention, computed and then recomputed with new inputs."""
from __future__ import annotations

import numpy as np

from hybridllm.ggml.types import GGMLType as T
from hybridllm.ggml.types import GluOp, RopeMode

E, H, HKV, HD, FF, NCTX = 640, 4, 1, 256, 2048, 512


def _layer(g, rng, n_tok):
    x = g.new(T.F32, (E, n_tok), rng.standard_normal(E * n_tok))
    w = g.new(T.F32, (HD,), rng.standard_normal(HD))
    qraw = g.new(T.F32, (HD, H, n_tok), rng.standard_normal(HD * H * n_tok))
    kraw = g.new(T.F32, (HD, HKV, n_tok), rng.standard_normal(HD * HKV * n_tok))
    vraw = g.new(T.F32, (HD * HKV, n_tok), rng.standard_normal(HD * HKV * n_tok))
    gate = g.new(T.F32, (FF, n_tok), rng.standard_normal(FF * n_tok))
    up = g.new(T.F32, (FF, n_tok), rng.standard_normal(FF * n_tok))
    pos = g.new(T.I32, (n_tok,), np.arange(300, 300 + n_tok))
    kidx = g.new(T.I64, (n_tok,), np.arange(300, 300 + n_tok))
    kc = g.new(T.F16, (HD * HKV, NCTX), rng.standard_normal(HD * HKV * NCTX))
    vc = g.new(T.F16, (HD * HKV, NCTX), rng.standard_normal(HD * HKV * NCTX))
    mask = g.new(T.F16, (NCTX, n_tok), np.where(np.arange(NCTX)[None, :] <= 300 + np.arange(n_tok)[:, None], 0, -np.inf))
    neox = int(RopeMode.NEOX)
    q = g.rope_ext(g.mul(g.rms_norm(qraw, 1e-6), w), pos, None, HD, neox, 32768, 1e6, 1.0, 0.0, 1.0, 32.0, 1.0)
    k = g.rope_ext(g.mul(g.rms_norm(kraw, 1e-6), w), pos, None, HD, neox, 32768, 1e6, 1.0, 0.0, 1.0, 32.0, 1.0)
    kw = g.set_rows(kc, g.reshape_4d(k, HD * HKV, n_tok, 1, 1), kidx)
    vw = g.set_rows(vc, vraw, kidx)
    kview = g.view_4d(kc, HD, HKV, NCTX, 1, HD * 2, HD * HKV * 2, HD * HKV * 2 * NCTX, 0)
    vview = g.view_4d(vc, HD, HKV, NCTX, 1, HD * 2, HD * HKV * 2, HD * HKV * 2 * NCTX, 0)
    attn = g.flash_attn_ext(g.permute(g.scale(q, 0.0625), 0, 2, 1, 3), g.permute(kview, 0, 2, 1, 3),
                            g.permute(vview, 0, 2, 1, 3), mask, 1.0, 0.0, 0.0)
    r1 = g.add(g.view_2d(g.reshape_4d(attn, HD * H, n_tok, 1, 1), E, n_tok, HD * H * 4, 0), x)
    ffn = g.glu_split(gate, up, int(GluOp.GEGLU))
    out = g.add(g.view_2d(ffn, E, n_tok, FF * 4, 0), g.rms_norm(r1, 1e-6))
    return (kw, vw, out), (q, k, kw, vw, ffn), (x, qraw, kraw, vraw, pos)


def test_decoder_layer_and_recompute(g, rng):
    outs, exact, (x, qraw, kraw, vraw, pos) = _layer(g, rng, 2)
    res = g.run(*outs)
    res.assert_close(rtol=3e-3, atol=3e-3)      # ggml's FA keeps an F16 accumulator ...
    res.assert_close(rtol=1e-6, atol=1e-6, only=exact)   # ... everything before it agrees to float rounding
    # GRAPH_RECOMPUTE: new inputs (and new positions: the rope tables must follow), same plan
    res.set_input(pos, np.array([301, 302]))
    for t in (x, qraw, kraw, vraw):
        res.set_input(t, rng.standard_normal(int(np.prod(t.ne))))
    res.rerun()
    res.assert_close(rtol=3e-3, atol=3e-3)
    res.assert_close(rtol=1e-6, atol=1e-6, only=exact)
