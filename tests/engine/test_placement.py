"""Placement: which layers go where (proportions by hand), the fit check before any upload, and the
costs it works from against what loading really allocates."""
from __future__ import annotations

from pathlib import Path

import pytest

from hybridllm.backends.numpy_backend import NumpyBackend
from hybridllm.engine.gguf_file import GGUFFile
from hybridllm.engine.placement import (
    ModelCosts,
    PlacementError,
    parse_tensor_split,
    place,
    tensor_role,
)
from hybridllm.engine.runner import load
from hybridllm.engine.scheduler import Schedule
from hybridllm.models.blocks import GraphContext
from hybridllm.testing.synth import model_path

MiB = 1 << 20
GiB = 1 << 30


class Dev(NumpyBackend):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name


def costs(n_layer: int = 8, layer: int = 10 * MiB, kv: int = 2 * MiB, io: int = 20 * MiB, shared: int = 0,
          compute: int = 4 * MiB, master: int = 1 * MiB) -> ModelCosts:
    return ModelCosts("m", (layer,) * n_layer, (kv,) * n_layer, io, shared, compute, master)


def where(p, devs) -> list[int]:  # type: ignore[no-untyped-def]
    return [next(i for i, d in enumerate(devs) if d is b) for b in p.layer_backends]


def plenty(n: int) -> list[tuple[int, int]]:
    return [(64 * GiB, 64 * GiB)] * n


@pytest.mark.parametrize("split, want", [
    ([1, 1], [0, 0, 0, 0, 1, 1, 1, 1]),
    ([1, 0], [0] * 8),
    ([0, 1], [1] * 8),
    ([3, 1], [0, 0, 0, 0, 0, 0, 1, 1]),
    ([1, 2, 1], [0, 0, 1, 1, 1, 1, 2, 2]),
    ([1, 0, 1], [0, 0, 0, 0, 2, 2, 2, 2]),
])
def test_tensor_split_proportions(split: list[float], want: list[int]) -> None:
    devs = [Dev(f"d{i}") for i in range(len(split))]
    p = place(costs(), devs, devs[-1], split, memory=plenty(len(devs)))
    assert where(p, devs) == want
    assert p.master is devs[-1]


def test_free_memory_proportions_after_fixed_costs() -> None:
    """Shares follow free memory minus each device's fixed part: the master also keeps the 20 MiB of
    input/output weights and its compute buffer, so with equal free memory it gets fewer layers."""
    a, m = Dev("a"), Dev("m")
    c = costs(n_layer=10, layer=10 * MiB, kv=0, io=40 * MiB, compute=0, master=0)
    # available: a 100 MiB, m 100 - 40 = 60 MiB -> 10 layers split 62.5% / 37.5% of the bytes
    p = place(c, [a, m], m, memory=[(100 * MiB, GiB), (100 * MiB, GiB)])
    assert where(p, [a, m]) == [0] * 6 + [1] * 4
    assert [s.need for s in p.shares] == [60 * MiB, 80 * MiB]
    p = place(c, [a, m], m, memory=[(300 * MiB, GiB), (100 * MiB, GiB)])   # 300 : 60
    assert where(p, [a, m]) == [0] * 8 + [1] * 2


def test_uneven_layers_split_by_bytes() -> None:
    """Big layers weigh more: the cut falls where half of the bytes are, not half of the layers."""
    a, b = Dev("a"), Dev("b")
    c = ModelCosts("m", (30, 10, 10, 10, 10, 10, 10, 10), (0,) * 8, 0, 0, 0, 0)
    p = place(c, [a, b], b, [1, 1], memory=plenty(2))
    assert where(p, [a, b]) == [0, 0, 0, 1, 1, 1, 1, 1]   # 50 of 100 bytes on each side


def test_greedy_when_rounding_overflows() -> None:
    """Proportions would put 3 layers on a device that holds 2: the fill-in-order fallback fits."""
    a, m = Dev("a"), Dev("m")
    c = costs(n_layer=4, layer=10 * MiB, kv=0, io=0, compute=0, master=0)
    p = place(c, [a, m], m, memory=[(19 * MiB, GiB), (31 * MiB, GiB)])   # 38% of 40 MiB: 2 layers
    assert where(p, [a, m]) == [0, 1, 1, 1]
    p = place(c, [a, m], m, memory=[(31 * MiB, GiB), (10 * MiB, GiB)])   # proportions fit as they are
    assert where(p, [a, m]) == [0, 0, 0, 1]


def test_does_not_fit() -> None:
    a, m = Dev("a"), Dev("m")
    with pytest.raises(PlacementError, match=r"m: does not fit: it needs about 121\.0 MiB \(weights 100\.0, KV cache 16\.0, compute ~5\.0\) "
                                             r"but the devices have a 50\.0 MiB, m 50\.0 MiB free"):
        place(costs(), [a, m], m, memory=[(50 * MiB, GiB), (50 * MiB, GiB)])


def test_explicit_split_names_the_full_device() -> None:
    a, m = Dev("worker"), Dev("m")
    with pytest.raises(PlacementError, match=r"--tensor-split 1,0 puts 100\.0 MiB on worker \(layers 0-7\) "
                                             r"but it has 90\.0 MiB free"):
        place(costs(), [a, m], m, [1, 0], memory=[(90 * MiB, GiB), (GiB, GiB)])


