"""Fixtures for op tests: graphs built and run by the real ggml CPU library, compared with ours."""
from __future__ import annotations

import os

import numpy as np
import pytest

from hybridllm.testing.ggml_ref import GGMLGraph

# ggml reads this once, when its CPU backend first initializes: keep RMS_NORM outputs materialized
os.environ.setdefault("GGML_CPU_DISABLE_FUSION", "1")


@pytest.fixture
def g(peer):
    """A fresh ggml context (16 MiB) on the peer's libggml; closed after the test."""
    graph = GGMLGraph(16 << 20)
    yield graph
    graph.close()


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
