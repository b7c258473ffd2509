"""Launch fusion of the GPU backend (hybridllm/backends/cupy_ops/fusion.py) on llama.cpp-shaped decode graphs:
a qwen3 decoder layer and a qwen3moe FFN. Each graph runs fused and unfused (every node flagged OUTPUT, which
forbids skipping any write) on the same device, which must agree closely, and against the numpy backend
(ggml's CPU numerics: its own activation rounding, hence the looser tolerance). Also SUM_ROWS, MEAN,
ARGSORT and TOP_K, which the MoE router needs."""
from __future__ import annotations

import numpy as np
import pytest

from harness import Graph, assert_close, run_both
from hybridllm.ggml.tensor import pack_params
from hybridllm.ggml.types import GGMLOp, GGMLType, GluOp, RopeMode, TensorFlag
from hybridllm.quants.blocks import random_blocks

F32, F16, I32, I64 = GGMLType.F32, GGMLType.F16, GGMLType.I32, GGMLType.I64


def unfuse(nodes) -> None:
    for n in nodes:
        n.flags |= TensorFlag.OUTPUT


def run_twice(gpu, build):
    """(fused outputs, unfused outputs, fused launch count) of one graph on the device."""
    res, counts = [], []
    for fused in (True, False):
        g = Graph(gpu)
        outs = build(g)
        if not fused:
            unfuse(g.nodes)
        plan = gpu.prepare(g.nodes)
        plan.run()
        plan.run()  # a replay (the captured graph on CUDA) gives the same
        res.append([g.read(t).astype(np.float64) for t in outs])
        counts.append(len(plan.launches))
        for b in g.buffers:
            gpu.free_buffer(b)
    return res[0], res[1], counts


