"""ggml-rpc's wire structs (ggml-rpc.md §3, §5): `rpc_tensor` and one frozen dataclass per `rpc_msg_*`.

Each fixed-size message declares its LAYOUT (struct codes, 'T' for an rpc_tensor, 'T10' for rpc_tensor[10])
and gets one precompiled Struct; the three variable-size requests and the raw GET_TENSOR reply decode by
hand, keeping bulk data as memoryviews. protocol.py ties them to command ids.
"""
from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, NamedTuple, TypeVar, Union

from typing_extensions import Self

__all__ = [
    "CONN_CAPS_SIZE",
    "GRAPH_CACHE_LIMIT",
    "HASH_THRESHOLD",
    "MAX_SRC",
    "NULL_TENSOR",
    "PROTO_VERSION",
    "RPC_TENSOR_SIZE",
    "AllocBufferReq",
    "AllocBufferRsp",
    "BufferClearReq",
    "BufferGetBaseReq",
    "BufferGetBaseRsp",
    "Buffers",
    "ByteLike",
    "CommAllreduceReq",
    "CommFreeReq",
    "CommInitReq",
    "CommInitRsp",
    "CopyTensorReq",
    "CopyTensorRsp",
    "DeviceCountReq",
    "DeviceCountRsp",
    "Empty",
    "FreeBufferReq",
    "GetAlignmentReq",
    "GetAlignmentRsp",
    "GetAllocSizeReq",
    "GetAllocSizeRsp",
    "GetDeviceMemoryReq",
    "GetDeviceMemoryRsp",
    "GetMaxSizeReq",
    "GetMaxSizeRsp",
    "GetTensor2dReq",
    "GetTensorReq",
    "GetTensorRsp",
    "GraphComputeReq",
    "GraphRecomputeReq",
    "HelloReq",
    "HelloRsp",
    "InitTensorReq",
    "MemsetTensorReq",
    "Message",
    "ProtocolError",
    "RpcTensor",
    "SetTensor2dReq",
    "SetTensorHashReq",
    "SetTensorHashRsp",
    "SetTensorReq",
    "unpack_tensor",
    "unpack_tensors",
]

PROTO_VERSION = (8, 0, 0)
CONN_CAPS_SIZE = 24
RPC_TENSOR_SIZE = 296
GRAPH_CACHE_LIMIT = 1024               # per-device uid cache size on both sides (§6.2, §6.4)
HASH_THRESHOLD = 10 * 1024 * 1024      # clients use SET_TENSOR_HASH above this (§5.12)
MAX_SRC = 10

Buffers = list[bytes | bytearray | memoryview]
ByteLike = Union[bytes, bytearray, memoryview]


class ProtocolError(Exception):
    """Malformed input from the peer; `reason` is one line. The connection must be closed."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# --- rpc_tensor --------------------------------------------------------------------------------------------

_TENSOR = struct.Struct("<QIQ4I4II64si10QQQQ64si")
assert _TENSOR.size == RPC_TENSOR_SIZE
_TENSOR_FIELDS = 29  # flat values per rpc_tensor


class RpcTensor(NamedTuple):
    """ggml-rpc's `rpc_tensor` (§3). `op_params` and `name` are the raw 64-byte fields (byte-exact)."""

    id: int = 0
    type: int = 0
    buffer: int = 0
    ne: tuple[int, int, int, int] = (1, 1, 1, 1)
    nb: tuple[int, int, int, int] = (0, 0, 0, 0)
    op: int = 0
    op_params: bytes = bytes(64)
    flags: int = 0
    src: tuple[int, ...] = (0,) * MAX_SRC
    view_src: int = 0
    view_offs: int = 0
    data: int = 0
    name: bytes = bytes(64)
    use_count: int = 0

    @property
    def name_str(self) -> str:
        return self.name.split(b"\0", 1)[0].decode("utf-8", "replace")

    def pack(self) -> bytes:
        return _TENSOR.pack(self.id, self.type, self.buffer, *self.ne, *self.nb, self.op, self.op_params,
                            self.flags, *self.src, self.view_src, self.view_offs, self.data, self.name,
                            self.use_count)


NULL_TENSOR = RpcTensor(ne=(0, 0, 0, 0), src=(0,) * MAX_SRC)
_NULL_TENSOR_BYTES = bytes(RPC_TENSOR_SIZE)
_new_tuple = tuple.__new__