@pytest.mark.parametrize("split, msg", [([1], "1 values for 2 devices"), ([0, 0], "positive sum")])
def test_bad_tensor_split(split: list[float], msg: str) -> None:
    a, m = Dev("a"), Dev("m")
    with pytest.raises(PlacementError, match=msg):
        place(costs(), [a, m], m, split, memory=plenty(2))


@pytest.mark.parametrize("text", ["1,x", "-1,2", "0,0", "", "nan,1"])
def test_parse_tensor_split_rejects(text: str) -> None:
    with pytest.raises(PlacementError, match="--tensor-split"):
        parse_tensor_split(text)


def test_tensor_roles_and_where_weights_go() -> None:
    a, m = Dev("a"), Dev("m")
    p = place(costs(n_layer=2, shared=4096), [a, m], m, [1, 1], memory=plenty(2))
    assert tensor_role("blk.12.attn_q.weight") == ("layer", 12)
    assert p.backends_for("blk.0.ffn_up.weight") == [a] and p.backends_for("blk.1.ffn_up.weight") == [m]
    for name in ("token_embd.weight", "output.weight", "output_norm.weight", "output.bias"):
        assert p.backends_for(name) == [m]
    assert set(map(id, p.backends_for("rope_freqs.weight"))) == {id(a), id(m)}
    table = p.describe()
    assert "a " in table and "layers 0 " in table and "m (master)" in table and "layers 1 + input/output" in table


def test_too_big_model_fails_before_any_upload(tmp_path: Path) -> None:
    path = model_path(tmp_path, "llama", "q8_0", n_layer=4)
    worker, master = NumpyBackend(mem_limit=2 * MiB), NumpyBackend(mem_limit=2 * MiB)
    with pytest.raises(PlacementError, match="does not fit"):
        load(path, device=master, rpc=[worker], n_ctx=256)
    assert worker.allocated == 0 and master.allocated == 0


@pytest.mark.parametrize("arch, flash_attn", [("llama", True), ("gemma3", False), ("qwen3moe", False)])
def test_costs_match_what_loading_allocates(tmp_path: Path, arch: str, flash_attn: bool) -> None:
    """Weights and KV bytes per device are what WeightStore and KVCache allocate; the compute estimates
    are at least the compute buffers of the worst graph (a full ubatch over the full context)."""
    path = model_path(tmp_path, arch, "q8_0", n_layer=4)
    worker, master = NumpyBackend(), NumpyBackend()
    n_ctx, n_ubatch = 512, 64
    notes: list[str] = []
    r = load(path, device=master, rpc=[worker], tensor_split=[1, 1], n_ctx=n_ctx, n_ubatch=n_ubatch,
             flash_attn=flash_attn, log=notes.append)
    assert notes and "placement (--tensor-split 1,1)" in notes[0]
    shares = {id(s.backend): s for s in r.model.placement.shares}
    kv_on = {id(b): 0 for b in (worker, master)}
    for cache in r.kv.caches:
        for key, (_, _, n) in cache.layout.items():
            kv_on[key] += n
    for b in (worker, master):
        assert abs(shares[id(b)].weights - r.model.weights.bytes_on(b)) <= 64 * 40   # alignment only
        assert shares[id(b)].kv == kv_on[id(b)]
    with GGUFFile(path) as f:
        assert sum(t.nbytes for t in f.tensors.values()) == sum(s.weights for s in shares.values())
    full = tuple(c.size for c in r.kv.caches)
    ctx = GraphContext(r.model, r.kv, n_ubatch, 1, full, flash_attn=flash_attn)
    r.model.build(ctx)
    sched = Schedule(ctx.graph, master, layer_backend=r.model.layer_backend, replicas=r.model.weights.replicas)
    sched.allocate()
    try:
        for buf in sched.buffers:
            assert buf.size <= shares[id(buf.backend)].compute, buf.backend
            assert shares[id(buf.backend)].compute <= 8 * max(buf.size, 1 << 20)  # an estimate, not a guess
    finally:
        sched.free()
        r.close()


def test_cpu_master_takes_only_what_workers_cannot_hold() -> None:
    """By free memory, a host-RAM master would outweigh the workers: it is left out of the proportions
    (workers split by their free memory) and takes the overflow, like llama.cpp's layers beyond -ngl."""
    w1, w2, m = Dev("w1"), Dev("w2"), Dev("m")
    c = costs(n_layer=8, layer=10 * MiB, kv=0, io=0, compute=0, master=0)
    p = place(c, [w1, w2, m], m, memory=[(300 * MiB, GiB), (100 * MiB, GiB), (64 * GiB, 64 * GiB)],
              master_layers=False)
    assert where(p, [w1, w2, m]) == [0] * 6 + [1] * 2
    assert p.how == "by free memory, workers first"
    p = place(c, [w1, w2, m], m, memory=[(30 * MiB, GiB), (20 * MiB, GiB), (64 * GiB, 64 * GiB)],
              master_layers=False)
    assert where(p, [w1, w2, m]) == [0, 0, 0, 1, 1, 2, 2, 2]
    p = place(c, [w1, w2, m], m, [0, 1, 1], memory=plenty(3), master_layers=False)   # explicit split decides
    assert where(p, [w1, w2, m]) == [1] * 4 + [2] * 4