def decoder_layer(T: int, rng):
    E, H, Hkv, D, FF, n_ctx, n_past = 256, 4, 2, 64, 512, 32, 7
    n_kv = 32
    w = {"q": (GGMLType.Q4_K, E, H * D), "k": (GGMLType.Q4_K, E, Hkv * D), "v": (GGMLType.Q6_K, E, Hkv * D),
         "o": (GGMLType.Q8_0, H * D, E), "gate": (GGMLType.Q5_K, E, FF), "up": (GGMLType.Q5_K, E, FF),
         "down": (GGMLType.Q6_K, FF, E)}
    raw = {k: random_blocks(t, rows, cols, rng, scale=0.05) for k, (t, cols, rows) in w.items()}
    norms = {k: (1 + 0.1 * rng.standard_normal(n)).astype(np.float32) for k, n in
             (("attn", E), ("ffn", E), ("q", D), ("k", D))}
    x = rng.standard_normal((T, E)).astype(np.float32)
    kc = (rng.standard_normal((n_ctx, Hkv * D)) * 0.5).astype(np.float16)
    vc = (rng.standard_normal((n_ctx, Hkv * D)) * 0.5).astype(np.float16)
    pos = np.arange(n_past, n_past + T, dtype=np.int32)
    mask = np.zeros((T, n_kv), np.float16)
    for i in range(T):
        mask[i, n_past + i + 1:] = -np.inf
    rope = pack_params(0, D, int(RopeMode.NEOX), 0, 4096, 1e6, 1.0, 0.0, 1.0, 32.0, 1.0, 0, 0, 0, 0, 0)

    def build(g: Graph):
        tx = g.tensor(F32, (E, T), x)
        W = {k: g.tensor(t, (cols, rows), raw[k]) for k, (t, cols, rows) in w.items()}
        N = {k: g.tensor(F32, (v.size,), v) for k, v in norms.items()}
        tp = g.tensor(I32, (T,), pos)
        tidx = g.tensor(I64, (T,), pos.astype(np.int64))
        tm = g.tensor(F16, (n_kv, T), mask)
        tkc = g.tensor(F16, (Hkv * D, n_ctx), kc)
        tvc = g.tensor(F16, (Hkv * D, n_ctx), vc)
        h = g.node(GGMLOp.MUL, F32, (E, T), [g.node(GGMLOp.RMS_NORM, F32, (E, T), [tx], (1e-6,)), N["attn"]])
        q = g.node(GGMLOp.MUL_MAT, F32, (H * D, T), [W["q"], h])
        q3 = g.view(q, (D, H, T, 1), (4, 4 * D, 4 * D * H, 4 * D * H * T), op=GGMLOp.RESHAPE)
        q3 = g.node(GGMLOp.MUL, F32, (D, H, T), [g.node(GGMLOp.RMS_NORM, F32, (D, H, T), [q3], (1e-6,)), N["q"]])
        qr = g.node(GGMLOp.ROPE, F32, (D, H, T), [q3, tp], params=rope)
        k = g.node(GGMLOp.MUL_MAT, F32, (Hkv * D, T), [W["k"], h])
        k3 = g.view(k, (D, Hkv, T, 1), (4, 4 * D, 4 * D * Hkv, 4 * D * Hkv * T), op=GGMLOp.RESHAPE)
        k3 = g.node(GGMLOp.MUL, F32, (D, Hkv, T), [g.node(GGMLOp.RMS_NORM, F32, (D, Hkv, T), [k3], (1e-6,)),
                                                   N["k"]])
        kr = g.node(GGMLOp.ROPE, F32, (D, Hkv, T), [k3, tp], params=rope)
        kr2 = g.view(kr, (Hkv * D, T, 1, 1), (4, 4 * Hkv * D, 4 * Hkv * D * T, 4 * Hkv * D * T), op=GGMLOp.RESHAPE)
        g.node(GGMLOp.SET_ROWS, F16, (Hkv * D, n_ctx), [kr2, tidx, tkc], into=tkc)
        v = g.node(GGMLOp.MUL_MAT, F32, (Hkv * D, T), [W["v"], h])
        g.node(GGMLOp.SET_ROWS, F16, (Hkv * D, n_ctx), [v, tidx, tvc], into=tvc)
        vq = g.view(qr, (D, T, H, 1), (4, 4 * D * H, 4 * D, 4 * D * H * T), op=GGMLOp.PERMUTE)
        vk = g.view(tkc, (D, n_kv, Hkv, 1), (2, 2 * D * Hkv, 2 * D, 2 * D * Hkv * n_ctx), op=GGMLOp.PERMUTE)
        vv = g.view(tvc, (D, n_kv, Hkv, 1), (2, 2 * D * Hkv, 2 * D, 2 * D * Hkv * n_ctx), op=GGMLOp.PERMUTE)
        att = g.node(GGMLOp.FLASH_ATTN_EXT, F32, (D, H, T, 1), [vq, vk, vv, tm, None],
                     params=(float(1 / np.sqrt(D)), 0.0, 0.0, 10, 0))
        att2 = g.view(att, (H * D, T, 1, 1), (4, 4 * H * D, 4 * H * D * T, 4 * H * D * T), op=GGMLOp.RESHAPE)
        r = g.node(GGMLOp.ADD, F32, (E, T), [g.node(GGMLOp.MUL_MAT, F32, (E, T), [W["o"], att2]), tx])
        h2 = g.node(GGMLOp.MUL, F32, (E, T), [g.node(GGMLOp.RMS_NORM, F32, (E, T), [r], (1e-6,)), N["ffn"]])
        up = g.node(GGMLOp.MUL_MAT, F32, (FF, T), [W["up"], h2])
        gate = g.node(GGMLOp.MUL_MAT, F32, (FF, T), [W["gate"], h2])
        act = g.node(GGMLOp.GLU, F32, (FF, T), [gate, up], params=(int(GluOp.SWIGLU), 0, 0.0, 0.0))
        out = g.node(GGMLOp.ADD, F32, (E, T), [g.node(GGMLOp.MUL_MAT, F32, (E, T), [W["down"], act]), r])
        return [out, tkc, tvc]

    return build


@pytest.mark.parametrize("T", [1, 2])
def test_decoder_layer(gpu, T, rng):
    build = decoder_layer(T, rng)
    fused, unfused, (n_fused, n_unfused) = run_twice(gpu, build)
    names = ["layer output", "K cache", "V cache"]
    for a, b, what in zip(fused, unfused, names):
        assert_close(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max(), what=f"{what}: fused vs unfused")
    # attn norm(+q8), Q/K matvec, V matvec + cache store, Q norm-rope and K norm-rope-store (one launch),
    # FA(+q8), O + residual, ffn norm(+q8), gate/up/GLU(+q8), down + residual; with 2 columns GLU and the V
    # store stay separate (gate/up share one matvec, then GLU, the q8 copy of its output, and the V cache
    # store are launches)
    assert n_fused == (9 if T == 1 else 12), n_fused
    assert n_unfused > n_fused + 8
    if T > 1:
        return  # the numpy comparison of one column covers the numerics (and is slow on the emulator)
    for (got, ref), what in zip(run_both(gpu, build), names):
        got, ref = got.astype(np.float64), ref.astype(np.float64)
        assert_close(got, ref, rtol=3e-2, atol=3e-2 * np.abs(ref).max(), what=f"{what} vs numpy backend")