def _tensor_from_flat(f: Sequence) -> RpcTensor:
    return _new_tuple(RpcTensor, (f[0], f[1], f[2], tuple(f[3:7]), tuple(f[7:11]), f[11], f[12], f[13],
                                  tuple(f[14:24]), f[24], f[25], f[26], f[27], f[28]))


def unpack_tensor(buf: ByteLike, offset: int = 0) -> RpcTensor:
    return _tensor_from_flat(_TENSOR.unpack_from(buf, offset))


def unpack_tensors(buf: ByteLike, offset: int, count: int) -> list[RpcTensor]:
    """`count` consecutive rpc_tensors; one C-level unpack per tensor, no intermediate copies."""
    view = memoryview(buf)[offset:offset + count * RPC_TENSOR_SIZE]
    return [_new_tuple(RpcTensor, (f[0], f[1], f[2], f[3:7], f[7:11], f[11], f[12], f[13], f[14:24],
                                   f[24], f[25], f[26], f[27], f[28]))
            for f in _TENSOR.iter_unpack(view)]


# --- messages ------------------------------------------------------------------------------------------------

M = TypeVar("M", bound="Message")


class Message:
    """A fixed-layout message. LAYOUT tokens: struct codes, 'T' (rpc_tensor) or 'T10' (rpc_tensor[10])."""

    __slots__ = ()
    LAYOUT: ClassVar[tuple[str, ...]] = ()
    SIZE: ClassVar[int | None] = 0          # exact payload size; None for variable-size messages
    _struct: ClassVar[struct.Struct]

    def __init_subclass__(cls, **kw: object) -> None:
        super().__init_subclass__(**kw)
        if cls.SIZE is None:
            return
        codes = {"T": _TENSOR.format[1:], "T10": _TENSOR.format[1:] * MAX_SRC}
        cls._struct = struct.Struct("<" + "".join(codes.get(t, t) for t in cls.LAYOUT))
        cls.SIZE = cls._struct.size

    @classmethod
    def decode(cls, payload: ByteLike) -> Self:
        flat = cls._struct.unpack(payload)
        values: list[object] = []
        i = 0
        for tok in cls.LAYOUT:
            if tok == "T":
                values.append(_tensor_from_flat(flat[i:i + _TENSOR_FIELDS]))
                i += _TENSOR_FIELDS
            elif tok == "T10":
                values.append(tuple(_tensor_from_flat(flat[i + k * _TENSOR_FIELDS:])
                                    for k in range(MAX_SRC)))
                i += _TENSOR_FIELDS * MAX_SRC
            else:
                values.append(flat[i])
                i += 1
        return cls(*values)  # type: ignore[call-arg]

    def encode(self) -> Buffers:
        """The payload as a list of buffers (large data is passed through, not copied)."""
        flat: list[object] = []
        for tok, value in zip(self.LAYOUT, self._values()):
            if tok == "T":
                flat += _flatten(value)  # type: ignore[arg-type]
            elif tok == "T10":
                for t in value:  # type: ignore[attr-defined]
                    flat += _flatten(t)
            else:
                flat.append(value)
        return [self._struct.pack(*flat)]

    def _values(self) -> tuple:
        return tuple(getattr(self, f) for f in self.__dataclass_fields__)  # type: ignore[attr-defined]


def _flatten(t: RpcTensor) -> list[object]:
    return [t.id, t.type, t.buffer, *t.ne, *t.nb, t.op, t.op_params, t.flags, *t.src, t.view_src,
            t.view_offs, t.data, t.name, t.use_count]




@dataclass(frozen=True, slots=True)
class Empty(Message):
    LAYOUT = ()


# requests (client -> server) -----------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class HelloReq(Message):
    LAYOUT = ("24s",)
    conn_caps: bytes = bytes(CONN_CAPS_SIZE)


@dataclass(frozen=True, slots=True)
class DeviceCountReq(Empty):
    pass


@dataclass(frozen=True, slots=True)
class AllocBufferReq(Message):
    LAYOUT = ("I", "Q")
    device: int
    size: int


@dataclass(frozen=True, slots=True)
class GetAlignmentReq(Message):
    LAYOUT = ("I",)
    device: int


@dataclass(frozen=True, slots=True)
class GetMaxSizeReq(Message):
    LAYOUT = ("I",)
    device: int


@dataclass(frozen=True, slots=True)
class GetDeviceMemoryReq(Message):
    LAYOUT = ("I",)
    device: int


@dataclass(frozen=True, slots=True)
class BufferGetBaseReq(Message):
    LAYOUT = ("Q",)
    remote_ptr: int


