"""RpcBackend against our worker and llama.cpp's rpc-server: graphs built with hybridllm.ggml.ops compute
remotely what the local NumpyBackend computes; GRAPH_RECOMPUTE, the uid cache rule and pipelining are
checked through the wire counters."""
from __future__ import annotations

import numpy as np
import pytest
from rpc_client_helpers import F32, Net, place

from hybridllm.backends.base import Unsupported
from hybridllm.backends.numpy_backend import NumpyBackend
from hybridllm.ggml import ops
from hybridllm.ggml.types import GGMLType
from hybridllm.rpc import client_backend
from hybridllm.rpc import protocol as P
from hybridllm.rpc.client_backend import RpcBackend


def _check_close(got: np.ndarray, want: np.ndarray, kind: str) -> None:
    if kind == "ours":   # the same kernels run on both sides
        np.testing.assert_array_equal(got, want)
    else:                # ggml's CPU kernels: same math, float rounding may differ in the last bits
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_graph_matches_local_and_recomputes(backend: RpcBackend, server) -> None:
    local = Net(NumpyBackend())
    remote = Net(backend)
    local.upload(np.random.default_rng(0))
    remote.upload(np.random.default_rng(0))
    plan_l, plan_r = local.backend.prepare(local.graph.nodes), backend.prepare(remote.graph.nodes)
    xs = np.random.default_rng(1).standard_normal((3, 4, 256)).astype(np.float32)

    before = backend.traffic.copy()
    for net, plan in ((local, plan_l), (remote, plan_r)):
        net.set_x(xs[0])
        plan.run()
    _check_close(remote.result(), local.result(), server.kind)
    first = backend.traffic - before
    assert first.commands["GRAPH_COMPUTE"] == 1 and first.commands["GRAPH_RECOMPUTE"] == 0
    assert first.round_trips == 1   # SET_TENSOR and GRAPH_COMPUTE ride with the GET_TENSOR

    for x in xs[1:]:   # a decode step: upload, recompute, read
        step = backend.traffic.copy()
        for net, plan in ((local, plan_l), (remote, plan_r)):
            net.set_x(x)
            plan.run()
        _check_close(remote.result(), local.result(), server.kind)
        delta = backend.traffic - step
        assert dict(delta.commands) == {"SET_TENSOR": 1, "GRAPH_RECOMPUTE": 1, "GET_TENSOR": 1}
        assert delta.round_trips == 1
        assert delta.bytes_sent == (9 + 305 + x.nbytes) + (9 + 12) + (9 + 312)
        assert delta.bytes_received == 8 + remote.out.nbytes


def test_free_buffer_invalidates_cached_graphs(backend: RpcBackend) -> None:
    """FREE_BUFFER drops every cached graph on the worker; the client must send the full graph again
    (a GRAPH_RECOMPUTE would make the worker close the connection)."""
    net = Net(backend)
    net.upload(np.random.default_rng(0))
    net.set_x(np.ones((4, 256), np.float32))
    plan = backend.prepare(net.graph.nodes)
    plan.run()
    want = net.result()
    plan.run()
    other = backend.alloc_buffer(1024)
    assert other is not None
    backend.free_buffer(other)
    before = backend.traffic.copy()
    plan.run()
    np.testing.assert_array_equal(net.result(), want)
    delta = backend.traffic - before
    assert delta.commands["GRAPH_COMPUTE"] == 1 and delta.commands["GRAPH_RECOMPUTE"] == 0
    plan.run()
    assert (backend.traffic - before).commands["GRAPH_RECOMPUTE"] == 1
    np.testing.assert_array_equal(net.result(), want)


def test_uid_cache_limit_mirrors_the_worker(backend: RpcBackend) -> None:
    """Both sides clear their per-device uid cache when it holds 1024 entries (ggml-rpc.md §6.4)."""
    a = ops.new_tensor_1d(F32, 8)
    out = ops.scale(a, 3.0)
    g = ops.Graph()
    g.expand(out)
    place(backend, [a, out])
    backend.set(a.buffer, a.offset, np.arange(8, dtype=np.float32).tobytes())
    plans = [backend.prepare(g.nodes) for _ in range(P.GRAPH_CACHE_LIMIT + 1)]
    before = backend.traffic.copy()
    for p in plans:                 # 1024 cached, then the 1025th clears both caches
        p.run()
    plans[0].run()                  # evicted: must be sent in full again
    plans[-1].run()                 # still cached on both sides
    got = np.frombuffer(backend.get(out.buffer, out.offset, 32), np.float32)  # connection still alive
    np.testing.assert_array_equal(got, 3.0 * np.arange(8))
    delta = backend.traffic - before
    assert delta.commands["GRAPH_COMPUTE"] == P.GRAPH_CACHE_LIMIT + 2
    assert delta.commands["GRAPH_RECOMPUTE"] == 1


