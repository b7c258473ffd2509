"""The GPU backend as a Backend: buffers, plans replayed through a captured graph, device-side index
errors, and a small transformer block compared with the numpy backend."""
from __future__ import annotations

import numpy as np
import pytest

from harness import Graph, assert_close, run_both
from hybridllm.backends.base import Unsupported
from hybridllm.backends.cupy_backend import ComputeError
from hybridllm.ggml.types import GGMLOp, GGMLType, GluOp, RopeMode
from hybridllm.ggml.tensor import pack_params

F32, F16 = GGMLType.F32, GGMLType.F16


def test_buffers(gpu):
    a, b = gpu.alloc_buffer(1000), gpu.alloc_buffer(64)
    assert a.base % 65536 == 0 and a.base != b.base
    data = bytes(range(256)) * 3
    gpu.set(a, 100, data)
    assert gpu.get(a, 100, len(data)) == data
    gpu.memset(a, 110, 20, 0x1AB)  # value is a byte
    assert gpu.get(a, 108, 24) == data[8:10] + b"\xab" * 20 + data[30:32]
    assert gpu.copy(a, 100, b, 4, 50)
    assert gpu.get(b, 4, 50) == gpu.get(a, 100, 50)
    gpu.clear(b, 7)
    assert gpu.get(b, 0, 64) == b"\x07" * 64
    with pytest.raises(ValueError):
        gpu.get(b, 60, 8)
    free, total = gpu.memory()
    assert 0 < free <= total
    gpu.free_buffer(a)
    gpu.free_buffer(b)
    with pytest.raises(ValueError):
        gpu.get(a, 0, 4)


