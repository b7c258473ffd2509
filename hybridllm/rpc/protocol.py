"""Sans-IO codec for llama.cpp's RPC protocol 8.0.0 (ggml-rpc.md §1-§6): bytes in, typed messages out.

One table, `COMMANDS`, maps every command id to its request class (which knows its exact size, or None when
variable) and its response class; the server parser, the worker's dispatch and the client encoders all read
it. The message structs live in messages.py and are re-exported here. Nothing here touches a socket.
"""
from __future__ import annotations

import collections
import struct
from enum import IntEnum
from typing import NamedTuple, Union

from .messages import *
from .messages import Buffers, ByteLike, Message, ProtocolError


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


class ClientParser:
    """Incremental response parser for a client that pipelines requests (replies come strictly in order).

    `expect(request)` after sending a request that has a reply; `feed(bytes)` returns the completed
    (request, response) pairs. A reply whose size differs from the expected one is a ProtocolError (the
    reference client aborts its process there).
    """

    def __init__(self) -> None:
        self._pending: collections.deque[Message] = collections.deque()
        self._buf = bytearray()

    def expect(self, req: Message) -> None:
        if response_size(req) is None:
            raise ValueError(f"{CMD_OF[type(req)].name} has no response")
        self._pending.append(req)

    @property
    def waiting(self) -> int:
        return len(self._pending)

    def feed(self, data: ByteLike) -> list[tuple[Message, Message]]:
        self._buf += data
        out = []
        while len(self._buf) >= RSP_HEADER_SIZE:
            if not self._pending:
                raise ProtocolError(f"{len(self._buf)} unexpected bytes from the server")
            size, = _RSP_FRAME.unpack_from(self._buf)
            expected = response_size(self._pending[0])
            if size != expected:
                raise ProtocolError(f"{CMD_OF[type(self._pending[0])].name} response of {size} bytes, "
                                    f"expected {expected}")
            if len(self._buf) < RSP_HEADER_SIZE + size:
                break
            payload = bytes(self._buf[RSP_HEADER_SIZE:RSP_HEADER_SIZE + size])
            del self._buf[:RSP_HEADER_SIZE + size]
            req = self._pending.popleft()
            out.append((req, decode_response(req, payload)))
        return out


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

    def __init__(self, max_payload: int = 1 << 40, hellos: int = 1) -> None:
        self.max_payload = max_payload
        self._hellos = hellos     # HELLOs that must open the connection (2 with the token handshake)
        self._scratch = bytearray(self.SCRATCH)
        self._view = memoryview(self._scratch)
        self._start = self._end = 0
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
                    check_request_header(cmd, size, in_loop=self._hellos <= 0)
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
        if self._hellos > 0:
            self._hellos -= 1
        events.append(msg)

    def _fail(self, exc: ProtocolError, events: list[Event]) -> None:
        self.dead = True
        events.append(exc)
