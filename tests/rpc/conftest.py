"""Fixtures for the RPC worker tests: an in-process worker (2 CPU devices), clients, close checks."""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import pytest
from rpc_helpers import HOST, check_good_client

from hybridllm.backends.numpy_backend import NumpyBackend
from hybridllm.rpc.client import RpcClient
from hybridllm.rpc.server import ServerThread


@pytest.fixture(scope="module")
def worker() -> Iterator[ServerThread]:
    """Our worker in this process with two CPU devices (device 1 is for device-index tests)."""
    with ServerThread([NumpyBackend(), NumpyBackend()]) as st:
        yield st


@pytest.fixture
def connect(worker: ServerThread) -> Iterator[Callable[..., RpcClient]]:
    clients: list[RpcClient] = []

    def make(port: int | None = None, hello: bool = True) -> RpcClient:
        c = RpcClient(HOST, port or worker.port, timeout=30, hello=hello)
        clients.append(c)
        return c
    yield make
    for c in clients:
        c.close()


@pytest.fixture
def expect_close(worker: ServerThread, caplog: pytest.LogCaptureFixture) -> Callable[..., None]:
    """`expect_close(client, reason_substring)`: the connection is closed with ONE log line naming the
    reason, and a second client on the same server still works."""
    caplog.set_level(logging.INFO, logger="hybridllm.rpc")

    def check(c: RpcClient, reason: str) -> None:
        assert c.is_closed(timeout=10), "the worker did not close the connection"
        lines = [r.getMessage() for r in caplog.records if "closed:" in r.getMessage()]
        assert len(lines) == 1, lines
        assert reason.lower() in lines[0].lower(), lines[0]
        check_good_client(worker.port)
        caplog.clear()
    return check
