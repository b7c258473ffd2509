"""Backends: where graphs run. `make_backend("cpu" | "cuda:N" | "rocm:N")` is the one way to name a device."""
from __future__ import annotations

import re

from .base import Backend

__all__ = ["Backend", "DeviceError", "make_backend"]


class DeviceError(ValueError):
    """A device name that is malformed or not usable here (one-line message)."""


def make_backend(name: str, mem_limit: int | None = None) -> Backend:
    """The backend for a device name: `cpu` (numpy + numba) or `cuda:N` / `rocm:N` (CuPy + our kernels)."""
    kind = name.strip().lower()
    if kind == "cpu":
        from .numpy_backend import NumpyBackend
        return NumpyBackend(mem_limit=mem_limit)
    m = re.fullmatch(r"(cuda|rocm)(?::(\d+))?", kind)
    if m is None:
        raise DeviceError(f"unknown device {name!r} (expected cpu, cuda:N or rocm:N)")
    try:
        import cupy
    except ImportError:
        extra = "cuda12" if m.group(1) == "cuda" else "rocm"
        raise DeviceError(f"device {name!r} needs CuPy: pip install 'hybridllm[{extra}]'") from None
    index = int(m.group(2) or 0)
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CuPy raises its own runtime error types when no driver is present
        raise DeviceError(f"device {name!r}: no GPU runtime ({exc})") from None
    if index >= count:
        raise DeviceError(f"device {name!r}: only {count} GPU(s) present")
    if (m.group(1) == "rocm") != bool(cupy.cuda.runtime.is_hip):
        raise DeviceError(f"device {name!r}: this CuPy build is for {'ROCm' if cupy.cuda.runtime.is_hip else 'CUDA'}")
    from .cupy_backend import CupyBackend
    return CupyBackend(device=index, mem_limit=mem_limit)
