"""Sans-IO codec for llama.cpp's RPC protocol 8.0.0 (ggml-rpc.md §1-§6): bytes in, typed messages out.

One table, `COMMANDS`, maps every command id to its request class, its exact request size (or None when
variable) and its response class; the server parser, the worker's dispatch and the client encoders all read
it. Messages are frozen dataclasses named after ggml's `rpc_msg_*_req/_rsp` structs; `rpc_tensor` is a
NamedTuple unpacked with one precompiled Struct. Nothing here touches a socket.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import ClassVar, NamedTuple, Sequence, TypeVar, Union

PROTO_VERSION = (8, 0, 0)
CONN_CAPS_SIZE = 24
RPC_TENSOR_SIZE = 296
GRAPH_CACHE_LIMIT = 1024               # per-device uid cache size on both sides (§6.2, §6.4)
HASH_THRESHOLD = 10 * 1024 * 1024      # clients use SET_TENSOR_HASH above this (§5.12)
MAX_SRC = 10

Buffers = list[Union[bytes, bytearray, memoryview]]
ByteLike = Union[bytes, bytearray, memoryview]


class Cmd(IntEnum):
    ALLOC_BUFFER = 0
    GET_ALIGNMENT = 1
    GET_MAX_SIZE = 2
    BUFFER_GET_BASE = 3
    FREE_BUFFER = 4
    BUFFER_CLEAR = 5
    SET_TENSOR = 6
    SET_TENSOR_HASH = 7
    GET_TENSOR = 8
    COPY_TENSOR = 9
    GRAPH_COMPUTE = 10
    GET_DEVICE_MEMORY = 11
    INIT_TENSOR = 12
    GET_ALLOC_SIZE = 13
    HELLO = 14
    DEVICE_COUNT = 15
    GRAPH_RECOMPUTE = 16
    MEMSET_TENSOR = 17
    SET_TENSOR_2D = 18
    GET_TENSOR_2D = 19
    COMM_INIT = 20
    COMM_ALLREDUCE = 21
    COMM_FREE = 22
    NONE = 23      # client-internal marker, never valid on the wire
    COUNT = 24


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
    def decode(cls: type[M], payload: ByteLike) -> M:
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


_msg = dataclass(frozen=True, slots=True)


@_msg
class Empty(Message):
    LAYOUT = ()


# requests (client -> server) -----------------------------------------------------------------------------------

@_msg
class HelloReq(Message):
    LAYOUT = ("24s",)
    conn_caps: bytes = bytes(CONN_CAPS_SIZE)


@_msg
class DeviceCountReq(Empty):
    pass


@_msg
class AllocBufferReq(Message):
    LAYOUT = ("I", "Q")
    device: int
    size: int


@_msg
class GetAlignmentReq(Message):
    LAYOUT = ("I",)
    device: int


@_msg
class GetMaxSizeReq(Message):
    LAYOUT = ("I",)
    device: int


@_msg
class GetDeviceMemoryReq(Message):
    LAYOUT = ("I",)
    device: int


@_msg
class BufferGetBaseReq(Message):
    LAYOUT = ("Q",)
    remote_ptr: int


@_msg
class FreeBufferReq(Message):
    LAYOUT = ("Q",)
    remote_ptr: int


@_msg
class BufferClearReq(Message):
    LAYOUT = ("Q", "B")
    remote_ptr: int
    value: int


@_msg
class InitTensorReq(Message):
    LAYOUT = ("T",)
    tensor: RpcTensor


@_msg
class GetAllocSizeReq(Message):
    LAYOUT = ("I", "T", "T10")
    device: int
    tensor: RpcTensor
    srcs: tuple[RpcTensor, ...] = (NULL_TENSOR,) * MAX_SRC


@_msg
class SetTensorHashReq(Message):
    LAYOUT = ("T", "Q", "Q")
    tensor: RpcTensor
    offset: int
    hash: int


@_msg
class GetTensorReq(Message):
    LAYOUT = ("T", "Q", "Q")
    tensor: RpcTensor
    offset: int
    size: int


@_msg
class CopyTensorReq(Message):
    LAYOUT = ("T", "T")
    src: RpcTensor
    dst: RpcTensor


@_msg
class MemsetTensorReq(Message):
    LAYOUT = ("T", "Q", "Q", "B")
    tensor: RpcTensor
    offset: int
    size: int
    value: int


@_msg
class GetTensor2dReq(Message):
    LAYOUT = ("T", "Q", "Q", "Q", "Q")
    tensor: RpcTensor
    offset: int
    size: int
    n_copies: int
    stride: int


@_msg
class GraphRecomputeReq(Message):
    LAYOUT = ("I", "Q")
    device: int
    uid: int


@_msg
class CommInitReq(Message):
    LAYOUT = ("I", "I", "I", "I", "64s")
    device: int
    rank: int
    world: int
    port: int
    host: bytes = bytes(64)


@_msg
class CommAllreduceReq(Message):
    LAYOUT = ("I", "T")
    device: int
    tensor: RpcTensor


@_msg
class CommFreeReq(Message):
    LAYOUT = ("I",)
    device: int


_SET_HDR = struct.Struct("<BQ")           # after the rpc_tensor: cache_flag, offset
_SET2D_HDR = struct.Struct("<QQQQ")       # after the rpc_tensor: offset, size, n_copies, stride
_GRAPH_HDR = struct.Struct("<IQI")        # device, uid, n_nodes
_U32 = struct.Struct("<I")


@_msg
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


@_msg
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


@_msg
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

@_msg
class HelloRsp(Message):
    LAYOUT = ("B", "B", "B", "B", "24s")
    major: int = PROTO_VERSION[0]
    minor: int = PROTO_VERSION[1]
    patch: int = PROTO_VERSION[2]
    padding: int = 0
    conn_caps: bytes = bytes(CONN_CAPS_SIZE)


@_msg
class DeviceCountRsp(Message):
    LAYOUT = ("I",)
    device_count: int


@_msg
class AllocBufferRsp(Message):
    LAYOUT = ("Q", "Q")
    remote_ptr: int
    remote_size: int


@_msg
class GetAlignmentRsp(Message):
    LAYOUT = ("Q",)
    alignment: int


@_msg
class GetMaxSizeRsp(Message):
    LAYOUT = ("Q",)
    max_size: int


@_msg
class BufferGetBaseRsp(Message):
    LAYOUT = ("Q",)
    base_ptr: int


@_msg
class GetDeviceMemoryRsp(Message):
    LAYOUT = ("Q", "Q")
    free_mem: int
    total_mem: int


@_msg
class GetAllocSizeRsp(Message):
    LAYOUT = ("Q",)
    alloc_size: int


@_msg
class SetTensorHashRsp(Message):
    LAYOUT = ("B",)
    result: int


@_msg
class CopyTensorRsp(Message):
    LAYOUT = ("B",)
    result: int


@_msg
class CommInitRsp(Message):
    LAYOUT = ("B",)
    ok: int


@_msg
class GetTensorRsp(Message):
    """Raw bytes; the expected size is the request's `size` (or size*n_copies for the 2D variant)."""
    SIZE = None
    data: ByteLike

    @classmethod
    def decode(cls, payload: ByteLike) -> GetTensorRsp:
        return cls(payload)

    def encode(self) -> Buffers:
        return [self.data]


