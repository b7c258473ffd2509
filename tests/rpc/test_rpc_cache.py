"""The --cache directory: FNV-1a names, SET_TENSOR_HASH hit/miss, and file-level interop with llama.cpp's server
(the peer's `RPCStream.serve(cache_dir=...)`, run in a subprocess because the native side may abort)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from rpc_helpers import F32, HOST

from hybridllm.backends.numpy_backend import NumpyBackend
from hybridllm.rpc import protocol as P
from hybridllm.rpc.cache import TensorCache, fnv1a_64
from hybridllm.rpc.client import RpcClient, rpc_tensor
from hybridllm.rpc.server import ServerThread

_PEER_STREAM = textwrap.dedent("""
    import socket, sys
    from hybridllm.testing.peer import load_peer
    lcp = load_peer()
    from llama_cpp_py_sync.rpc import RPCStream
    ls = socket.create_server(("127.0.0.1", 0))
    print(ls.getsockname()[1], flush=True)
    ls.settimeout(60)
    conn, _ = ls.accept()
    RPCStream(conn).serve(devices=["CPU"], n_threads=1, cache_dir=sys.argv[1])
""")


def fnv1a_reference(data: bytes) -> int:
    """FNV-1a 64 written from its definition (offset basis 0xcbf29ce484222325, prime 0x100000001b3)."""
    h = 14695981039346656037
    for b in data:
        h = ((h ^ b) * 1099511628211) % 2 ** 64
    return h


class PeerStreamServer:
    """llama.cpp's server over one TCP connection with a cache directory (serves one client, then exits)."""

    def __init__(self, cache_dir: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", _PEER_STREAM, str(cache_dir)], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        if not line.strip():
            self.proc.kill()
            raise RuntimeError(f"peer stream server failed: {self.proc.stderr.read()}")  # type: ignore
        self.port = int(line)

    def __enter__(self) -> PeerStreamServer:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def upload(port: int, blobs: list[bytes], *, try_hash_first: bool) -> tuple[list[int], list[bytes]]:
    """Upload each blob as the reference client does for big weights; returns hash replies and read-backs."""
    replies, back = [], []
    with RpcClient(HOST, port) as c:
        h, base = c.alloc_buffer(1 << 16)
        for blob in blobs:
            t = rpc_tensor(1, F32, (len(blob) // 4,), buffer=h, data=base)
            r = c.call(P.SetTensorHashReq(t, 0, fnv1a_64(blob))) if try_hash_first else None
            replies.append(r.result if r is not None else -1)
            if r is None or r.result == 0:
                c.set_tensor(t, blob, cache_flag=1)
            back.append(c.get_tensor(t, len(blob)))
    return replies, back


@pytest.fixture
def blobs() -> list[bytes]:
    rng = np.random.default_rng(7)
    return [rng.integers(0, 256, 20_000, dtype=np.uint8).tobytes(), b"\x00\x01" * 8, bytes(range(16))]


def test_fnv1a_matches_the_definition(blobs):
    for blob in blobs + [b"", b"a", bytes(5000)]:
        assert fnv1a_64(blob) == fnv1a_reference(blob)
    assert fnv1a_64(bytes(range(16))) == 0x7C84DC9477851775  # the file the reference wrote (spec Appendix A)


def test_cache_dir_hit_miss_and_file_names(tmp_path, blobs):
    with ServerThread([NumpyBackend()], cache=TensorCache(tmp_path)) as st:
        replies, back = upload(st.port, blobs, try_hash_first=True)
        assert replies == [0, 0, 0] and back == blobs
        assert sorted(os.listdir(tmp_path)) == sorted(f"{fnv1a_reference(b):016x}" for b in blobs)
        assert all((tmp_path / f"{fnv1a_reference(b):016x}").read_bytes() == b for b in blobs)
        replies, back = upload(st.port, blobs, try_hash_first=True)   # a new connection: all hits now
        assert replies == [1, 1, 1] and back == blobs


def test_without_cache_dir_hash_always_misses_and_nothing_is_written(tmp_path, blobs):
    with ServerThread([NumpyBackend()]) as st:
        replies, back = upload(st.port, blobs, try_hash_first=True)
        replies, back = upload(st.port, blobs, try_hash_first=True)
        assert replies == [0, 0, 0] and back == blobs


def test_cache_hit_still_checks_the_region(tmp_path, blobs):
    TensorCache(tmp_path).store(blobs[0])
    with ServerThread([NumpyBackend()], cache=TensorCache(tmp_path)) as st, RpcClient(HOST, st.port) as c:
        h, base = c.alloc_buffer(1 << 16)
        small = rpc_tensor(1, F32, (16,), buffer=h, data=base)   # 64 bytes: the 20000-byte file does not fit
        c.send(P.SetTensorHashReq(small, 0, fnv1a_64(blobs[0])))
        assert c.is_closed()


def test_cache_dir_is_interchangeable_with_llama_cpp(tmp_path, blobs, peer):
    ours_dir, peer_dir = tmp_path / "ours", tmp_path / "peer"
    ours_dir.mkdir(), peer_dir.mkdir()
    with PeerStreamServer(peer_dir) as srv:
        replies, back = upload(srv.port, blobs, try_hash_first=True)
    assert replies == [0, 0, 0] and back == blobs
    with ServerThread([NumpyBackend()], cache=TensorCache(ours_dir)) as st:
        upload(st.port, blobs, try_hash_first=True)
    names = sorted(os.listdir(peer_dir))
    assert names == sorted(os.listdir(ours_dir)) and len(names) == 3
    for name in names:
        assert (peer_dir / name).read_bytes() == (ours_dir / name).read_bytes()
    # each side serves from the directory the other one wrote
    with ServerThread([NumpyBackend()], cache=TensorCache(peer_dir)) as st:
        replies, back = upload(st.port, blobs, try_hash_first=True)
        assert replies == [1, 1, 1] and back == blobs
    for f in peer_dir.iterdir():
        f.unlink()
    time.sleep(0.1)
    with PeerStreamServer(ours_dir) as srv:
        replies, back = upload(srv.port, blobs, try_hash_first=True)
    assert replies == [1, 1, 1] and back == blobs
    assert list(peer_dir.iterdir()) == []
