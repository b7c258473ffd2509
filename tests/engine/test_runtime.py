"""Allocation, KV cache and runner behaviour: memory reuse without overlap, masks, the SWA ring, graph reuse,
ubatch splitting, context limits."""
from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest

from hybridllm.backends.numpy_backend import NumpyBackend
from hybridllm.engine.alloc import plan_graph
from hybridllm.engine.kv_cache import ContextOverflow, KVCache, LayerKV
from hybridllm.engine.runner import load
from hybridllm.ggml.types import GGMLType, TensorFlag
from hybridllm.models.blocks import GraphContext
from hybridllm.testing.synth import model_path


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("runtime")


def _lifetimes(graph) -> dict[int, tuple[int, int]]:  # type: ignore[no-untyped-def]
    """[first, last] node index during which each tensor needing compute memory must stay intact."""
    nodes = [n for n in graph.nodes if n.computes]
    life: dict[int, list[int]] = {}
    for t in graph.leafs:
        if t.buffer is None:
            life[id(t)] = [-1, -1]
    for i, n in enumerate(nodes):
        if n.view_src is None and id(n) not in life:
            life[id(n)] = [i, i]
        for s in list(n.src) + [n]:
            if s is not None:
                owner = s.view_src if s.view_src is not None else s
                if id(owner) in life:
                    life[id(owner)][1] = i
    for t in list(graph.leafs) + nodes:
        if id(t) in life and t.flags & TensorFlag.OUTPUT:
            life[id(t)][1] = len(nodes)
    return {k: (v[0], v[1]) for k, v in life.items()}


def test_plan_reuses_memory_without_overlap(root: Path) -> None:
    runner = load(model_path(root, "qwen3moe", "q8_0"), device=NumpyBackend(), n_ctx=512)
    for n_tokens in (1, 37):
        ctx = GraphContext(runner.model, runner.kv, n_tokens, 1, (256,))
        runner.model.build(ctx)
        sizes = {id(t): t.nbytes for t in ctx.graph.tensors()}
        offsets, total = plan_graph(ctx.graph, 64, lambda t: t.nbytes)
        life = _lifetimes(ctx.graph)
        assert set(offsets) == set(life)
        items = sorted(life, key=lambda k: offsets[k])
        for i, a in enumerate(items):       # any two tensors alive at the same time are disjoint
            for b in items[i + 1:]:
                if offsets[b] >= offsets[a] + sizes[a]:
                    break
                la, lb = life[a], life[b]
                assert la[1] < lb[0] or lb[1] < la[0], "live tensors share memory"
        assert total < 0.6 * sum(sizes[k] for k in offsets)  # memory is actually reused
    runner.close()


def test_kq_mask_and_swa_ring() -> None:
    be = NumpyBackend()
    full = KVCache(be, [LayerKV(0, 1, 32, 32)], 256)
    ring = KVCache(be, [LayerKV(0, 1, 32, 32)], 256, n_swa=4)
    pos = np.arange(0, 300)
    for cache in (full, ring):
        with pytest.raises(ContextOverflow) if cache is full else nullcontext():
            cells = cache.cells_for(pos)
            cache.apply(pos, cells)
    assert np.array_equal(ring.cells_for(np.array([255, 256, 299])), [255, 0, 43])
    cur = np.array([297, 298, 299])
    mask = ring.kq_mask(ring.n_kv(), cur)
    cell_pos = ring.pos[:ring.n_kv()]
    for t, p1 in enumerate(cur):
        keep = (cell_pos >= 0) & (cell_pos <= p1) & (p1 - cell_pos < 4)
        assert np.array_equal(mask[t] == 0, keep) and np.all(np.isneginf(mask[t][~keep]))
        assert keep.sum() == 4
    assert mask.dtype == np.float16
    full.apply(np.arange(10), full.cells_for(np.arange(10)))
    assert full.n_kv() == 256
    assert full.seq_rm(5) and full.pos[5] == -1 and full.pos[4] == 4
    assert not ring.seq_rm(45)   # positions 42, 43 (still in 45's window) were overwritten by 298, 299
    assert ring.seq_rm(290) and ring.max_pos() == 289  # 287..289 are intact


def test_graph_reuse_and_ubatch_split(root: Path) -> None:
    path = model_path(root, "llama", "q8_0")
    prompt = list(range(3, 40))
    one = load(path, device=NumpyBackend(), n_ctx=512)
    a = one.decode(prompt, all_logits=True)
    built = one.stats.graphs_built
    for tok in (5, 6, 7, 8):
        one.decode([tok])
    assert one.stats.graphs_built == built + 1  # one decode graph, reused for every step
    split = load(path, device=NumpyBackend(), n_ctx=512, n_ubatch=8)
    b = split.decode(prompt, all_logits=True)
    assert b.shape == a.shape == (len(prompt), one.n_vocab)
    err = np.abs(a - b).max() / np.abs(a).max()
    assert err < 1e-4, err
    one.close()
    split.close()


def test_context_limits_and_rewind(root: Path) -> None:
    runner = load(model_path(root, "llama", "q8_0"), device=NumpyBackend(), n_ctx=256)
    assert runner.n_ctx == 256
    runner.decode(list(range(250)))
    with pytest.raises(ContextOverflow, match="context"):
        runner.decode(list(range(10)))
    assert runner.n_past == 250                     # a refused batch changes nothing
    ref = runner.decode([7])[0].copy()
    assert runner.rewind(250) and runner.n_past == 250
    again = runner.decode([7])[0]
    assert np.array_equal(ref, again)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        runner.decode([runner.n_vocab])
    runner.close()


def test_long_context_iswa(root: Path) -> None:
    """A 32768-token context allocates (full cache for global layers, small ring for SWA layers)."""
    runner = load(model_path(root, "gemma3", "q8_0"), device=NumpyBackend(), n_ctx=32768)
    base, swa = runner.kv.caches
    assert base.size == 32768 and swa.size == 768  # pad(window 8 + ubatch 512)
    assert set(base.layers) == {1} and set(swa.layers) == {0}
    assert base.k[1].type == GGMLType.F16 and base.k[1].ne == (base.layers[1].n_embd_k_gqa, 32768, 1, 1)
    out = runner.decode([1, 2, 3])
    assert out.shape == (1, runner.n_vocab) and np.isfinite(out).all()
    runner.close()


def test_unsupported_op_is_one_line_engine_error(root: Path) -> None:
    from hybridllm.backends.base import Unsupported
    from hybridllm.engine.runner import EngineError

    class NoFlashAttn(NumpyBackend):
        def prepare(self, nodes):  # type: ignore[no-untyped-def]
            if any(n.op.name == "FLASH_ATTN_EXT" for n in nodes):
                raise Unsupported("op FLASH_ATTN_EXT is not implemented on this device")
            return super().prepare(nodes)

    path = model_path(root, "llama", "q8_0")
    runner = load(path, device=NoFlashAttn(), n_ctx=256)
    with pytest.raises(EngineError) as exc:
        runner.decode([1, 2, 3])
    assert "FLASH_ATTN_EXT" in str(exc.value) and "\n" not in str(exc.value)
    ok = load(path, device=NoFlashAttn(), n_ctx=256, flash_attn=False)   # the KQ/softmax path works
    assert np.isfinite(ok.decode([1, 2, 3])).all()
