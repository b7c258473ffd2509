"""Device fixtures for the GPU backend tests.

`gpu` runs each test on:
* "cuda": CupyBackend on the real device. Skipped when CuPy or a GPU is missing: these are the only
  tests of the suite allowed to skip.
* "emu32"/"emu64": CupyBackend over tests/gpu/emu (the same kernels compiled for the host, 32- and
  64-wide warps), so kernels and launch lists are exercised without a GPU. Select with
  HYBRIDLLM_GPU_EMU (default "32,64"; "" turns the emulator off).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _params() -> list[str]:
    emu = [w.strip() for w in os.environ.get("HYBRIDLLM_GPU_EMU", "32,64").split(",") if w.strip()]
    return ["cuda"] + [f"emu{w}" for w in emu]


_cache: dict[str, object] = {}


def make_backend(kind: str, graphs: bool = True):
    from hybridllm.backends.cupy_backend import CupyBackend

    if kind == "cuda":
        cp = pytest.importorskip("cupy")
        try:
            n = cp.cuda.runtime.getDeviceCount()
        except Exception:  # no driver / no device
            n = 0
        if n == 0:
            pytest.skip("no CUDA/ROCm device")
        return CupyBackend(0, graphs=graphs)
    from emu.runtime import EmuRuntime, compiler

    if compiler() is None:
        pytest.fail("the kernel emulator needs g++ (apt-get install g++)")
    return CupyBackend(runtime=EmuRuntime(int(kind[3:])), graphs=graphs)


@pytest.fixture(params=_params())
def gpu(request):
    kind = request.param
    if kind not in _cache:
        _cache[kind] = make_backend(kind)
    return _cache[kind]


@pytest.fixture
def rng():
    import numpy as np

    return np.random.default_rng(1234)