@dataclass(frozen=True, slots=True)
class FreeBufferReq(Message):
    LAYOUT = ("Q",)
    remote_ptr: int


@dataclass(frozen=True, slots=True)
class BufferClearReq(Message):
    LAYOUT = ("Q", "B")
    remote_ptr: int
    value: int


@dataclass(frozen=True, slots=True)
class InitTensorReq(Message):
    LAYOUT = ("T",)
    tensor: RpcTensor


@dataclass(frozen=True, slots=True)
class GetAllocSizeReq(Message):
    LAYOUT = ("I", "T", "T10")
    device: int
    tensor: RpcTensor
    srcs: tuple[RpcTensor, ...] = (NULL_TENSOR,) * MAX_SRC


@dataclass(frozen=True, slots=True)
class SetTensorHashReq(Message):
    LAYOUT = ("T", "Q", "Q")
    tensor: RpcTensor
    offset: int
    hash: int


@dataclass(frozen=True, slots=True)
class GetTensorReq(Message):
    LAYOUT = ("T", "Q", "Q")
    tensor: RpcTensor
    offset: int
    size: int


@dataclass(frozen=True, slots=True)
class CopyTensorReq(Message):
    LAYOUT = ("T", "T")
    src: RpcTensor
    dst: RpcTensor


@dataclass(frozen=True, slots=True)
class MemsetTensorReq(Message):
    LAYOUT = ("T", "Q", "Q", "B")
    tensor: RpcTensor
    offset: int
    size: int
    value: int


@dataclass(frozen=True, slots=True)
class GetTensor2dReq(Message):
    LAYOUT = ("T", "Q", "Q", "Q", "Q")
    tensor: RpcTensor
    offset: int
    size: int
    n_copies: int
    stride: int


@dataclass(frozen=True, slots=True)
class GraphRecomputeReq(Message):
    LAYOUT = ("I", "Q")
    device: int
    uid: int


@dataclass(frozen=True, slots=True)
class CommInitReq(Message):
    LAYOUT = ("I", "I", "I", "I", "64s")
    device: int
    rank: int
    world: int
    port: int
    host: bytes = bytes(64)


@dataclass(frozen=True, slots=True)
class CommAllreduceReq(Message):
    LAYOUT = ("I", "T")
    device: int
    tensor: RpcTensor


@dataclass(frozen=True, slots=True)
class CommFreeReq(Message):
    LAYOUT = ("I",)
    device: int


_SET_HDR = struct.Struct("<BQ")           # after the rpc_tensor: cache_flag, offset
_SET2D_HDR = struct.Struct("<QQQQ")       # after the rpc_tensor: offset, size, n_copies, stride
_GRAPH_HDR = struct.Struct("<IQI")        # device, uid, n_nodes
_U32 = struct.Struct("<I")


@dataclass(frozen=True, slots=True)
class SetTensorReq(Message):
    """`rpc_tensor | u8 cache_flag | u64 offset | data` (§5.11); `data` is a view, never copied."""
    SIZE = None
    HEADER_SIZE: ClassVar[int] = RPC_TENSOR_SIZE + _SET_HDR.size   # 305
    tensor: RpcTensor
    offset: int
    data: ByteLike
    cache_flag: int = 0

    @classmethod
    def decode(cls, payload: ByteLike) -> SetTensorReq:
        if len(payload) < cls.HEADER_SIZE:
            raise ProtocolError(f"SET_TENSOR payload of {len(payload)} bytes is shorter than 305")
        flag, offset = _SET_HDR.unpack_from(payload, RPC_TENSOR_SIZE)
        return cls(unpack_tensor(payload), offset, memoryview(payload)[cls.HEADER_SIZE:], flag)

    def encode(self) -> Buffers:
        return [self.tensor.pack() + _SET_HDR.pack(self.cache_flag, self.offset), self.data]


@dataclass(frozen=True, slots=True)
class SetTensor2dReq(Message):
    """`rpc_tensor | u64 offset, size, n_copies, stride | data[size*n_copies]` (§5.16)."""
    SIZE = None
    HEADER_SIZE: ClassVar[int] = RPC_TENSOR_SIZE + _SET2D_HDR.size  # 328
    tensor: RpcTensor
    offset: int
    size: int
    n_copies: int
    stride: int
    data: ByteLike

    @classmethod
    def decode(cls, payload: ByteLike) -> SetTensor2dReq:
        if len(payload) < cls.HEADER_SIZE:
            raise ProtocolError(f"SET_TENSOR_2D payload of {len(payload)} bytes is shorter than 328")
        offset, size, n_copies, stride = _SET2D_HDR.unpack_from(payload, RPC_TENSOR_SIZE)
        return cls(unpack_tensor(payload), offset, size, n_copies, stride,
                   memoryview(payload)[cls.HEADER_SIZE:])

    def encode(self) -> Buffers:
        hdr = _SET2D_HDR.pack(self.offset, self.size, self.n_copies, self.stride)
        return [self.tensor.pack() + hdr, self.data]


