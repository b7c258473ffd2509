"""The GPU backend: device memory through CuPy, ops as our own CUDA/HIP kernels (kernels/).

`prepare(nodes)` turns a graph into a flat list of kernel launches whose arguments (raw device pointers,
shapes, strides) are computed once; `Plan.run()` replays them. From the second run on, a plan is
captured into a CUDA graph and replayed with one call, so a decode step costs no Python per op.

Everything device-specific goes through a small runtime object (`CupyRuntime` here); tests plug in a
host emulator with the same surface to run the very same kernels and launch lists on a CPU.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Protocol, Sequence

import numpy as np

from ..ggml.tensor import Tensor
from ..ggml.types import GGMLOp, TensorFlag
from .base import Backend, Buffer, Unsupported, nodes_to_run

try:
    from .base import ComputeError
except ImportError:  # older base.py
    class ComputeError(RuntimeError):  # type: ignore[no-redef]
        """A graph failed at run time because of its data; the message names the node."""


class Launch(NamedTuple):
    fn: Any                        # a runtime kernel handle
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    args: tuple                    # numpy scalars: uint64 pointers, int32, int64, float32
    smem: int = 0


class Runtime(Protocol):
    """What the backend needs from a device. Pointers are plain ints."""

    name: str
    warp: int

    def alloc(self, size: int) -> Any | None: ...          # an array-like owning the memory, or None
    def pointer(self, mem: Any) -> int: ...
    def memory(self) -> tuple[int, int]: ...
    def upload(self, ptr: int, data: np.ndarray) -> None: ...
    def download(self, ptr: int, size: int) -> bytes: ...
    def memset(self, ptr: int, value: int, size: int) -> None: ...
    def copy(self, dst: int, src: int, size: int) -> None: ...
    def function(self, module: str, name: str) -> Any: ...
    def run(self, launches: Sequence[Launch]) -> None: ...
    def capture(self, launches: Sequence[Launch]) -> Callable[[], None] | None: ...
    def synchronize(self) -> None: ...


class CupyRuntime:
    """One CUDA/ROCm device through CuPy; all work goes to one non-blocking stream, in order."""

    def __init__(self, device: int = 0) -> None:
        import cupy
        from cupy.cuda import runtime

        from .kernel_loader import CupyKernels

        self._cp, self._rt = cupy, runtime
        self.device = cupy.cuda.Device(device)
        self.device.use()
        self.stream = cupy.cuda.Stream(non_blocking=True)
        self.warp = int(self.device.attributes.get("WarpSize", 32))
        self.n_sm = int(self.device.attributes.get("MultiProcessorCount", 132))  # sizes split-key grids
        self.is_hip = bool(runtime.is_hip)
        self.name = f"{'ROCm' if self.is_hip else 'CUDA'}{device}"
        self.kernels = CupyKernels(self.warp)

    def alloc(self, size: int) -> Any | None:
        cp = self._cp
        try:
            with self.device:  # CUDA's current device is per thread; callers may be on any thread
                mem = cp.cuda.Memory(size) if size else None  # plain cudaMalloc, not CuPy's pool
        except Exception:  # out of memory is a CUDARuntimeError / OutOfMemoryError
            return None
        if mem is None:
            return cp.empty(0, dtype=cp.uint8)
        return cp.ndarray((size,), dtype=cp.uint8, memptr=cp.cuda.MemoryPointer(mem, 0))

    def pointer(self, mem: Any) -> int:
        return int(mem.data.ptr)

    def memory(self) -> tuple[int, int]:
        with self.device:
            free, total = self._rt.memGetInfo()
        return int(free), int(total)

    def upload(self, ptr: int, data: np.ndarray) -> None:
        # pageable source: staged before the call returns, ordered after earlier kernels on the stream
        with self.device:
            self._rt.memcpyAsync(ptr, data.ctypes.data, data.nbytes, self._rt.memcpyHostToDevice,
                                 self.stream.ptr)

    def download(self, ptr: int, size: int) -> bytes:
        out = np.empty(size, dtype=np.uint8)
        with self.device:
            self._rt.memcpyAsync(out.ctypes.data, ptr, size, self._rt.memcpyDeviceToHost, self.stream.ptr)
            self.stream.synchronize()
        return out.tobytes()

    def memset(self, ptr: int, value: int, size: int) -> None:
        with self.device:
            self._rt.memsetAsync(ptr, value, size, self.stream.ptr)

    def copy(self, dst: int, src: int, size: int) -> None:
        with self.device:
            self._rt.memcpyAsync(dst, src, size, self._rt.memcpyDeviceToDevice, self.stream.ptr)

    def function(self, module: str, name: str) -> Any:
        with self.device:  # modules load into the current device's context
            return self.kernels.function(module, name)

    def run(self, launches: Sequence[Launch]) -> None:
        s = self.stream
        with self.device:
            for fn, grid, block, args, smem in launches:
                fn(grid, block, args, shared_mem=smem, stream=s)

    def capture(self, launches: Sequence[Launch]) -> Callable[[], None] | None:
        if self.is_hip:  # CuPy has no stream capture on HIP
            return None
        s, dev = self.stream, self.device
        with dev:
            s.begin_capture()
            try:
                for fn, grid, block, args, smem in launches:
                    fn(grid, block, args, shared_mem=smem, stream=s)
            finally:
                graph = s.end_capture()

        def replay() -> None:
            with dev:
                graph.launch(s)
        return replay

    def synchronize(self) -> None:
        self.stream.synchronize()


class CupyBuffer(Buffer):
    """One device allocation: `array` is the uint8 array owning it, `ptr` its device address."""

    __slots__ = ("array", "ptr")

    def __init__(self, backend: Backend, size: int, base: int, array: Any, ptr: int) -> None:
        super().__init__(backend, size, base)
        self.array = array
        self.ptr = ptr


class CupyPlan:
    """A prepared graph: kernel launches with bound pointers; captured into a CUDA graph on reuse."""

    __slots__ = ("backend", "launches", "checks", "scratch", "_graph", "_runs", "_no_graph")

    def __init__(self, backend: CupyBackend, launches: list[Launch], checks: bool, scratch: list | None = None) -> None:
        self.backend = backend
        self.launches = launches
        self.scratch = scratch or []  # device memory the launches use besides the graph's tensors
        self.checks = checks          # some kernel validates indices (read back after the run)
        self._graph: Callable[[], None] | None = None
        self._runs = 0
        self._no_graph = not backend.graphs

    def capture(self) -> bool:
        """Capture now; False when this runtime cannot (the plan keeps running launch by launch)."""
        if self._graph is None and not self._no_graph and self.launches:
            try:
                self._graph = self.backend.rt.capture(self.launches)
            except Exception:
                self._graph = None
            self._no_graph = self._graph is None
        return self._graph is not None

    def run(self) -> None:
        if self._graph is None and self._runs >= 1 and not self._no_graph:
            self.capture()
        if self._graph is not None:
            self._graph()
        else:
            self.backend.rt.run(self.launches)
        self._runs += 1
        if self.checks:
            self.backend._err_pending = True


class CupyBackend(Backend):
    """A GPU as a ggml backend. `runtime` defaults to CuPy on `device`."""

    alignment = 128

    def __init__(self, device: int = 0, runtime: Runtime | None = None, graphs: bool = True,
                 mem_limit: int | None = None) -> None:
        super().__init__()
        from .cupy_ops import load_all

        load_all()
        self.rt: Runtime = runtime if runtime is not None else CupyRuntime(device)
        self.name = self.rt.name
        self.graphs = graphs
        self.mem_limit = mem_limit
        self.allocated = 0
        self._err_mem = self.rt.alloc(4)
        if self._err_mem is None:
            raise RuntimeError("cannot allocate 4 bytes of device memory")
        self.err_ptr = self.rt.pointer(self._err_mem)
        self.rt.memset(self.err_ptr, 0, 4)
        self._err_pending = False
        self._err_names: dict[int, str] = {}

    # --- memory --------------------------------------------------------------------------------
    def memory(self) -> tuple[int, int]:
        free, total = self.rt.memory()
        if self.mem_limit is not None:
            total = min(total, self.mem_limit)
            free = max(0, min(free, total - self.allocated))
        return free, total

    def alloc_buffer(self, size: int) -> CupyBuffer | None:
        if self.mem_limit is not None and self.allocated + size > self.mem_limit:
            return None
        mem = self.rt.alloc(size)
        if mem is None:
            return None
        self.allocated += size
        return CupyBuffer(self, size, self._new_base(size), mem, self.rt.pointer(mem) if size else 0)

    def free_buffer(self, buf: Buffer) -> None:
        if not buf.freed and isinstance(buf, CupyBuffer):
            self.rt.synchronize()  # kernels still queued may use it
            buf.freed = True
            self.allocated -= buf.size
            buf.array = None

    def _ptr(self, buf: Buffer, offset: int, size: int) -> int:
        if not isinstance(buf, CupyBuffer) or buf.array is None or buf.backend is not self:
            raise ValueError("buffer is freed or not on this device")
        if offset < 0 or size < 0 or offset + size > buf.size:
            raise ValueError(f"range {offset}+{size} outside buffer of {buf.size} bytes")
        return buf.ptr + offset

    def memset(self, buf: Buffer, offset: int, size: int, value: int) -> None:
        if size:
            self.rt.memset(self._ptr(buf, offset, size), value & 0xFF, size)

    def set(self, buf: Buffer, offset: int, data: bytes | bytearray | memoryview) -> None:
        src = np.frombuffer(data, dtype=np.uint8)
        if src.size:
            self.rt.upload(self._ptr(buf, offset, src.size), src)

    def get(self, buf: Buffer, offset: int, size: int) -> bytes:
        out = self.rt.download(self._ptr(buf, offset, size), size) if size else b""
        self.check_errors()
        return out

    def copy(self, src: Buffer, src_off: int, dst: Buffer, dst_off: int, size: int) -> bool:
        if not isinstance(src, CupyBuffer) or src.backend is not self or src.array is None:
            return False
        if size:
            self.rt.copy(self._ptr(dst, dst_off, size), self._ptr(src, src_off, size), size)
        return True

    def synchronize(self) -> None:
        self.rt.synchronize()
        self.check_errors()

    def check_errors(self) -> None:
        """Raise ComputeError for an index a kernel found out of range since the last check."""
        if not self._err_pending:
            return
        self._err_pending = False
        code = int(np.frombuffer(self.rt.download(self.err_ptr, 4), dtype=np.int32)[0])
        if code:
            self.rt.memset(self.err_ptr, 0, 4)
            raise ComputeError(self._err_names.get(code, f"device error {code}"))

    def error_code(self, node: Tensor, what: str) -> int:
        code = len(self._err_names) + 1
        self._err_names[code] = f"{node.op.name} {node.name!r}: {what}"
        return code

    # --- compute -------------------------------------------------------------------------------
    def prepare(self, nodes: Sequence[Tensor]) -> CupyPlan:
        from .cupy_ops import OPS, BuildCtx, fusion

        ctx = BuildCtx(self)
        run = [n for n in nodes_to_run(nodes) if n.nelements > 0]

        def build_one(node: Tensor, ctx: BuildCtx) -> list[Launch]:
            builder = OPS.get(node.op)
            if builder is None:
                raise Unsupported(f"op {node.op.name} (node {node.name!r}) is not implemented on {self.name}")
            return builder(node, ctx)

        launches = fusion.plan(nodes, run, ctx, build_one)
        return CupyPlan(self, launches, ctx.checks, ctx.keep)


def is_output(t: Tensor) -> bool:
    return bool(t.flags & TensorFlag.OUTPUT)


__all__ = ["CupyBackend", "CupyBuffer", "CupyPlan", "CupyRuntime", "Launch", "Runtime", "ComputeError",
           "GGMLOp", "is_output"]
