"""The one IR: a ggml tensor node, as the master builds it and as the worker rebuilds it from the wire.

Storage is (buffer, offset): a backend Buffer and a byte offset in it. On the wire the same thing is an
absolute `data` address; the worker maps it back (rpc/worker.py) and the master's allocator assigns it.
"""
from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Any, Sequence

from .types import GGMLOp, GGMLType, TRAITS, TensorFlag, default_strides, nbytes

if TYPE_CHECKING:
    from ..backends.base import Buffer

Shape4 = tuple[int, int, int, int]


class Tensor:
    """A ggml tensor: type, shape ne, byte strides nb, producing op with its 64-byte params, sources."""

    __slots__ = ("type", "ne", "nb", "op", "op_params", "flags", "src", "view_src", "view_offs",
                 "buffer", "offset", "name", "id", "extra")

    def __init__(self, type: int, ne: Sequence[int], nb: Sequence[int] | None = None, *,
                 op: int = GGMLOp.NONE, op_params: bytes = bytes(64), flags: int = 0,
                 src: Sequence[Tensor | None] = (), view_src: Tensor | None = None, view_offs: int = 0,
                 buffer: Buffer | None = None, offset: int = 0, name: str = "") -> None:
        ne4 = tuple(ne) + (1,) * (4 - len(ne))
        self.type = GGMLType(type)
        self.ne: Shape4 = ne4  # type: ignore[assignment]
        self.nb: Shape4 = tuple(nb) if nb is not None else default_strides(type, ne4)  # type: ignore
        self.op = GGMLOp(op)
        self.op_params = bytes(op_params).ljust(64, b"\0")
        self.flags = int(flags)
        self.src: list[Tensor | None] = list(src)
        self.view_src = view_src
        self.view_offs = view_offs
        self.buffer = buffer
        self.offset = offset
        self.name = name
        self.id = 0           # wire id (client tensor address); 0 when built locally
        self.extra: Any = None  # backend-private cache (e.g. a prepared view)

    # --- shape helpers -------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        return nbytes(self.type, self.ne, self.nb)

    @property
    def nelements(self) -> int:
        n0, n1, n2, n3 = self.ne
        return n0 * n1 * n2 * n3

    @property
    def nrows(self) -> int:
        return self.ne[1] * self.ne[2] * self.ne[3]

    @property
    def is_quantized(self) -> bool:
        return TRAITS[self.type].quantized

    @property
    def is_contiguous(self) -> bool:
        return self.nb == default_strides(self.type, self.ne)

    @property
    def computes(self) -> bool:
        return bool(self.flags & TensorFlag.COMPUTE)

    def srcs(self) -> list[Tensor | None]:
        return self.src

    def src_at(self, i: int) -> Tensor | None:
        return self.src[i] if i < len(self.src) else None

    # --- op params -----------------------------------------------------------------------------
    def param_i32(self, i: int) -> int:
        return struct.unpack_from("<i", self.op_params, 4 * i)[0]

    def param_f32(self, i: int) -> float:
        return struct.unpack_from("<f", self.op_params, 4 * i)[0]

    def __repr__(self) -> str:
        return (f"Tensor({self.name!r}, {self.type.name}, ne={self.ne}, op={self.op.name}, "
                f"src={[s.name if s is not None else None for s in self.src]})")


def pack_params(*values: int | float) -> bytes:
    """Pack op params the way ggml stores them: i32 for ints, f32 for floats, 4 bytes each."""
    out = bytearray()
    for v in values:
        out += struct.pack("<f", v) if isinstance(v, float) else struct.pack("<i", v)
    return bytes(out).ljust(64, b"\0")


def flag_compute(nodes: Sequence[Tensor]) -> None:
    for n in nodes:
        n.flags |= TensorFlag.COMPUTE
