"""One model over several local devices (separate NumpyBackends standing in for workers): the same
kernels on the same inputs, so every split placement must give the logits of the one-device run bit for
bit; and the scheduler's wiring: each split reads only its own device's memory, inputs go only where they
are read, and only the residual stream crosses a boundary."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hybridllm.backends.numpy_backend import NumpyBackend
from hybridllm.engine.runner import ModelRunner, load
from hybridllm.engine.scheduler import Schedule
from hybridllm.testing import synth
from hybridllm.testing.synth import ARCHS, model_path

PROMPT = [1, 5, 9, 33, 100, 7, 200, 301, 44, 45, 46, 47, 48]
FED = [17, 3, 250, 41]


class Dev(NumpyBackend):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name


def rows(r: ModelRunner) -> np.ndarray:
    out = [r.decode(PROMPT)[0]] + [r.decode([t])[0] for t in FED]
    return np.stack(out)


def assert_split_local(sched: Schedule) -> None:
    """Every tensor a split touches lives on the split's device."""
    for sp in sched.splits:
        for n in sp.nodes:
            for s in [n, *n.src, n.view_src]:
                if s is not None and s.buffer is not None:
                    assert s.buffer.backend is sp.backend, (n.name, s.name, sp.backend.name)


def schedules(r: ModelRunner) -> list[Schedule]:
    return [p.compute for p in r._graphs.values()]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("synth")


@pytest.mark.parametrize("flash_attn", [True, False], ids=["fa", "nofa"])
@pytest.mark.parametrize("arch", ARCHS)
def test_split_placements_give_identical_logits(root: Path, arch: str, flash_attn: bool) -> None:
    path = model_path(root, arch, "q8_0", n_layer=4)
    kw = {"n_ctx": 256, "n_ubatch": 8, "flash_attn": flash_attn}   # 13-token prompt: two ubatches
    one = load(path, device=NumpyBackend(), **kw)
    want = rows(one)
    one.close()
    for split in ([1, 1], [1, 2, 1], [1, 0, 1], [1, 0]):
        devs = [Dev(f"w{i}") for i in range(len(split) - 1)]
        r = load(path, device=Dev("m"), rpc=devs, tensor_split=split, **kw)
        got = rows(r)
        for sched in schedules(r):
            assert_split_local(sched)
            assert len(sched.devices) == sum(1 for x in split if x) + (split[-1] == 0)
        r.close()
        np.testing.assert_array_equal(got, want, err_msg=f"tensor split {split}")


def test_what_crosses_a_decode_step(root: Path) -> None:
    """gemma3 (sliding-window and global layers), layers 0-1 on A, 2-3 on B, none on the master M."""
    path = model_path(root, "gemma3", "q8_0", n_layer=4)
    a, b, m = Dev("A"), Dev("B"), Dev("M")
    r = load(path, device=m, rpc=[a, b], tensor_split=[1, 1, 0], n_ctx=256)
    r.decode(PROMPT)
    r.decode([17])
    sched = r._graphs[next(k for k in r._graphs if k[0] == 1)].compute   # the 1-token graph
    before = (sched.traffic.transfers, sched.traffic.transfer_bytes)
    r.decode([3])
    moved = (sched.traffic.transfers - before[0], sched.traffic.transfer_bytes - before[1])
    assert [sp.backend.name for sp in sched.splits] == ["M", "A", "B", "M"]
    n_embd = r.hp.n_embd
    assert moved == (3, 3 * 4 * n_embd)   # M->A embedding, A->B residual, B->M final row; never logits
    reads: dict[str, set[str]] = {}
    for copies in sched.locals.values():
        for t in copies:
            reads.setdefault(t.buffer.backend.name, set()).add(t.name)  # type: ignore[union-attr]
    attn = {"inp_pos", "attn_inp_k_idxs", "attn_inp_v_idxs", "attn_inp_kq_mask"}
    assert reads == {"M": {"inp_tokens", "inp_scale_rows"}, "A": attn, "B": attn | {"out_ids"}}
    assert [len(v) for v in sched.locals.values()].count(2) == 1 + 2 * 3   # pos, 2 caches x (k, v, mask)
    r.close()


def test_shared_weight_is_replicated(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """llama3's rope_freqs is read by every layer: each device gets its own copy, none is read remotely."""
    orig = synth.model_tensors

    def with_rope_freqs(c, qtype, rng):  # type: ignore[no-untyped-def]
        out = orig(c, qtype, rng)
        out["rope_freqs.weight"] = (np.linspace(1.0, 8.0, c.head_dim // 2, dtype=np.float32), synth.QT.F32)
        return out

    monkeypatch.setattr(synth, "model_tensors", with_rope_freqs)
    path = synth.write_model(root / "llama3-rope-freqs.gguf", "llama", "q8_0", n_layer=4)
    one = load(path, device=NumpyBackend(), n_ctx=256)
    want = rows(one)
    one.close()
    w, m = Dev("w"), Dev("m")
    r = load(path, device=m, rpc=[w], tensor_split=[1, 1], n_ctx=256)
    got = rows(r)
    primary = r.model.weights["rope_freqs.weight"]
    assert set(r.model.weights.replicas[id(primary)]) == {id(w)}
    for sched in schedules(r):
        assert_split_local(sched)
    r.close()
    np.testing.assert_array_equal(got, want)


def test_gemma_over_two_devices(gemma_path: Path) -> None:
    """The real gemma-3-270m, 9 layers on each of two devices: greedy decoding, logits bit-identical."""
    prompt = [2, 818, 5279, 529, 7001, 563]

    def greedy(r: ModelRunner, n: int = 8) -> tuple[list[int], np.ndarray]:
        logits = [r.decode(prompt)[0]]
        toks = [int(np.argmax(logits[-1]))]
        while len(toks) < n:
            logits.append(r.decode([toks[-1]])[0])
            toks.append(int(np.argmax(logits[-1])))
        r.close()
        return toks, np.stack(logits)

    want_toks, want = greedy(load(gemma_path, n_ctx=512))
    notes: list[str] = []
    r = load(gemma_path, device=Dev("m"), rpc=[Dev("w")], tensor_split=[1, 1], n_ctx=512, log=notes.append)
    assert r.model.placement.layers_of(r.model.placement.devices[1]) == list(range(9))
    got_toks, got = greedy(r)
    assert got_toks == want_toks
    np.testing.assert_array_equal(got, want)
    assert "layers 0-8" in notes[0] and "layers 9-17 + input/output" in notes[0]


def test_runners_sharing_split_weights(root: Path) -> None:
    """A server's slots: several runners over one split model, each with its own KV cache on every
    device, decoding interleaved."""
    path = model_path(root, "gemma3", "q8_0", n_layer=4)
    one = load(path, device=NumpyBackend(), n_ctx=256)
    want = rows(one)
    one.close()
    w, m = Dev("w"), Dev("m")
    first = load(path, device=m, rpc=[w], tensor_split=[1, 1], n_ctx=256, kv_slots=2)
    second = ModelRunner(first.model, first.config, first.metadata)
    got: list[list[np.ndarray]] = [[], []]
    for i, (r, toks) in enumerate([(first, PROMPT), (second, PROMPT)]):
        got[i].append(r.decode(toks)[0])
    for t in FED:
        for i, r in enumerate((first, second)):
            got[i].append(r.decode([t])[0])
    assert {id(b) for c in second.kv.caches for b in c.buffers.values()}.isdisjoint(
        {id(b) for c in first.kv.caches for b in c.buffers.values()})
    second.drop_graphs()
    second.kv.free()
    first.close()
    for g in got:
        np.testing.assert_array_equal(np.stack(g), want)