# --- the command table -----------------------------------------------------------------------------------------

class CommandSpec(NamedTuple):
    cmd: Cmd
    request: type[Message]
    response: type[Message] | None   # None: the command has no reply

    @property
    def req_size(self) -> int | None:
        """Exact request payload size, or None when variable."""
        return self.request.SIZE

    @property
    def min_req_size(self) -> int:
        return self.request.SIZE if self.request.SIZE is not None else self.request.HEADER_SIZE  # type: ignore


COMMANDS: dict[int, CommandSpec] = {s.cmd: s for s in (
    CommandSpec(Cmd.ALLOC_BUFFER, AllocBufferReq, AllocBufferRsp),
    CommandSpec(Cmd.GET_ALIGNMENT, GetAlignmentReq, GetAlignmentRsp),
    CommandSpec(Cmd.GET_MAX_SIZE, GetMaxSizeReq, GetMaxSizeRsp),
    CommandSpec(Cmd.BUFFER_GET_BASE, BufferGetBaseReq, BufferGetBaseRsp),
    CommandSpec(Cmd.FREE_BUFFER, FreeBufferReq, None),
    CommandSpec(Cmd.BUFFER_CLEAR, BufferClearReq, None),
    CommandSpec(Cmd.SET_TENSOR, SetTensorReq, None),
    CommandSpec(Cmd.SET_TENSOR_HASH, SetTensorHashReq, SetTensorHashRsp),
    CommandSpec(Cmd.GET_TENSOR, GetTensorReq, GetTensorRsp),
    CommandSpec(Cmd.COPY_TENSOR, CopyTensorReq, CopyTensorRsp),
    CommandSpec(Cmd.GRAPH_COMPUTE, GraphComputeReq, None),
    CommandSpec(Cmd.GET_DEVICE_MEMORY, GetDeviceMemoryReq, GetDeviceMemoryRsp),
    CommandSpec(Cmd.INIT_TENSOR, InitTensorReq, None),
    CommandSpec(Cmd.GET_ALLOC_SIZE, GetAllocSizeReq, GetAllocSizeRsp),
    CommandSpec(Cmd.HELLO, HelloReq, HelloRsp),
    CommandSpec(Cmd.DEVICE_COUNT, DeviceCountReq, DeviceCountRsp),
    CommandSpec(Cmd.GRAPH_RECOMPUTE, GraphRecomputeReq, None),
    CommandSpec(Cmd.MEMSET_TENSOR, MemsetTensorReq, None),
    CommandSpec(Cmd.SET_TENSOR_2D, SetTensor2dReq, None),
    CommandSpec(Cmd.GET_TENSOR_2D, GetTensor2dReq, GetTensorRsp),
    CommandSpec(Cmd.COMM_INIT, CommInitReq, CommInitRsp),
    CommandSpec(Cmd.COMM_ALLREDUCE, CommAllreduceReq, None),
    CommandSpec(Cmd.COMM_FREE, CommFreeReq, None),
)}
CMD_OF: dict[type[Message], Cmd] = {s.request: s.cmd for s in COMMANDS.values()}
Request = Message   # alias for readability in signatures

