"""Fixtures for the numerics tests: graphs computed by the real ggml CPU library (the peer's, AVX2 build)
and by our NumpyBackend, compared bit for bit."""
from __future__ import annotations

import os

import numpy as np
import pytest

from hybridllm.testing.ggml_ref import GGMLGraph

os.environ.setdefault("GGML_CPU_DISABLE_FUSION", "1")   # keep RMS_NORM outputs materialized (read once)


@pytest.fixture
def g(peer):
    """A fresh ggml context (64 MiB) on the peer's libggml; closed after the test."""
    graph = GGMLGraph(64 << 20)
    yield graph
    graph.close()


@pytest.fixture
def rng():
    return np.random.default_rng(20240611)
