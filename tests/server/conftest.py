"""Fixtures for the HTTP server tests: a tiny synthetic GGUF and `hybridllm serve` processes on it."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from hybridllm.testing.synth import write_model

from srv_helpers import Serve, start_serve


@pytest.fixture(scope="session")
def synth_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer llama with random Q8_0 weights and a 512-token SPM vocab (no chat template: chatml)."""
    return write_model(tmp_path_factory.mktemp("models") / "synth-llama.gguf", "llama", "q8_0")


@pytest.fixture(scope="session")
def server(synth_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    """One slot, 1024 tokens of context."""
    srv = start_serve(synth_model, ["--parallel", "1", "--ctx", "1024"], tmp_path_factory.mktemp("logs"))
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def server2(synth_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    """Two slots sharing 1024 tokens of KV cache."""
    srv = start_serve(synth_model, ["--parallel", "2", "--ctx", "1024"], tmp_path_factory.mktemp("logs"))
    yield srv
    srv.stop()


@pytest.fixture
def log_dir(tmp_path: Path) -> Path:
    return tmp_path / "logs"
