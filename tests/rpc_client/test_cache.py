"""Weight uploads over 10 MiB go through SET_TENSOR_HASH, as llama.cpp's client does: a worker started with
`--cache DIR` keeps them, and after a restart they are not sent again."""
from __future__ import annotations

import numpy as np
import pytest
from rpc_client_helpers import free_port, spawn_worker

from hybridllm.rpc import protocol as P
from hybridllm.rpc.client_backend import BuffersLost, RpcBackend, RpcError

MIB = 1 << 20


def test_large_weights_are_cached_across_worker_restarts(tmp_path) -> None:
    cache = tmp_path / "cache"
    port = free_port()
    weights = np.random.default_rng(0).integers(0, 256, 11 * MIB, dtype=np.uint8)
    srv = spawn_worker(port, tmp_path / "w.log", "--cache", str(cache))
    try:
        be = RpcBackend(srv.endpoint)
        buf = be.alloc_buffer(12 * MIB)            # automatic usage: weights until a graph writes into it
        act = be.alloc_buffer(12 * MIB, "compute")
        assert buf is not None and act is not None
        before = be.traffic.copy()
        be.set(buf, 4096, memoryview(weights))
        be.set(buf, 0, bytes(4096))                # small: a plain SET_TENSOR
        be.set(act, 0, memoryview(weights))        # not weights: never hashed, never cached
        first = be.traffic - before
        assert be.get(buf, 4096 + weights.nbytes - 16, 16) == weights[-16:].tobytes()   # waits for the worker
        assert first.commands == {"SET_TENSOR_HASH": 1, "SET_TENSOR": 3}
        assert first.hash_hits == 0 and first.bytes_sent > 22 * MIB
        files = list(cache.iterdir())
        assert len(files) == 1 and files[0].read_bytes() == weights.tobytes()
        assert len(files[0].name) == 16

        srv.stop()
        srv = spawn_worker(port, tmp_path / "w.log", "--cache", str(cache))
        with pytest.raises(RpcError, match="lost"):      # the old connection is found dead here
            be.get(buf, 0, 16)
        with pytest.raises(BuffersLost):
            be.get(buf, 0, 16)
        buf = be.alloc_buffer(12 * MIB)            # reconnects
        assert buf is not None
        before = be.traffic.copy()
        be.set(buf, 4096, memoryview(weights))
        again = be.traffic - before
        assert again.commands == {"SET_TENSOR_HASH": 1} and again.hash_hits == 1
        assert again.hash_bytes_saved == weights.nbytes and again.bytes_sent < 1024
        assert be.get(buf, 4096, weights.nbytes) == weights.tobytes()   # filled from the worker's cache
        be.close()
    finally:
        srv.stop()


def test_hash_miss_uploads_in_full(backend: RpcBackend) -> None:
    """Without a cache (llama.cpp's rpc-server as the wheel starts it) SET_TENSOR_HASH answers 0."""
    data = np.arange((P.HASH_THRESHOLD + 8) // 4, dtype=np.float32)
    buf = backend.alloc_buffer(data.nbytes, "weights")
    assert buf is not None
    before = backend.traffic.copy()
    backend.set(buf, 0, memoryview(data))
    delta = backend.traffic - before
    assert delta.commands == {"SET_TENSOR_HASH": 1, "SET_TENSOR": 1} and delta.hash_hits == 0
    assert backend.get(buf, data.nbytes - 64, 64) == data[-16:].tobytes()
