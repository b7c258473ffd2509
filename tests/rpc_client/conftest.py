"""Fixtures: our worker and llama.cpp's rpc-server as subprocesses, and RpcBackends on them."""
from __future__ import annotations

from collections.abc import Iterator

import pytest

from hybridllm.rpc.client_backend import RpcBackend
from hybridllm.testing.procs import ServerProc, start_peer_server, start_worker


@pytest.fixture(scope="session")
def ours(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    """`python -m hybridllm.cli worker` (subprocess)."""
    with start_worker(log_dir=tmp_path_factory.mktemp("ours")) as srv:
        yield srv


@pytest.fixture(scope="session")
def llama_server(peer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    """llama.cpp's own rpc-server (serves one client at a time: every test closes its backend)."""
    with start_peer_server(threads=2, log_dir=tmp_path_factory.mktemp("peer")) as srv:
        yield srv


@pytest.fixture(params=["ours", "peer"])
def server(request: pytest.FixtureRequest) -> ServerProc:
    return request.getfixturevalue("ours" if request.param == "ours" else "llama_server")


@pytest.fixture
def backend(server: ServerProc) -> Iterator[RpcBackend]:
    be = RpcBackend(server.endpoint, timeout=60)
    yield be
    be.close()
