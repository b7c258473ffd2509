"""The CPU backend: device memory is numpy byte arrays, ops are numpy (with numba for hot kernels)."""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from ..ggml.tensor import Tensor
from .base import Backend, Buffer, Unsupported, nodes_to_run
from .numpy_ops import OPS, Kernel, load_all


class NumpyBuffer(Buffer):
    __slots__ = ("array",)

    def __init__(self, backend: Backend, size: int, base: int | None = None) -> None:
        array = np.empty(size, dtype=np.uint8)  # first: a failed allocation takes no address space
        super().__init__(backend, size, Backend._new_base(size) if base is None else base)
        self.array: np.ndarray | None = array


class NumpyPlan:
    __slots__ = ("kernels",)

    def __init__(self, kernels: list[Kernel]) -> None:
        self.kernels = kernels

    def run(self) -> None:
        for k in self.kernels:
            k()


def _host_memory() -> tuple[int, int]:
    try:
        pages, avail = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_AVPHYS_PAGES")
        page = os.sysconf("SC_PAGE_SIZE")
        return avail * page, pages * page
    except (ValueError, OSError):
        return (8 << 30, 8 << 30)


class NumpyBackend(Backend):
    name = "CPU"
    alignment = 32

    def __init__(self, mem_limit: int | None = None) -> None:
        super().__init__()
        load_all()
        self.mem_limit = mem_limit
        self.allocated = 0

    def memory(self) -> tuple[int, int]:
        free, total = _host_memory()
        if self.mem_limit is not None:
            total = min(total, self.mem_limit)
            free = max(0, min(free, total - self.allocated))
        return free, total

    def alloc_buffer(self, size: int) -> NumpyBuffer | None:
        if self.mem_limit is not None and self.allocated + size > self.mem_limit:
            return None
        try:
            buf = NumpyBuffer(self, size)
        except (MemoryError, ValueError):
            return None
        self.allocated += size
        return buf

    def free_buffer(self, buf: Buffer) -> None:
        if not buf.freed:
            buf.freed = True
            self.allocated -= buf.size
            buf.array = None  # type: ignore[attr-defined]

    def _arr(self, buf: Buffer) -> np.ndarray:
        arr = getattr(buf, "array", None)
        if arr is None:
            raise ValueError("buffer is freed or not a CPU buffer")
        return arr

    def memset(self, buf: Buffer, offset: int, size: int, value: int) -> None:
        self._arr(buf)[offset:offset + size] = value

    def set(self, buf: Buffer, offset: int, data: bytes | bytearray | memoryview) -> None:
        src = np.frombuffer(data, dtype=np.uint8)
        self._arr(buf)[offset:offset + src.size] = src

    def get(self, buf: Buffer, offset: int, size: int) -> bytes:
        return self._arr(buf)[offset:offset + size].tobytes()

    def copy(self, src: Buffer, src_off: int, dst: Buffer, dst_off: int, size: int) -> bool:
        if not isinstance(src, NumpyBuffer) or src.array is None:
            return False
        self._arr(dst)[dst_off:dst_off + size] = src.array[src_off:src_off + size]
        return True

    def prepare(self, nodes: Sequence[Tensor]) -> NumpyPlan:
        kernels: list[Kernel] = []
        for node in nodes_to_run(nodes):
            builder = OPS.get(node.op)
            if builder is None:
                raise Unsupported(f"op {node.op.name} (node {node.name!r}) is not implemented on CPU")
            kernels.append(builder(node))
        return NumpyPlan(kernels)
