"""Helpers for the RpcBackend tests (a uniquely named module: tests/*/conftest.py files collide)."""
from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import gguf
import numpy as np
from typing_extensions import Self

from hybridllm.backends.base import Backend, Buffer
from hybridllm.engine.alloc import bind_views
from hybridllm.ggml import ops
from hybridllm.ggml.tensor import Tensor
from hybridllm.ggml.types import GGMLType
from hybridllm.rpc.client_backend import RpcBackend
from hybridllm.testing.procs import HOST, ServerProc, free_port

F32, Q8_0 = GGMLType.F32, GGMLType.Q8_0
ALIGN = 64


def place(backend: Backend, tensors: Sequence[Tensor], usage: str | None = None) -> Buffer:
    """Put `tensors` one after another (aligned) in a new buffer of `backend`; views follow their base."""
    offsets, size = [], 0
    for t in tensors:
        offsets.append(size)
        size += -(-backend.alloc_size(t) // ALIGN) * ALIGN
    buf = (backend.alloc_buffer(size, usage) if isinstance(backend, RpcBackend)
           else backend.alloc_buffer(size))
    assert buf is not None
    for t, off in zip(tensors, offsets):
        t.buffer, t.offset = buf, off
    return buf


class Net:
    """x -> rms_norm * g -> mul_mat(Q8_0 W) + b -> transpose -> cont: the shape of one llama.cpp block
    (views, a quantized weight, broadcasting), built with ggml's graph API."""

    def __init__(self, backend: Backend, n_in: int = 256, n_out: int = 32, n_tok: int = 4) -> None:
        self.backend = backend
        self.x = ops.set_name(ops.new_tensor_2d(F32, n_in, n_tok), "x")
        self.g = ops.set_name(ops.new_tensor_1d(F32, n_in), "g")
        self.w = ops.set_name(ops.new_tensor_2d(Q8_0, n_in, n_out), "w")
        self.b = ops.set_name(ops.new_tensor_1d(F32, n_out), "b")
        h = ops.mul(ops.rms_norm(self.x, 1e-6), self.g)
        y = ops.add(ops.mul_mat(self.w, h), self.b)
        self.out = ops.set_name(ops.cont(ops.transpose(y)), "out")
        self.graph = ops.Graph()
        self.graph.expand(self.out)
        self.weights = place(backend, [self.g, self.w, self.b], "weights")
        self.compute = place(backend, [self.x, *self.graph.nodes], "compute")
        bind_views(self.graph.tensors())

    def upload(self, rng: np.random.Generator) -> None:
        be = self.backend
        w = rng.standard_normal((self.w.ne[1], self.w.ne[0])).astype(np.float32)
        be.set(self.w.buffer, self.w.offset, gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0).tobytes())
        be.set(self.g.buffer, self.g.offset, rng.uniform(0.5, 1.5, self.g.ne[0]).astype(np.float32).tobytes())
        be.set(self.b.buffer, self.b.offset, rng.standard_normal(self.b.ne[0]).astype(np.float32).tobytes())

    def set_x(self, x: np.ndarray) -> None:
        self.backend.set(self.x.buffer, self.x.offset, x.astype(np.float32).tobytes())

    def result(self) -> np.ndarray:
        raw = self.backend.get(self.out.buffer, self.out.offset, self.out.nbytes)
        return np.frombuffer(raw, np.float32).reshape(self.out.ne[1], self.out.ne[0])


def spawn_worker(port: int, log: Path, *args: str, timeout: float = 30.0) -> ServerProc:
    """Our worker on a chosen port (tests that restart a worker need the same endpoint again)."""
    cmd = [sys.executable, "-m", "hybridllm.cli", "worker", "--host", HOST, "--port", str(port),
           "--threads", "2", *args]
    with open(log, "ab") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    srv = ServerProc("ours", HOST, port, proc, log, cmd)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and srv.alive:
        try:
            socket.create_connection((HOST, port), timeout=0.5).close()
            return srv
        except OSError:
            time.sleep(0.05)
    srv.stop()
    raise RuntimeError(f"worker did not start: {srv.log_tail()}")


class FakeServer:
    """A listening socket whose accepted connections are handed to `serve(conn)` in a thread."""

    def __init__(self, serve: Callable[[socket.socket], None]) -> None:
        self.sock = socket.create_server((HOST, 0))
        self.port = self.sock.getsockname()[1]
        self.endpoint = f"{HOST}:{self.port}"
        self._serve = serve
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                try:
                    self._serve(conn)
                except OSError:
                    pass

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def recv_exact(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise OSError("closed")
        data += chunk
    return data


__all__ = ["F32", "HOST", "Q8_0", "FakeServer", "Net", "free_port", "place", "recv_exact", "spawn_worker"]