def moe_ffn(T: int, rng, qtype=GGMLType.Q4_K, n_expert: int = 8, n_used: int = 4):
    E, FF = 256, 64
    gate_inp = (rng.standard_normal((n_expert, E)) * 0.3).astype(np.float32)
    up_w = random_blocks(qtype, n_expert * FF, E, rng, scale=0.05)
    gate_w = random_blocks(qtype, n_expert * FF, E, rng, scale=0.05)
    down_w = random_blocks(GGMLType.Q6_K if FF % 256 == 0 else GGMLType.Q8_0, n_expert * E, FF, rng, scale=0.05)
    down_t = GGMLType.Q6_K if FF % 256 == 0 else GGMLType.Q8_0
    x = rng.standard_normal((T, E)).astype(np.float32)
    res = rng.standard_normal((T, E)).astype(np.float32)

    def build(g: Graph):
        cur = g.tensor(F32, (E, T), x)
        tres = g.tensor(F32, (E, T), res)
        tgi = g.tensor(F32, (E, n_expert), gate_inp)
        tup = g.tensor(qtype, (E, FF, n_expert), up_w)
        tgate = g.tensor(qtype, (E, FF, n_expert), gate_w)
        tdown = g.tensor(down_t, (FF, E, n_expert), down_w)
        logits = g.node(GGMLOp.MUL_MAT, F32, (n_expert, T), [tgi, cur])
        probs = g.node(GGMLOp.SOFT_MAX, F32, (n_expert, T), [logits], params=(1.0, 0.0))
        order = g.node(GGMLOp.ARGSORT, I32, (n_expert, T), [probs], params=(1,))
        topk = g.view(order, (n_used, T, 1, 1), (4, order.nb[1], order.nb[1] * T, order.nb[1] * T))
        probs3 = g.view(probs, (1, n_expert, T, 1), (4, 4, 4 * n_expert, 4 * n_expert * T), op=GGMLOp.RESHAPE)
        wts = g.node(GGMLOp.GET_ROWS, F32, (1, n_used, T), [probs3, topk])
        w2 = g.view(wts, (n_used, T, 1, 1), (4, 4 * n_used, 4 * n_used * T, 4 * n_used * T), op=GGMLOp.RESHAPE)
        wsum = g.node(GGMLOp.SUM_ROWS, F32, (1, T), [w2])
        wsum = g.node(GGMLOp.CLAMP, F32, (1, T), [wsum], params=(6.103515625e-5, float("inf")))
        wn = g.node(GGMLOp.DIV, F32, (n_used, T), [w2, wsum])
        w3 = g.view(wn, (1, n_used, T, 1), (4, 4, 4 * n_used, 4 * n_used * T), op=GGMLOp.RESHAPE)
        cur3 = g.view(cur, (E, 1, T, 1), (4, 4 * E, 4 * E, 4 * E * T), op=GGMLOp.RESHAPE)
        up = g.node(GGMLOp.MUL_MAT_ID, F32, (FF, n_used, T), [tup, cur3, topk])
        gate = g.node(GGMLOp.MUL_MAT_ID, F32, (FF, n_used, T), [tgate, cur3, topk])
        par = g.node(GGMLOp.GLU, F32, (FF, n_used, T), [gate, up], params=(int(GluOp.SWIGLU), 0, 0.0, 0.0))
        ex = g.node(GGMLOp.MUL_MAT_ID, F32, (E, n_used, T), [tdown, par, topk])
        ex = g.node(GGMLOp.MUL, F32, (E, n_used, T), [ex, w3])
        views = [g.view(ex, (E, T, 1, 1), (4, ex.nb[2], ex.nb[2] * T, ex.nb[2] * T), offset=e * ex.nb[1])
                 for e in range(n_used)]
        acc = views[0]
        for e in range(1, n_used):
            acc = g.node(GGMLOp.ADD, F32, (E, T), [acc, views[e]])
        out = g.node(GGMLOp.ADD, F32, (E, T), [acc, tres])
        return [out, order]

    return build


