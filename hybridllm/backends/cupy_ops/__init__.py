"""The GPU backend's op registry: one builder per ggml op, like numpy_ops.

A builder takes a node bound to CupyBuffers and a BuildCtx and returns the kernel launches computing it,
with every pointer, shape and stride already in the argument tuples (so a plan replays without Python
work per op, and can be captured into a CUDA graph). Builders raise `Unsupported` for type/shape
combinations they do not handle.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from ...ggml.tensor import Tensor
from ...ggml.types import GGMLOp

if TYPE_CHECKING:
    from ..cupy_backend import Launch
    from .common import BuildCtx

Builder = Callable[[Tensor, "BuildCtx"], "list[Launch]"]

OPS: dict[GGMLOp, Builder] = {}


def register(*ops: GGMLOp) -> Callable[[Builder], Builder]:
    def deco(fn: Builder) -> Builder:
        for op in ops:
            OPS[op] = fn
        return fn
    return deco


def load_all() -> None:
    """Import every op module so that each registers its builders."""
    from . import attention, copy, elementwise, matmul, norm, reduce, rope, rows  # noqa: F401


from .common import BuildCtx  # noqa: E402
from .norm import build_rms_norm_mul, fusable_rms_norm_mul  # noqa: E402

__all__ = ["OPS", "register", "load_all", "BuildCtx", "build_rms_norm_mul", "fusable_rms_norm_mul"]