@dataclass(frozen=True, slots=True)
class GraphComputeReq(Message):
    """v8 layout: `u32 device | u64 uid | u32 n_nodes | u64 nodes[] | u32 n_tensors | rpc_tensor[]` (§5.18)."""
    SIZE = None
    HEADER_SIZE: ClassVar[int] = 16
    device: int
    uid: int
    nodes: tuple[int, ...]
    tensors: tuple[RpcTensor, ...]

    @classmethod
    def decode(cls, payload: ByteLike) -> GraphComputeReq:
        size = len(payload)
        if size < 16:
            raise ProtocolError(f"GRAPH_COMPUTE payload of {size} bytes is shorter than 16")
        device, uid, n_nodes = _GRAPH_HDR.unpack_from(payload, 0)
        end_nodes = 16 + 8 * n_nodes
        if size < end_nodes + 4:
            raise ProtocolError(f"GRAPH_COMPUTE: {n_nodes} node ids do not fit in {size} bytes")
        nodes = struct.unpack_from(f"<{n_nodes}Q", payload, 16)
        n_tensors, = _U32.unpack_from(payload, end_nodes)
        if size < end_nodes + 4 + RPC_TENSOR_SIZE * n_tensors:
            raise ProtocolError(f"GRAPH_COMPUTE: {n_tensors} tensors do not fit in {size} bytes")
        # trailing bytes are ignored, as the reference does
        return cls(device, uid, nodes, tuple(unpack_tensors(payload, end_nodes + 4, n_tensors)))

    def encode(self) -> Buffers:
        n = len(self.nodes)
        head = _GRAPH_HDR.pack(self.device, self.uid, n) + struct.pack(f"<{n}QI", *self.nodes,
                                                                        len(self.tensors))
        return [head, b"".join(t.pack() for t in self.tensors)]


# responses (server -> client) ---------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class HelloRsp(Message):
    LAYOUT = ("B", "B", "B", "B", "24s")
    major: int = PROTO_VERSION[0]
    minor: int = PROTO_VERSION[1]
    patch: int = PROTO_VERSION[2]
    padding: int = 0
    conn_caps: bytes = bytes(CONN_CAPS_SIZE)


@dataclass(frozen=True, slots=True)
class DeviceCountRsp(Message):
    LAYOUT = ("I",)
    device_count: int


@dataclass(frozen=True, slots=True)
class AllocBufferRsp(Message):
    LAYOUT = ("Q", "Q")
    remote_ptr: int
    remote_size: int


@dataclass(frozen=True, slots=True)
class GetAlignmentRsp(Message):
    LAYOUT = ("Q",)
    alignment: int


@dataclass(frozen=True, slots=True)
class GetMaxSizeRsp(Message):
    LAYOUT = ("Q",)
    max_size: int


@dataclass(frozen=True, slots=True)
class BufferGetBaseRsp(Message):
    LAYOUT = ("Q",)
    base_ptr: int


@dataclass(frozen=True, slots=True)
class GetDeviceMemoryRsp(Message):
    LAYOUT = ("Q", "Q")
    free_mem: int
    total_mem: int


@dataclass(frozen=True, slots=True)
class GetAllocSizeRsp(Message):
    LAYOUT = ("Q",)
    alloc_size: int


@dataclass(frozen=True, slots=True)
class SetTensorHashRsp(Message):
    LAYOUT = ("B",)
    result: int


@dataclass(frozen=True, slots=True)
class CopyTensorRsp(Message):
    LAYOUT = ("B",)
    result: int


@dataclass(frozen=True, slots=True)
class CommInitRsp(Message):
    LAYOUT = ("B",)
    ok: int


@dataclass(frozen=True, slots=True)
class GetTensorRsp(Message):
    """Raw bytes; the expected size is the request's `size` (or size*n_copies for the 2D variant)."""
    SIZE = None
    data: ByteLike

    @classmethod
    def decode(cls, payload: ByteLike) -> GetTensorRsp:
        return cls(payload)

    def encode(self) -> Buffers:
        return [self.data]
