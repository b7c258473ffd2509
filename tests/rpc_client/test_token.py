"""hybridllm's token handshake (protocol/README.md §9): HMAC proofs over both sides' nonces in HELLO's
conn_caps, invisible to llama.cpp peers; a --token worker closes every other connection with one log line."""
from __future__ import annotations

import hashlib
import hmac
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator

import numpy as np
import pytest
from rpc_client_helpers import HOST, FakeServer, Net, recv_exact

from hybridllm.rpc.client_backend import AuthError, RpcBackend, RpcError
from hybridllm.testing.peer_master import MasterFailed, run_master
from hybridllm.testing.procs import ServerProc, start_worker
from hybridllm.testing.synth import model_path

TOKEN = "correct horse battery staple"


def _hmac(role: bytes, client: bytes, worker: bytes) -> bytes:
    """The proof as protocol/README.md §9 specifies it, computed here independently of auth.py."""
    msg = b"hybridllm-rpc-auth-v1|" + role + b"|" + client + worker
    return hmac.new(TOKEN.encode(), msg, hashlib.sha256).digest()[:24]


@pytest.fixture(scope="module")
def locked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    """`hybridllm worker --token ...` (subprocess)."""
    with start_worker(log_dir=tmp_path_factory.mktemp("locked"), extra_args=["--token", TOKEN]) as srv:
        yield srv


def _closed_lines(srv: ServerProc) -> list[str]:
    return [ln for ln in srv.log().splitlines() if "closed:" in ln]


def test_token_accepted(locked: ServerProc) -> None:
    with RpcBackend(locked.endpoint, token=TOKEN) as be:
        assert be.link.conn.authenticated  # type: ignore[union-attr]
        net = Net(be)
        net.upload(np.random.default_rng(0))
        net.set_x(np.ones((4, 256), np.float32))
        be.prepare(net.graph.nodes).run()
        assert np.isfinite(net.result()).all()
        assert be.traffic.commands["HELLO"] == 2


@pytest.mark.parametrize("token, error, logged", [
    ("wrong", "the worker refused the token", "authentication failed: wrong token"),
    (None, "closed the connection during HELLO \\(does it require a token", "the client sent no token"),
])
def test_token_refused(locked: ServerProc, token: str | None, error: str, logged: str) -> None:
    before = len(_closed_lines(locked))
    with pytest.raises(AuthError if token else RpcError, match=error):
        RpcBackend(locked.endpoint, token=token)
    with RpcBackend(locked.endpoint, token=TOKEN) as be:   # the worker carries on (and has logged by now)
        assert be.memory()[1] > 0
    lines = _closed_lines(locked)[before:]
    assert len(lines) == 1 and logged in lines[0], lines


def test_token_client_refuses_workers_that_do_not_ask(ours: ServerProc, llama_server: ServerProc) -> None:
    for srv in (ours, llama_server):
        with pytest.raises(AuthError, match="the worker did not ask for one"):
            RpcBackend(srv.endpoint, token=TOKEN)
    with RpcBackend(llama_server.endpoint) as be:    # llama.cpp ignored our caps and still serves
        assert be.memory()[1] > 0


def test_llama_cpp_master_cannot_use_a_token_worker(locked: ServerProc, tmp_path, peer) -> None:
    before = len(_closed_lines(locked))
    with pytest.raises(MasterFailed):
        run_master(model_path(tmp_path, "llama", "q8_0"), tmp_path / "m", rpc=[locked.endpoint],
                   prompt_ids=[1, 2, 3], n_predict=1, timeout=120)
    lines = _closed_lines(locked)[before:]
    assert len(lines) == 1 and "authentication required" in lines[0], lines


def _raw_hello(sock: socket.socket, caps: bytes) -> bytes:
    sock.sendall(struct.pack("<BQ", 14, 24) + caps)
    size, = struct.unpack("<Q", recv_exact(sock, 8))
    assert size == 28
    return recv_exact(sock, 28)[4:]


def _closes(sock: socket.socket) -> bool:
    sock.settimeout(10)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_worker_proofs_follow_the_spec_and_do_not_replay(locked: ServerProc) -> None:
    client = bytes(range(16))
    with socket.create_connection((HOST, locked.port)) as s:
        caps = _raw_hello(s, b"HLLMTOK1" + client)
        assert caps[:8] == b"HLLMCHL1"
        worker = caps[8:]
        proof = _hmac(b"client", client, worker)
        assert _raw_hello(s, proof) == _hmac(b"worker", client, worker)
        s.sendall(struct.pack("<BQ", 15, 0))         # DEVICE_COUNT now works
        assert recv_exact(s, 12) == struct.pack("<QI", 4, 1)
    with socket.create_connection((HOST, locked.port)) as s:   # a recorded proof is useless later
        assert _raw_hello(s, b"HLLMTOK1" + client)[8:] != worker
        s.sendall(struct.pack("<BQ", 14, 24) + proof)
        assert _closes(s)


@pytest.mark.parametrize("second", [
    struct.pack("<BQ", 15, 0),                      # a command instead of the proof
    struct.pack("<BQ", 14, 24) + bytes(24) + struct.pack("<BQ", 6, 100 << 20) + bytes(64),  # a bad proof
    # and a large upload pipelined behind it: refused before any buffer is allocated for it
])
def test_worker_refuses_anything_but_the_proof(locked: ServerProc, second: bytes) -> None:
    with socket.create_connection((HOST, locked.port)) as s:
        _raw_hello(s, b"HLLMTOK1" + bytes(16))
        s.sendall(second)
        assert _closes(s)


def test_client_never_sends_the_token() -> None:
    """A fake worker records the handshake: the client's proof is the HMAC, the token never appears."""
    seen: list[bytes] = []
    worker = bytes(range(100, 116))

    def serve(conn: socket.socket) -> None:
        first = recv_exact(conn, 33)
        conn.sendall(struct.pack("<Q4B", 28, 8, 0, 0, 0) + b"HLLMCHL1" + worker)
        seen.extend([first, recv_exact(conn, 33)])
        conn.sendall(struct.pack("<Q4B", 28, 8, 0, 0, 0) + bytes(24))   # a bad worker proof
        recv_exact(conn, 1)

    with FakeServer(serve) as srv, pytest.raises(AuthError, match="could not prove it knows the token"):
        RpcBackend(srv.endpoint, token=TOKEN)
    first, second = seen
    assert first[:9] == struct.pack("<BQ", 14, 24) and first[9:17] == b"HLLMTOK1"
    assert second[9:] == _hmac(b"client", first[17:], worker)
    assert TOKEN.encode() not in first + second


def test_token_from_environment_and_empty_token(tmp_path) -> None:
    with start_worker(log_dir=tmp_path, env={"HYBRIDLLM_RPC_TOKEN": "from-env"}) as srv:
        with pytest.raises(AuthError):
            RpcBackend(srv.endpoint, token=TOKEN)
        with RpcBackend(srv.endpoint, token="from-env") as be:
            assert be.memory()[1] > 0
    proc = subprocess.run([sys.executable, "-m", "hybridllm.cli", "worker", "--token", ""],
                          check=False, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0, proc.stderr
    assert proc.stderr.strip().splitlines() == ["hybridllm worker: error: --token must not be empty"]
