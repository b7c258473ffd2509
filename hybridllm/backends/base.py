"""The Backend interface shared by the worker (graphs from the wire) and the master (graphs it builds).

A backend owns device memory in Buffers and runs graphs whose tensors point into those buffers.
Running is two-step: `prepare(nodes)` validates every node and binds it to its memory once, returning a
Plan; `Plan.run()` executes it, as often as needed (GRAPH_RECOMPUTE, decode steps). Buffers never move
while they live, so a Plan stays valid until one of the buffers it uses is freed.
"""
from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from typing import Protocol, Sequence

from ..ggml.tensor import Tensor
from ..ggml.types import VIEW_OPS


class Unsupported(Exception):
    """A node this backend cannot run (op, type combination or shape); the message names it."""


class ComputeError(RuntimeError):
    """A graph failed at run time because of its data (e.g. a row index out of range); the message says
    which node. The worker closes the connection with this reason instead of crashing."""


class Buffer:
    """A block of device memory. `base` is the address this buffer has on the wire (non-zero, aligned)."""

    __slots__ = ("backend", "size", "base", "freed", "__weakref__")

    def __init__(self, backend: Backend, size: int, base: int) -> None:
        self.backend = backend
        self.size = size
        self.base = base
        self.freed = False

    def __repr__(self) -> str:
        return f"Buffer({self.backend.name}, size={self.size}, base={self.base:#x})"


class Plan(Protocol):
    def run(self) -> None: ...


_ADDRESS_SPACE_ALIGN = 1 << 16
_address_cursor = 1 << 32
_address_lock = threading.Lock()


class Backend(ABC):
    """One device. Subclasses implement memory and op execution; addresses are handed out here."""

    name: str = "backend"
    alignment: int = 32
    max_size: int = (1 << 64) - 1

    def __init__(self) -> None:
        pass

    @staticmethod
    def _new_base(size: int) -> int:
        """A fake, 64 KiB-aligned base address, unique across every backend of this process (a master mixes
        buffers of several devices in one graph), or 0 for an empty buffer, as ggml does. Call it only once
        the memory is really allocated, so failed allocations do not use up address space."""
        global _address_cursor
        if size == 0:
            return 0
        span = (size + _ADDRESS_SPACE_ALIGN - 1) // _ADDRESS_SPACE_ALIGN * _ADDRESS_SPACE_ALIGN
        with _address_lock:
            base = _address_cursor
            _address_cursor += span + _ADDRESS_SPACE_ALIGN  # guard gap: an overrun never lands in a neighbour
        return base

    # --- memory --------------------------------------------------------------------------------
    @abstractmethod
    def memory(self) -> tuple[int, int]:
        """(free, total) bytes."""

    @abstractmethod
    def alloc_buffer(self, size: int) -> Buffer | None:
        """A new buffer of `size` bytes (contents unspecified), or None when it cannot be had."""

    @abstractmethod
    def free_buffer(self, buf: Buffer) -> None: ...

    @abstractmethod
    def memset(self, buf: Buffer, offset: int, size: int, value: int) -> None: ...

    @abstractmethod
    def set(self, buf: Buffer, offset: int, data: bytes | bytearray | memoryview) -> None: ...

    @abstractmethod
    def get(self, buf: Buffer, offset: int, size: int) -> bytes: ...

    def clear(self, buf: Buffer, value: int) -> None:
        self.memset(buf, 0, buf.size, value)

    def copy(self, src: Buffer, src_off: int, dst: Buffer, dst_off: int, size: int) -> bool:
        """Device-side copy; False when this backend cannot copy from `src` (caller falls back)."""
        if src.backend is not self:
            return False
        self.set(dst, dst_off, self.get(src, src_off, size))
        return True

    def alloc_size(self, tensor: Tensor) -> int:
        """Bytes a tensor needs in this backend's buffers (GET_ALLOC_SIZE); plain nbytes by default."""
        return tensor.nbytes

    # --- compute -------------------------------------------------------------------------------
    @abstractmethod
    def prepare(self, nodes: Sequence[Tensor]) -> Plan:
        """Validate and bind `nodes` (execution order); raise Unsupported naming the first bad node."""

    def compute(self, nodes: Sequence[Tensor]) -> None:
        self.prepare(nodes).run()


def nodes_to_run(nodes: Sequence[Tensor]) -> list[Tensor]:
    """The nodes that do work: COMPUTE-flagged, not a pure view (ggml-rpc.md §6.3) and not empty (ggml's
    CPU backend skips nodes with a zero dimension)."""
    return [n for n in nodes if n.computes and n.op not in VIEW_OPS and n.nelements > 0]
