"""The numpy backend's op registry: one builder per ggml op.

A builder takes a node whose tensors are bound to NumpyBuffers and returns a zero-argument closure that
computes it, with every view precomputed (so replaying a graph costs one call per node). Builders raise
`Unsupported` for type/shape combinations they do not handle. Modules register on import.
"""
from __future__ import annotations

from typing import Callable

from ...ggml.tensor import Tensor
from ...ggml.types import GGMLOp

Kernel = Callable[[], None]
Builder = Callable[[Tensor], Kernel]

OPS: dict[GGMLOp, Builder] = {}


def register(*ops: GGMLOp) -> Callable[[Builder], Builder]:
    def deco(fn: Builder) -> Builder:
        for op in ops:
            OPS[op] = fn
        return fn
    return deco


def load_all() -> None:
    """Import every op module so that each registers its builders."""
    from . import (  # noqa: F401
        elementwise, norm, matmul, rows, copy, rope, attention, reduce, misc,
    )
