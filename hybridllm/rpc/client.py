"""A small blocking RPC client over one TCP socket (tests, tools); the codec is protocol.py's.

Unlike llama.cpp's client, a malformed reply or a closed connection raises instead of aborting.
"""
from __future__ import annotations

import socket
from collections.abc import Sequence

from ..ggml.types import default_strides
from . import protocol as P


class ConnectionClosed(ConnectionError):
    """The server closed the connection (how it reports every rejected request)."""


def rpc_tensor(id: int, type: int, ne: Sequence[int], *, buffer: int = 0, data: int = 0,
               nb: Sequence[int] | None = None, op: int = 0, op_params: bytes = b"", flags: int = 0,
               src: Sequence[int] = (), view_src: int = 0, view_offs: int = 0, name: str = "",
               use_count: int = 0) -> P.RpcTensor:
    """Build an rpc_tensor with ggml's defaults (contiguous strides, zero-padded name and params)."""
    ne4 = tuple(ne) + (1,) * (4 - len(ne))
    nb4 = tuple(nb) if nb is not None else default_strides(type, ne4)  # type: ignore[arg-type]
    srcs = tuple(src) + (0,) * (P.MAX_SRC - len(src))
    return P.RpcTensor(id, type, buffer, ne4, nb4, op, bytes(op_params).ljust(64, b"\0"), flags, srcs,  # type: ignore
                       view_src, view_offs, data, name.encode()[:63].ljust(64, b"\0"), use_count)


class RpcClient:
    """`call(request)` sends one request and, if the command has a reply, returns it decoded."""

    def __init__(self, host: str, port: int, *, timeout: float | None = 30.0, hello: bool = True) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if hello:
            rsp = self.call(P.HelloReq())
            assert isinstance(rsp, P.HelloRsp)
            if rsp.major != P.PROTO_VERSION[0] or rsp.minor > P.PROTO_VERSION[1]:
                raise P.ProtocolError(f"server speaks {rsp.major}.{rsp.minor}.{rsp.patch}")

    def send(self, msg: P.Message) -> None:
        self._sendall(P.encode_request(msg))

    def _sendall(self, parts: P.Buffers) -> None:
        if sum(len(p) for p in parts) <= 1 << 16:   # one segment for small frames
            self.sock.sendall(b"".join(parts))
            return
        for part in parts:
            if len(part):
                self.sock.sendall(part)

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_exact(self, n: int) -> bytes:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            k = self.sock.recv_into(view[got:])
            if k == 0:
                raise ConnectionClosed("server closed the connection")
            got += k
        return bytes(buf)

    def call(self, msg: P.Message) -> P.Message | None:
        self.send(msg)
        expected = P.response_size(msg)
        if expected is None:
            return None
        size, = P._RSP_FRAME.unpack(self.recv_exact(P.RSP_HEADER_SIZE))
        if size != expected:
            raise P.ProtocolError(f"response of {size} bytes, expected {expected}")
        return P.decode_response(msg, self.recv_exact(size))

    def is_closed(self, timeout: float = 5.0) -> bool:
        """True once the server has closed its end (reads EOF or a reset within `timeout`)."""
        old = self.sock.gettimeout()
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(1) == b""
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False
        finally:
            self.sock.settimeout(old)

    # --- conveniences -----------------------------------------------------------------------------------------
    def alloc_buffer(self, size: int, device: int = 0) -> tuple[int, int]:
        """(handle, base) of a new buffer."""
        rsp = self.call(P.AllocBufferReq(device, size))
        assert isinstance(rsp, P.AllocBufferRsp)
        base = self.call(P.BufferGetBaseReq(rsp.remote_ptr))
        assert isinstance(base, P.BufferGetBaseRsp)
        return rsp.remote_ptr, base.base_ptr

    def set_tensor(self, t: P.RpcTensor, data: bytes, offset: int = 0, cache_flag: int = 0) -> None:
        self.call(P.SetTensorReq(t, offset, data, cache_flag))

    def get_tensor(self, t: P.RpcTensor, size: int, offset: int = 0) -> bytes:
        rsp = self.call(P.GetTensorReq(t, offset, size))
        assert isinstance(rsp, P.GetTensorRsp)
        return bytes(rsp.data)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> RpcClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
