"""Conformance fixtures: reference servers (llama.cpp's rpc-server) and candidate servers (our worker).

The same llama.cpp master (the peer's `Llama`, in a subprocess) runs a model twice, once against the
reference servers and once against the candidate servers, and the logits are compared.
HYBRIDLLM_CONFORMANCE_CANDIDATE=peer makes the candidate llama.cpp's rpc-server too: a self-check of the
harness (everything must pass, with error 0). Missing peer or a worker that does not start: tests fail.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from conformance_harness import CANDIDATE, REL_TOL, REPORT, Servers


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("synth-models")


@pytest.fixture(scope="module")
def reference(peer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    servers = Servers("peer", tmp_path_factory.mktemp("ref-logs"))
    yield servers
    servers.close()


@pytest.fixture(scope="module")
def candidate(peer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    servers = Servers(CANDIDATE, tmp_path_factory.mktemp("cand-logs"))
    yield servers
    servers.close()


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:  # noqa: ANN001
    if REPORT:
        terminalreporter.section(f"conformance: candidate={CANDIDATE}, tolerance {REL_TOL:g}")
        for line in REPORT:
            terminalreporter.write_line(line)