_FRAME = struct.Struct("<BQ")
_RSP_FRAME = struct.Struct("<Q")
FRAME_HEADER_SIZE = _FRAME.size    # 9
RSP_HEADER_SIZE = _RSP_FRAME.size  # 8


# --- client side --------------------------------------------------------------------------------------------------

def encode_request(msg: Message) -> Buffers:
    """A request frame `u8 cmd | u64 size | payload` as buffers ready for writelines/sendmsg."""
    parts = msg.encode()
    size = sum(len(p) if not isinstance(p, memoryview) else p.nbytes for p in parts)
    return [_FRAME.pack(CMD_OF[type(msg)], size), *parts]


def request_bytes(msg: Message) -> bytes:
    return b"".join(encode_request(msg))


def response_size(msg: Message) -> int | None:
    """The exact response payload size the client must receive, or None if the command has no reply."""
    spec = COMMANDS[CMD_OF[type(msg)]]
    if spec.response is None:
        return None
    if isinstance(msg, GetTensorReq):
        return msg.size
    if isinstance(msg, GetTensor2dReq):
        return msg.size * msg.n_copies
    return spec.response.SIZE


def decode_response(msg: Message, payload: ByteLike) -> Message:
    """Decode the reply to `msg`; a size mismatch is a ProtocolError (the real client aborts)."""
    expected = response_size(msg)
    if expected is None:
        raise ProtocolError(f"{CMD_OF[type(msg)].name} has no response")
    if len(payload) != expected:
        raise ProtocolError(f"{CMD_OF[type(msg)].name} response of {len(payload)} bytes, "
                            f"expected {expected}")
    return COMMANDS[CMD_OF[type(msg)]].response.decode(payload)  # type: ignore[union-attr]


def decode_request(cmd: int, payload: ByteLike, *, in_loop: bool = True) -> Message:
    """Validate and decode one request; raises ProtocolError with the reason the server closes."""
    check_request_header(cmd, len(payload), in_loop=in_loop)
    return COMMANDS[cmd].request.decode(payload)


def check_request_header(cmd: int, size: int, *, in_loop: bool) -> None:
    """The checks the server makes before reading a payload (§2.3, §4, §5)."""
    if not in_loop:
        if cmd != Cmd.HELLO:
            raise ProtocolError(f"expected HELLO, got command {cmd} (update client)")
    elif cmd == Cmd.HELLO:
        raise ProtocolError("HELLO inside the command loop")
    if cmd >= Cmd.COUNT:
        raise ProtocolError(f"unknown command {cmd}")
    if cmd == Cmd.NONE:
        raise ProtocolError("unhandled command 23 (NONE)")
    spec = COMMANDS[cmd]
    if spec.req_size is not None and size != spec.req_size:
        raise ProtocolError(f"{spec.cmd.name} payload of {size} bytes, expected {spec.req_size}")
    if size < spec.min_req_size:
        raise ProtocolError(f"{spec.cmd.name} payload of {size} bytes is shorter than {spec.min_req_size}")


