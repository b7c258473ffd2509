"""Failures surface as RpcError naming the endpoint, quickly, never as a hang or a process abort; a dropped
connection loses its buffers (BuffersLost) and the next call reconnects."""
from __future__ import annotations

import signal
import struct
import threading
import time
from collections.abc import Callable

import numpy as np
import pytest
from rpc_client_helpers import (
    F32,
    FakeServer,
    Net,
    free_port,
    place,
    recv_exact,
    spawn_worker,
)

from hybridllm.ggml import ops
from hybridllm.ggml.types import GGMLType
from hybridllm.rpc.client_backend import (
    BuffersLost,
    RpcBackend,
    RpcError,
    VersionMismatch,
)
from hybridllm.rpc.transport import RpcConnection


def _replying(hello: bytes, replies: dict[int, bytes] | None = None, *,
              hold: threading.Event | None = None) -> Callable:
    """A fake worker: answers HELLO with `hello` (a full response frame), then command c with replies[c]."""
    def serve(conn) -> None:  # type: ignore[no-untyped-def]
        recv_exact(conn, 9 + 24)
        conn.sendall(hello)
        while True:
            cmd, size = struct.unpack("<BQ", recv_exact(conn, 9))
            recv_exact(conn, size)
            if replies is None or cmd not in replies:
                if hold is not None:
                    hold.wait(10)
                return
            conn.sendall(replies[cmd])
    return serve


def _hello(major: int, minor: int, patch: int) -> bytes:
    return struct.pack("<Q4B", 28, major, minor, patch, 0) + bytes(24)


def _u64(v: int) -> bytes:
    return struct.pack("<QQ", 8, v)


@pytest.mark.parametrize("version", [(7, 0, 0), (9, 0, 0), (8, 1, 0)])
def test_version_mismatch(version: tuple[int, int, int]) -> None:
    pattern = r"RPC worker 127\.0\.0\.1:\d+: the worker speaks RPC protocol {}\.{}\.{}".format(*version)
    with FakeServer(_replying(_hello(*version))) as srv, pytest.raises(VersionMismatch, match=pattern):
        RpcBackend(srv.endpoint)


def test_old_short_hello_reply_is_a_version_mismatch() -> None:
    with FakeServer(_replying(struct.pack("<Q3B", 3, 3, 0, 0))) as srv, \
            pytest.raises(VersionMismatch, match=r"speaks RPC protocol 3\.0\.0"):
        RpcConnection(srv.endpoint)


def test_newer_patch_is_accepted() -> None:
    replies = {15: struct.pack("<QI", 4, 1), 1: _u64(64), 2: _u64(1 << 30)}
    with FakeServer(_replying(_hello(8, 0, 9), replies)) as srv:
        be = RpcBackend(srv.endpoint)
        assert (be.alignment, be.max_size) == (64, 1 << 30)
        assert be.link.conn.version == (8, 0, 9)  # type: ignore[union-attr]
        be.close()


def test_malformed_reply() -> None:
    with FakeServer(_replying(_hello(8, 0, 0), {15: struct.pack("<QQ", 8, 1)})) as srv, \
            pytest.raises(RpcError, match="malformed reply to DEVICE_COUNT: 8 bytes, expected 4"):
        RpcBackend(srv.endpoint)


def test_refused_and_silent_workers_fail_fast() -> None:
    endpoint = f"127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    with pytest.raises(RpcError, match=f"RPC worker {endpoint}: cannot connect"):
        RpcBackend(endpoint)
    hold = threading.Event()
    with FakeServer(_replying(_hello(8, 0, 0), {}, hold=hold)) as srv:   # never answers DEVICE_COUNT
        with pytest.raises(RpcError, match=r"timed out \(0\.5 s\) waiting for the reply to DEVICE_COUNT"):
            RpcBackend(srv.endpoint, timeout=0.5)
        hold.set()
    assert time.monotonic() - t0 < 5


def test_device_out_of_range(ours) -> None:
    with pytest.raises(RpcError, match="device 3 out of range: the worker has 1 device"):
        RpcBackend(ours.endpoint, device=3)
    with RpcBackend(ours.endpoint) as be:
        assert be.memory()[1] > 0


def test_refused_request_names_the_command(ours) -> None:
    """Our worker closes on a GET_ROWS index out of range; the error comes at the next read."""
    with RpcBackend(ours.endpoint) as be:
        a = ops.new_tensor_2d(F32, 4, 3)
        idx = ops.new_tensor_1d(GGMLType.I32, 1)
        out = ops.get_rows(a, idx)
        g = ops.Graph()
        g.expand(out)
        place(be, [a, idx, out])
        be.set(idx.buffer, idx.offset, struct.pack("<i", 99))
        be.prepare(g.nodes).run()
        with pytest.raises(RpcError, match=r"the worker (closed|reset) the connection.* waiting for the reply "
                                           r"to GET_TENSOR after SET_TENSOR, GRAPH_COMPUTE, GET_TENSOR .*the 1 "
                                           r"buffer\(s\) allocated on it are lost"):
            be.get(out.buffer, out.offset, 16)
        assert be.broken
        with pytest.raises(BuffersLost):
            be.get(out.buffer, out.offset, 16)
        assert be.memory()[1] > 0 and be.broken is None    # reconnected


def _slow_graph(be: RpcBackend) -> tuple[ops.Graph, ops.Tensor]:
    """~seconds of F32 matmuls on a 2-thread CPU worker."""
    w = ops.new_tensor_2d(F32, 1024, 1024)
    x = ops.new_tensor_2d(F32, 1024, 256)
    h = x
    for _ in range(48):
        h = ops.mul_mat(w, h)
    g = ops.Graph()
    g.expand(h)
    place(be, [w, x], "compute")
    place(be, g.nodes, "compute")
    be.set(w.buffer, w.offset, np.full(1024 * 1024, 1 / 1024, np.float32).tobytes())
    be.set(x.buffer, x.offset, np.ones(1024 * 256, np.float32).tobytes())
    return g, h


def test_worker_killed_mid_run_then_reconnect(tmp_path) -> None:
    port = free_port()
    srv = spawn_worker(port, tmp_path / "w.log")
    try:
        be = RpcBackend(srv.endpoint, timeout=60)
        g, out = _slow_graph(be)
        plan = be.prepare(g.nodes)
        plan.run()
        time.sleep(0.2)
        srv.proc.send_signal(signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(RpcError, match=f"RPC worker {srv.endpoint}: .*lost"):
            be.get(out.buffer, out.offset, 64)
        assert time.monotonic() - t0 < 3
        assert be.broken
        srv.proc.wait(5)
        with pytest.raises(RpcError, match="cannot connect"):   # still down: fails at once
            be.memory()
        srv = spawn_worker(port, tmp_path / "w.log")
        with pytest.raises(BuffersLost, match="allocate and upload again"):
            plan.run()
        with pytest.raises(BuffersLost):
            be.set(out.buffer, out.offset, bytes(4))
        be.free_buffer(out.buffer)   # freeing a lost buffer is fine (cleanup paths)
        net = Net(be)                # reconnects: a fresh connection, new buffers
        net.upload(np.random.default_rng(0))
        net.set_x(np.ones((4, 256), np.float32))
        be.prepare(net.graph.nodes).run()
        assert np.isfinite(net.result()).all()
        assert be.traffic.connections == 2
        be.close()
    finally:
        srv.stop()