def test_plan_replay_sees_new_inputs(gpu, rng):
    """Run 1 launches directly, run 2 captures the graph, runs 2..4 replay it: each sees the inputs set
    just before it, like decode steps with new embeddings."""
    g = Graph(gpu)
    x = g.tensor(F32, (64, 3))
    w = g.tensor(F32, (64,), rng.standard_normal(64).astype(np.float32))
    n = g.node(GGMLOp.RMS_NORM, F32, (64, 3), [x], params=(1e-6,))
    m = g.node(GGMLOp.MUL, F32, (64, 3), [n, w])
    y = g.node(GGMLOp.UNARY, F32, (64, 3), [m], params=(10,))  # silu
    plan = gpu.prepare(g.nodes)
    wv = g.read(w)[0, 0, 0].astype(np.float64)
    for step in range(4):
        xv = rng.standard_normal((3, 64)).astype(np.float32) * (step + 1)
        gpu.set(x.buffer, 0, xv.tobytes())
        plan.run()
        got = g.read(y)[0, 0]
        h = xv / np.sqrt((xv.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-6) * wv
        assert_close(got, h / (1 + np.exp(-h)), rtol=1e-5, atol=1e-6, what=f"step {step}")
    assert plan._graph is not None  # replays went through the captured graph (or the emulator's stand-in)


def test_capture_explicitly(gpu, rng):
    g = Graph(gpu)
    a = g.tensor(F32, (10,), np.arange(10, dtype=np.float32))
    y = g.node(GGMLOp.SCALE, F32, (10,), [a], params=(2.0, 1.0))
    plan = gpu.prepare(g.nodes)
    assert plan.capture()
    plan.run()
    np.testing.assert_array_equal(g.read(y)[0, 0, 0], np.arange(10) * 2 + 1)


def test_index_out_of_range_is_a_compute_error(gpu):
    g = Graph(gpu)
    table = g.tensor(F32, (4, 3), np.zeros((3, 4), np.float32))
    idx = g.tensor(GGMLType.I32, (2,), np.array([1, 3], np.int32))
    out = g.node(GGMLOp.GET_ROWS, F32, (4, 2), [table, idx], name="inp_embd")
    gpu.prepare(g.nodes).run()
    with pytest.raises(ComputeError, match="inp_embd"):
        g.read(out)
    gpu.set(idx.buffer, 0, np.array([1, 2], np.int32).tobytes())  # the backend stays usable
    gpu.prepare(g.nodes).run()
    g.read(out)


def test_unsupported_is_named(gpu):
    g = Graph(gpu)
    a = g.tensor(F32, (4,))
    g.node(GGMLOp.CONV_2D, F32, (4,), [a], name="conv")
    with pytest.raises(Unsupported, match="CONV_2D"):
        gpu.prepare(g.nodes)
    g2 = Graph(gpu)
    w = g2.tensor(GGMLType.IQ2_XXS, (256, 2))
    x = g2.tensor(F32, (256, 1))
    g2.node(GGMLOp.MUL_MAT, F32, (2, 1), [w, x], name="mm")
    with pytest.raises(Unsupported, match="iq2_xxs"):
        gpu.prepare(g2.nodes)


def test_transformer_block(gpu, rng):
    """One pre-norm decoder block (qwen3-like: rope neox, GQA flash attention over an F16 cache, SwiGLU)
    for 3 new tokens after 5 cached ones, against the numpy backend."""
    from hybridllm.quants.blocks import random_blocks

    E, H, Hkv, D, FF, n_ctx, n_past, T = 256, 4, 2, 32, 256, 16, 5, 3
    wq = random_blocks(GGMLType.Q8_0, H * D, E, rng)
    wk = random_blocks(GGMLType.Q4_K, Hkv * D, E, rng)
    wv = random_blocks(GGMLType.Q6_K, Hkv * D, E, rng)
    wo = random_blocks(GGMLType.Q5_0, E, H * D, rng)
    wg = random_blocks(GGMLType.Q4_K, FF, E, rng)
    wu = random_blocks(GGMLType.Q4_K, FF, E, rng)
    wd = random_blocks(GGMLType.Q6_K, E, FF, rng)
    norm_w = (1 + 0.1 * rng.standard_normal(E)).astype(np.float32)
    x = rng.standard_normal((T, E)).astype(np.float32)
    kc = (rng.standard_normal((n_ctx, Hkv * D)) * 0.5).astype(np.float16)
    vc = (rng.standard_normal((n_ctx, Hkv * D)) * 0.5).astype(np.float16)
    pos = np.arange(n_past, n_past + T, dtype=np.int32)
    kv_idx = pos.astype(np.int64)
    n_kv = 16
    mask = np.zeros((T, n_kv), np.float32)
    for i in range(T):
        mask[i, n_past + i + 1:] = -np.inf
    rope = pack_params(0, D, int(RopeMode.NEOX), 0, 4096, 1e6, 1.0, 0.0, 1.0, 32.0, 1.0, 0, 0, 0, 0, 0)

    def build(g: Graph):
        tx = g.tensor(F32, (E, T), x)
        tnw = g.tensor(F32, (E,), norm_w)
        tp = g.tensor(GGMLType.I32, (T,), pos)
        tidx = g.tensor(GGMLType.I64, (T,), kv_idx)
        tm = g.tensor(F16, (n_kv, T), mask.astype(np.float16))
        tkc = g.tensor(F16, (Hkv * D, n_ctx), kc)
        tvc = g.tensor(F16, (Hkv * D, n_ctx), vc)
        W = {n: g.tensor(t, sh, raw) for n, t, sh, raw in [
            ("q", GGMLType.Q8_0, (E, H * D), wq), ("k", GGMLType.Q4_K, (E, Hkv * D), wk),
            ("v", GGMLType.Q6_K, (E, Hkv * D), wv), ("o", GGMLType.Q5_0, (H * D, E), wo),
            ("g", GGMLType.Q4_K, (E, FF), wg), ("u", GGMLType.Q4_K, (E, FF), wu),
            ("d", GGMLType.Q6_K, (FF, E), wd)]}
        n = g.node(GGMLOp.RMS_NORM, F32, (E, T), [tx], params=(1e-6,))
        h = g.node(GGMLOp.MUL, F32, (E, T), [n, tnw])
        q = g.node(GGMLOp.MUL_MAT, F32, (H * D, T), [W["q"], h])
        k = g.node(GGMLOp.MUL_MAT, F32, (Hkv * D, T), [W["k"], h])
        v = g.node(GGMLOp.MUL_MAT, F32, (Hkv * D, T), [W["v"], h])
        q3 = g.view(q, (D, H, T, 1), (4, 4 * D, 4 * D * H, 4 * D * H * T), op=GGMLOp.RESHAPE)
        k3 = g.view(k, (D, Hkv, T, 1), (4, 4 * D, 4 * D * Hkv, 4 * D * Hkv * T), op=GGMLOp.RESHAPE)
        qr = g.node(GGMLOp.ROPE, F32, (D, H, T), [q3, tp], params=rope)
        kr = g.node(GGMLOp.ROPE, F32, (D, Hkv, T), [k3, tp], params=rope)
        kr2 = g.view(kr, (Hkv * D, T, 1, 1), (4, 4 * Hkv * D, 4 * Hkv * D * T, 4 * Hkv * D * T), op=GGMLOp.RESHAPE)
        g.node(GGMLOp.SET_ROWS, F16, (Hkv * D, n_ctx), [kr2, tidx, tkc], into=tkc)
        g.node(GGMLOp.SET_ROWS, F16, (Hkv * D, n_ctx), [v, tidx, tvc], into=tvc)
        vq = g.view(qr, (D, T, H, 1), (4, 4 * D * H, 4 * D, 4 * D * H * T), op=GGMLOp.PERMUTE)
        vk = g.view(tkc, (D, n_kv, Hkv, 1), (2, 2 * D * Hkv, 2 * D, 2 * D * Hkv * n_ctx), op=GGMLOp.PERMUTE)
        vv = g.view(tvc, (D, n_kv, Hkv, 1), (2, 2 * D * Hkv, 2 * D, 2 * D * Hkv * n_ctx), op=GGMLOp.PERMUTE)
        att = g.node(GGMLOp.FLASH_ATTN_EXT, F32, (D, H, T, 1), [vq, vk, vv, tm, None],
                     params=(float(1 / np.sqrt(D)), 0.0, 0.0, 10, 0))
        att2 = g.view(att, (H * D, T, 1, 1), (4, 4 * H * D, 4 * H * D * T, 4 * H * D * T), op=GGMLOp.RESHAPE)
        o = g.node(GGMLOp.MUL_MAT, F32, (E, T), [W["o"], att2])
        r = g.node(GGMLOp.ADD, F32, (E, T), [o, tx])
        gate = g.node(GGMLOp.MUL_MAT, F32, (FF, T), [W["g"], r])
        up = g.node(GGMLOp.MUL_MAT, F32, (FF, T), [W["u"], r])
        act = g.node(GGMLOp.GLU, F32, (FF, T), [gate, up], params=(int(GluOp.SWIGLU), 0, 0.0, 0.0))
        down = g.node(GGMLOp.MUL_MAT, F32, (E, T), [W["d"], act])
        out = g.node(GGMLOp.ADD, F32, (E, T), [down, r])
        return [out, tkc]

    (out, out_ref), (cache, cache_ref) = run_both(gpu, build)
    assert_close(out, out_ref, rtol=2e-2, atol=2e-2 * np.abs(out_ref).max(), what="block output")
    assert_close(cache.astype(np.float32), cache_ref.astype(np.float32), rtol=2e-2, atol=2e-2, what="K cache")
