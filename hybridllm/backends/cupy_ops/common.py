"""Shared helpers for GPU op builders: typed kernel arguments, pointers, grids, checks."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ...ggml.tensor import Tensor
from ...ggml.types import GGMLType, TRAITS, type_name
from ..base import Unsupported

if TYPE_CHECKING:
    from ..cupy_backend import CupyBackend, Launch

# Kernel argument constructors: the kernels' C types, exactly (a wrong width is a silent bug on a GPU).
P = np.uint64     # any pointer
I32 = np.int32    # int
I64 = np.int64    # i64 (strides, byte offsets, counts)
F32 = np.float32  # float

NULL = P(0)

# Element types the elementwise kernels load/store (ggml type ids, see common.cuh T_*).
FLOAT_TYPES = (GGMLType.F32, GGMLType.F16, GGMLType.BF16)
ELEM_SIZE = {GGMLType.F32: 4, GGMLType.F16: 2, GGMLType.BF16: 2, GGMLType.I32: 4}

MAX_GRID_YZ = 65535


SCRATCH_CHUNK = 1 << 20
SCRATCH_ALIGN = 256


class BuildCtx:
    """What builders need from the backend while preparing one graph: kernels, pointers, plan-owned scratch
    memory, and the int8 copies of matmul inputs (q8, see kernels/q8.cuh) made so far."""

    def __init__(self, backend: CupyBackend) -> None:
        self.backend = backend
        self.warp = backend.rt.warp
        self.err_ptr = P(backend.err_ptr)
        self.checks = False  # set when a launch validates indices
        self.keep: list[Any] = []          # scratch allocations the plan must own
        self._chunk: tuple[int, int, int] | None = None  # (base pointer, used, size)
        self.q8: dict[tuple[int, int, int], Any] = {}   # storage key -> Q8Buf holding its quantized copy
        self.q8_wanted: set[tuple[int, int, int]] = set()  # storage keys some matmul will read as q8
        self.routes: dict[int, tuple[int, int, int]] = {}  # id(ids) -> MoE routing lists (counts, lists, cap)
        self.f16: dict[tuple[int, int, int], tuple[int, int]] = {}  # storage key -> f16 copy (pointer, K8)
        self.f16_slots: list[list] = []   # ring of reusable f16 buffers: [pointer, size, key]
        self.f16_next = 0

    def scratch(self, nbytes: int) -> int:
        """Device memory that lives as long as the plan (bump-allocated from 1 MiB chunks)."""
        nbytes = max(SCRATCH_ALIGN, (nbytes + SCRATCH_ALIGN - 1) // SCRATCH_ALIGN * SCRATCH_ALIGN)
        if self._chunk is None or self._chunk[1] + nbytes > self._chunk[2]:
            size = max(SCRATCH_CHUNK, nbytes)
            mem = self.backend.rt.alloc(size)
            if mem is None:
                raise Unsupported(f"cannot allocate {size} bytes of scratch memory on {self.backend.name}")
            self.keep.append(mem)
            self._chunk = (self.backend.rt.pointer(mem), 0, size)
        base, used, size = self._chunk
        self._chunk = (base, used + nbytes, size)
        return base + used

    def counters(self, n: int) -> int:
        """n int32 counters at zero, for kernels whose last block resets them (common.cuh last_block_done)."""
        ptr = self.scratch(4 * n)
        self.backend.rt.memset(ptr, 0, 4 * n)
        return ptr

    def fn(self, module: str, name: str) -> Any:
        return self.backend.rt.function(module, name)

    def ptr(self, t: Tensor | None) -> np.uint64:
        """Device address of a tensor's data (NULL for a missing optional source)."""
        if t is None:
            return NULL
        buf = t.buffer
        if buf is None or getattr(buf, "ptr", None) is None or buf.backend is not self.backend \
                or getattr(buf, "array", None) is None:
            raise Unsupported(f"tensor {t.name!r} has no storage on {self.backend.name}")
        if t.offset < 0 or t.offset + t.nbytes > buf.size:
            raise Unsupported(f"tensor {t.name!r} lies outside its buffer")
        return P(buf.ptr + t.offset)  # type: ignore[attr-defined]

    def error_code(self, node: Tensor, what: str) -> np.int32:
        self.checks = True
        return I32(self.backend.error_code(node, what))


def mma_ok(ctx: BuildCtx) -> bool:
    """Tensor-core tiles (kernels/mma.cu): 32-wide warps on CUDA, or the emulator (emulated fragments)."""
    return ctx.warp == 32 and not getattr(ctx.backend.rt, "is_hip", False)


def storage_key(t: Tensor) -> tuple[int, int, int]:
    """Identity of the bytes a tensor covers (views of the same storage share it)."""
    return (id(t.buffer), int(t.offset), int(t.nbytes))


def require(cond: bool, node: Tensor, what: str) -> None:
    if not cond:
        raise Unsupported(f"{node.op.name} {node.name!r}: {what}")


def src(node: Tensor, i: int) -> Tensor:
    s = node.src_at(i)
    require(s is not None, node, f"missing source {i}")
    return s  # type: ignore[return-value]


def ne_args(t: Tensor) -> tuple[np.int32, ...]:
    return tuple(I32(n) for n in t.ne)


def nb_args(t: Tensor) -> tuple[np.int64, ...]:
    return tuple(I64(n) for n in t.nb)


def row_grid(nrows: int) -> tuple[int, int]:
    """(gy, gz) so that gy * gz >= nrows with gy <= 65535 (rows are blockIdx.y + blockIdx.z * gridDim.y)."""
    gy = max(1, min(nrows, MAX_GRID_YZ))
    return gy, (nrows + gy - 1) // gy


def elem_threads(ne0: int, warp: int, cap: int = 256) -> int:
    """Threads per block along dim 0: a multiple of the warp, no more than needed, at most `cap`."""
    n = (ne0 + warp - 1) // warp * warp
    return max(warp, min(cap, n))


def check_float(node: Tensor, *ts: Tensor) -> None:
    for t in ts:
        require(t.type in FLOAT_TYPES, node, f"type {type_name(t.type)} of {t.name!r} is not f32/f16/bf16")


def dense_rows(node: Tensor, t: Tensor) -> None:
    tr = TRAITS[t.type]
    require(t.nb[0] == tr.type_size, node, f"rows of {t.name!r} are not dense")
    require(t.ne[0] % tr.blck_size == 0, node, f"ne0 of {t.name!r} is not a whole number of blocks")


def launch(fn: Any, grid: tuple[int, ...], block: tuple[int, ...], args: tuple, smem: int = 0) -> Launch:
    from ..cupy_backend import Launch

    g = tuple(grid) + (1,) * (3 - len(grid))
    b = tuple(block) + (1,) * (3 - len(block))
    if min(g) < 1 or max(g[1:]) > MAX_GRID_YZ or g[0] >= 2**31:
        raise Unsupported(f"grid {g} out of range")
    return Launch(fn, g, b, args, smem)  # type: ignore[arg-type]