@pytest.mark.parametrize("T", [1, 3, 12])
def test_moe_ffn(gpu, T, rng):
    """Decode batches fuse; 12 tokens take the grouped tensor-core path (where there is one)."""
    build = moe_ffn(T, rng)
    if T <= 8:
        fused, unfused, (n_fused, _) = run_twice(gpu, build)
        np.testing.assert_array_equal(fused[1], unfused[1])
        assert_close(fused[0], unfused[0], rtol=1e-4, atol=1e-4 * np.abs(unfused[0]).max(),
                     what="moe fused vs unfused")
        # router matvec, router (softmax, argsort, get_rows, sum_rows, clamp, div), q8 of the input,
        # gate/up/GLU(+q8), down experts * weights summed + residual; one token: matvec and router together
        assert n_fused == (4 if T == 1 else 5), n_fused
    else:
        from test_matmul import tensor_cores

        g = Graph(gpu)
        build(g)
        # tensor cores: f16 copy of the input, router matmul, fused router, routing lists, gate, up, GLU,
        # f16 copy of the GLU output, down, weighted sum +
        # residual; else the decode path (per-pair q8 matvecs, fused) at any size
        assert len(gpu.prepare(g.nodes).launches) == (10 if tensor_cores(gpu) else 5)
    (out, out_ref), (order, order_ref) = run_both(gpu, build)
    np.testing.assert_array_equal(order, order_ref)
    assert_close(out, out_ref, rtol=3e-2, atol=3e-2 * np.abs(out_ref).max(), what="moe vs numpy backend")


def test_moe_ffn_more_slots_than_a_chunk(gpu, rng):
    """10 experts per token: the fused expert sum loads its experts 8 at a time (kernels/mmvq.cu ID_CHUNK)."""
    build = moe_ffn(1, rng, n_expert=12, n_used=10)
    fused, unfused, (n_fused, _) = run_twice(gpu, build)
    np.testing.assert_array_equal(fused[1], unfused[1])
    assert_close(fused[0], unfused[0], rtol=1e-4, atol=1e-4 * np.abs(unfused[0]).max(), what="fused vs unfused")
    assert n_fused == 4, n_fused
    (out, out_ref), _ = run_both(gpu, build)
    assert_close(out, out_ref, rtol=3e-2, atol=3e-2 * np.abs(out_ref).max(), what="moe vs numpy backend")


@pytest.mark.parametrize("op", [GGMLOp.SUM_ROWS, GGMLOp.MEAN])
def test_sum_rows(gpu, op, rng):
    x = rng.standard_normal((2, 3, 300)).astype(np.float32)

    def build(g):
        t = g.tensor(F32, (300, 3, 2), x)
        return [g.node(op, F32, (1, 3, 2), [t])]

    [(got, ref)] = run_both(gpu, build)
    exact = x.astype(np.float64).sum(-1, keepdims=True) / (300 if op == GGMLOp.MEAN else 1)
    assert_close(got[0], exact, rtol=1e-5, atol=1e-5, what=op.name)
    assert_close(got, ref, rtol=1e-5, atol=1e-5, what=f"{op.name} vs numpy backend")


@pytest.mark.parametrize("desc", [0, 1])
def test_argsort(gpu, desc, rng):
    x = rng.standard_normal((3, 130)).astype(np.float32)
    x[0, 5:9] = 0.5      # ties keep index order
    x[1, 7] = np.nan     # NaN sorts last either way

    def build(g):
        t = g.tensor(F32, (130, 3), x)
        return [g.node(GGMLOp.ARGSORT, I32, (130, 3), [t], params=(desc,))]

    [(got, ref)] = run_both(gpu, build)
    for r in range(3):
        row = x[r]
        key = np.where(np.isnan(row), np.inf, -row if desc else row)
        np.testing.assert_array_equal(got[0, 0, r], np.argsort(key, kind="stable"))
    np.testing.assert_array_equal(got[0, 0, 0], ref[0, 0, 0])