# --- server side ----------------------------------------------------------------------------------------------------

def encode_response(rsp: Message) -> Buffers:
    """A response frame `u64 size | payload`."""
    parts = rsp.encode()
    size = sum(len(p) if not isinstance(p, memoryview) else p.nbytes for p in parts)
    return [_RSP_FRAME.pack(size), *parts]


Event = Union[Message, ProtocolError]


class ServerParser:
    """Incremental request parser for one connection.

    Two ways in: `feed(bytes)`, or asyncio.BufferedProtocol style `get_buffer()` + `buffer_updated(n)`, which
    lets the transport receive large payloads (weights, graphs) straight into their final bytearray. Small
    messages share a scratch buffer. After a ProtocolError the parser is dead and yields nothing more.
    """

    SCRATCH = 256 * 1024
    BIG = 64 * 1024  # payloads above this get their own buffer

    def __init__(self, max_payload: int = 1 << 40) -> None:
        self.max_payload = max_payload
        self._scratch = bytearray(self.SCRATCH)
        self._view = memoryview(self._scratch)
        self._start = self._end = 0
        self._hello_done = False
        self._cmd = -1            # pending command, -1 = waiting for a header
        self._size = 0
        self._big: bytearray | None = None
        self._big_pos = 0
        self.dead = False

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        if self._big is not None:
            return memoryview(self._big)[self._big_pos:]
        if len(self._scratch) - self._end < 4096 or self._start == self._end:
            self._compact()
        return self._view[self._end:]

    def _compact(self) -> None:
        n = self._end - self._start
        if n and self._start:
            self._scratch[:n] = self._scratch[self._start:self._end]
        self._start, self._end = 0, n

    def buffer_updated(self, nbytes: int) -> list[Event]:
        if self.dead:
            return []
        events: list[Event] = []
        if self._big is not None:
            self._big_pos += nbytes
            if self._big_pos < len(self._big):
                return events
            payload, self._big = self._big, None
            self._emit(payload, events)
            return events
        self._end += nbytes
        self._drain(events)
        return events

    def feed(self, data: ByteLike) -> list[Event]:
        events: list[Event] = []
        src = memoryview(data).cast("B")
        while len(src) and not self.dead:
            dst = self.get_buffer()
            k = min(len(dst), len(src))
            dst[:k] = src[:k]
            src = src[k:]
            events += self.buffer_updated(k)
        return events

    def _drain(self, events: list[Event]) -> None:
        while not self.dead:
            avail = self._end - self._start
            if self._cmd < 0:
                if avail < FRAME_HEADER_SIZE:
                    return
                cmd, size = _FRAME.unpack_from(self._scratch, self._start)
                self._start += FRAME_HEADER_SIZE
                avail -= FRAME_HEADER_SIZE
                try:
                    check_request_header(cmd, size, in_loop=self._hello_done)
                    if size > self.max_payload:
                        raise ProtocolError(f"{Cmd(cmd).name} payload of {size} bytes exceeds the "
                                            f"limit of {self.max_payload}")
                except ProtocolError as exc:
                    self._fail(exc, events)
                    return
                self._cmd, self._size = cmd, size
                if size > self.BIG:
                    if not self._start_big(avail, events):
                        return
                    continue
            if avail < self._size:
                return
            payload = bytes(self._view[self._start:self._start + self._size])
            self._start += self._size
            self._emit(payload, events)

    def _start_big(self, avail: int, events: list[Event]) -> bool:
        """Give a large payload its own buffer; True if it was already complete (and emitted)."""
        try:
            big = bytearray(self._size)
        except MemoryError:
            self._fail(ProtocolError(f"cannot allocate {self._size} bytes for a payload"), events)
            return False
        k = min(avail, self._size)
        big[:k] = self._view[self._start:self._start + k]
        self._start += k
        if k == self._size:
            self._emit(big, events)
            return True
        self._big, self._big_pos = big, k
        return False

    def _emit(self, payload: ByteLike, events: list[Event]) -> None:
        cmd, self._cmd = self._cmd, -1
        try:
            msg = COMMANDS[cmd].request.decode(payload)
        except ProtocolError as exc:
            self._fail(exc, events)
            return
        self._hello_done = True
        events.append(msg)

    def _fail(self, exc: ProtocolError, events: list[Event]) -> None:
        self.dead = True
        events.append(exc)