def test_data_commands(backend: RpcBackend) -> None:
    """set/get/memset/clear/copy at offsets behave like a local byte array."""
    buf = backend.alloc_buffer(4096)
    other = backend.alloc_buffer(512)
    assert buf is not None and other is not None and buf.base and buf.size == 4096
    model = np.zeros(4096, np.uint8)
    backend.clear(buf, 0x11)
    model[:] = 0x11
    data = np.random.default_rng(3).integers(0, 256, 1000, dtype=np.uint8)
    backend.set(buf, 100, memoryview(data))
    model[100:1100] = data
    backend.memset(buf, 2000, 300, 0xAB)
    model[2000:2300] = 0xAB
    assert backend.copy(buf, 100, buf, 3000, 500)
    model[3000:3500] = model[100:600]
    assert backend.get(buf, 0, 4096) == model.tobytes()
    assert backend.get(buf, 4000, 96) == model[4000:].tobytes()
    assert backend.copy(buf, 0, other, 12, 400)   # another buffer of the same connection
    assert backend.get(other, 12, 400) == model[:400].tobytes()
    local = NumpyBackend()
    assert not backend.copy(local.alloc_buffer(16), 0, buf, 0, 16)  # not on this worker: caller copies
    with pytest.raises(ValueError, match="outside"):   # refused here, before the worker closes on it
        backend.set(buf, 4090, b"0123456789")
    backend.free_buffer(other)
    with pytest.raises(ValueError, match="freed"):
        backend.get(other, 0, 4)
    assert backend.get(buf, 4088, 8) == model[4088:].tobytes()   # the connection is unharmed


def test_queries(backend: RpcBackend) -> None:
    free, total = backend.memory()
    assert 0 < total and 0 <= free <= total
    assert backend.alignment == 32 and backend.max_size > 1 << 40
    q = ops.new_tensor_2d(GGMLType.Q8_0, 96, 5)      # ne0 % 512 != 0: llama.cpp asks the worker
    before = backend.traffic.copy()
    assert backend.alloc_size(q) == q.nbytes         # CPU workers pad nothing
    assert backend.alloc_size(ops.new_tensor_2d(GGMLType.Q8_0, 96, 5)) == q.nbytes
    assert backend.alloc_size(ops.new_tensor_2d(F32, 96, 5)) == 96 * 5 * 4
    assert (backend.traffic - before).commands == {"GET_ALLOC_SIZE": 1}   # cached, F32 leaf never asked
    assert backend.alloc_buffer(1 << 62) is None     # the worker answers (0, 0); the connection stays
    assert backend.memory()[1] == total


def test_prepare_refuses_nodes_stored_elsewhere(backend: RpcBackend) -> None:
    a = ops.new_tensor_1d(F32, 8)
    out = ops.scale(a, 2.0)
    g = ops.Graph()
    g.expand(out)
    place(backend, [out])
    place(NumpyBackend(), [a])
    with pytest.raises(Unsupported, match="not stored in a buffer of RPC0"):
        backend.prepare(g.nodes)


def test_one_shot_compute_is_not_cached(backend: RpcBackend) -> None:
    """Backend.compute() sends uid 0 (never cached by the worker), every time in full."""
    a = ops.new_tensor_1d(F32, 8)
    out = ops.scale(a, -2.0)
    g = ops.Graph()
    g.expand(out)
    place(backend, [a, out])
    before = backend.traffic.copy()
    for k in range(2):
        backend.set(a.buffer, a.offset, np.full(8, k + 1, np.float32).tobytes())
        backend.compute(g.nodes)
        got = np.frombuffer(backend.get(out.buffer, out.offset, 32), np.float32)
        np.testing.assert_array_equal(got, np.full(8, -2.0 * (k + 1)))
    delta = backend.traffic - before
    assert delta.commands["GRAPH_COMPUTE"] == 2 and delta.commands["GRAPH_RECOMPUTE"] == 0
    assert not backend.link.uids.get(0)


def test_large_transfers_are_split(backend: RpcBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    """Transfers above the 32-bit ne0 limit go in chunks (here shrunk to 100 bytes); reads stay one round trip."""
    monkeypatch.setattr(client_backend, "_CHUNK", 100)
    buf = backend.alloc_buffer(1024)
    assert buf is not None
    data = np.random.default_rng(5).integers(0, 256, 1000, dtype=np.uint8)
    before = backend.traffic.copy()
    backend.set(buf, 7, memoryview(data))
    backend.memset(buf, 500, 250, 0x42)
    assert backend.copy(buf, 7, buf, 1007 - 250, 250) is True
    got = backend.get(buf, 7, 1000)
    want = data.copy()
    want[493:743] = 0x42
    want[750:1000] = want[0:250]
    assert got == want.tobytes()
    delta = backend.traffic - before
    assert delta.commands == {"SET_TENSOR": 10, "MEMSET_TENSOR": 3, "COPY_TENSOR": 3, "GET_TENSOR": 10}
    assert delta.round_trips == 2