def test_top_k(gpu, rng):
    x = rng.standard_normal((4, 64)).astype(np.float32)

    def build(g):
        t = g.tensor(F32, (64, 4), x)
        return [g.node(GGMLOp.TOP_K, I32, (5, 4), [t])]

    [(got, ref)] = run_both(gpu, build)
    np.testing.assert_array_equal(got[0, 0], np.argsort(-x, axis=1, kind="stable")[:, :5])
    np.testing.assert_array_equal(np.sort(got, axis=-1), np.sort(ref, axis=-1))  # ggml fixes no order


def test_fused_io_must_not_overlap():
    """A fused launch whose output took the memory of an input another member read (what ggml's allocator
    does once that member was the input's last reader) is refused; an output on exactly the bytes of an input
    its own member reads (the residual epilogue), or any in-place row of a row-wise kernel, is allowed."""
    from hybridllm.backends.cupy_ops.fusion import Group, _disjoint_io
    from hybridllm.ggml.tensor import Tensor

    buf = object()

    def at(offset: int, n: int) -> Tensor:
        t = Tensor(F32, (n,))
        t.buffer, t.offset = buf, offset  # type: ignore[assignment]
        return t

    ids, down, out, res = at(0, 8), Tensor(F32, (8,)), at(4, 64), at(4, 64)
    mm = Tensor(F32, (8,))
    build = lambda c: []  # noqa: E731
    # MoE sum: the output overlaps the expert ids read by the down matmul (another member)
    assert not _disjoint_io(Group([mm, down], down, build, [(mm, [ids], []), (down, [res], [out])]))
    # the same output on the residual's exact bytes, read by its own member: fine
    assert _disjoint_io(Group([mm, down], down, build, [(mm, [at(512, 8)], []), (down, [res], [out])]))
    # partial overlap with its own member's input: refused
    assert not _disjoint_io(Group([mm, down], down, build, [(mm, [], []), (down, [at(8, 64)], [out])]))
    # row-wise (norm): the output on exactly the input of another member is fine, a shifted one is not
    x = at(4, 64)
    assert _disjoint_io(Group([mm, down], down, build, [(mm, [x], []), (down, [], [out])], rowwise=True))
    assert not _disjoint_io(Group([mm, down], down, build, [(mm, [at(0, 64)], []), (down, [], [out])],
                                  rowwise=True))
    # two outputs of one launch may not overlap
    assert not _disjoint_io(Group([mm, down], down, build, [(mm, [], [at(0, 8)]), (down, [], [out])]))


def test_norm_rope_pairs_only_when_independent(gpu, rng):
    """Two norm-rope chains in a row share one launch unless the second reads what the first writes."""
    D, H, T = 64, 3, 2
    x = rng.standard_normal((T, H, D)).astype(np.float32)
    wn = (1 + 0.1 * rng.standard_normal(D)).astype(np.float32)
    pos = np.array([5, 9], dtype=np.int32)
    rope = pack_params(0, D, int(RopeMode.NEOX), 0, 4096, 1e6, 1.0, 0.0, 1.0, 32.0, 1.0, 0, 0, 0, 0, 0)

    def chain(g: Graph, src, tw, tp):
        m = g.node(GGMLOp.MUL, F32, (D, H, T), [g.node(GGMLOp.RMS_NORM, F32, (D, H, T), [src], (1e-6,)), tw])
        return g.node(GGMLOp.ROPE, F32, (D, H, T), [m, tp], params=rope)

    def build(dependent: bool):
        def b(g: Graph):
            tx, tw, tp = g.tensor(F32, (D, H, T), x), g.tensor(F32, (D,), wn), g.tensor(I32, (T,), pos)
            r1 = chain(g, tx, tw, tp)
            r2 = chain(g, r1 if dependent else tx, tw, tp)
            return [r1, r2] if not dependent else [r2]
        return b

    for dependent, n_launches in ((False, 1), (True, 2)):
        fused, unfused, (n_fused, _) = run_twice(gpu, build(dependent))
        assert n_fused == n_launches, (dependent, n_fused)
        for a, b in zip(fused, unfused):
            assert_close(a, b, rtol=1e-5, atol=1e-5, what=f"dependent={dependent}")
