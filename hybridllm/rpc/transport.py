"""One TCP connection from a master to an RPC worker (llama.cpp's rpc-server or `hybridllm worker`).

Requests without a reply are queued and leave together with the next request that has one (or at `flush()`),
so a decode step's input uploads, its GRAPH_RECOMPUTE and the logits read share one round trip. Every
failure (refused, reset, closed, timed out, malformed reply) raises `RpcError` naming the endpoint and
leaves the connection closed: unlike llama.cpp's client, nothing aborts the process.
"""
from __future__ import annotations

import collections
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field, fields

from typing_extensions import Self

from . import auth
from . import protocol as P

_COPY_MAX = 64 << 10      # frames up to this are copied into the send queue; larger ones go out at once
_QUEUE_MAX = 1 << 20      # queued bytes that force a flush
_HELLO_RSP_SIZE = P.HelloRsp.SIZE
_KEEPALIVE = [(getattr(socket, name), value) for name, value in
              (("TCP_KEEPIDLE", 30), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 3)) if hasattr(socket, name)]
_MAX_TRACE = 6            # unanswered commands named in a "worker closed the connection" error


class RpcError(RuntimeError):
    """The worker at `endpoint` could not be used; the message says why in one line."""

    def __init__(self, endpoint: str, message: str) -> None:
        super().__init__(f"RPC worker {endpoint}: {message}")
        self.endpoint = endpoint
        self.detail = message


class VersionMismatch(RpcError):
    """The worker speaks another RPC protocol version."""


class AuthError(RpcError):
    """The token handshake failed (missing, wrong or unexpected token)."""


@dataclass
class Traffic:
    """Cumulative wire counters. `round_trips` counts waits for replies (a pipelined batch counts once)."""
    bytes_sent: int = 0
    bytes_received: int = 0
    round_trips: int = 0
    messages: int = 0
    connections: int = 0
    hash_hits: int = 0           # SET_TENSOR_HASH answered 1: the upload was skipped
    hash_bytes_saved: int = 0
    commands: collections.Counter[str] = field(default_factory=collections.Counter)  # messages per command

    def copy(self) -> Traffic:
        return Traffic(**{f.name: getattr(self, f.name) for f in fields(self) if f.name != "commands"},
                       commands=collections.Counter(self.commands))

    def __sub__(self, other: Traffic) -> Traffic:
        """The traffic between two snapshots: `after - before`."""
        diff = Traffic(**{f.name: getattr(self, f.name) - getattr(other, f.name)
                          for f in fields(self) if f.name != "commands"})
        diff.commands = collections.Counter(self.commands)
        diff.commands.subtract(other.commands)
        diff.commands = +diff.commands
        return diff


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """'host:port' or '[v6addr]:port' -> (host, port); a ValueError names what is wrong."""
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"invalid RPC endpoint {endpoint!r} (expected host:port)")
    return host.strip("[]"), int(port)


def recv_exact(sock: socket.socket, n: int) -> bytes | None:
    """Exactly n bytes from a blocking socket, or None if the peer closed first (recording proxies)."""
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:], min(n - got, 1 << 22))
        if k == 0:
            return None
        got += k
    return bytes(buf)


def _nbytes(part: P.ByteLike) -> int:
    return part.nbytes if isinstance(part, memoryview) else len(part)


class RpcConnection:
    """A connected, handshaken socket. `send` queues, `call`/`call_many` flush and wait for replies."""

    def __init__(self, endpoint: str, *, token: str | bytes | None = None, connect_timeout: float = 10.0,
                 timeout: float | None = 300.0, traffic: Traffic | None = None) -> None:
        self.endpoint = endpoint
        self.host, self.port = parse_endpoint(endpoint)
        self.timeout = timeout
        self.traffic = traffic if traffic is not None else Traffic()
        self.closed = False
        self.version: tuple[int, int, int] = (0, 0, 0)
        self.authenticated = False
        self._queue: list[bytes] = []
        self._queued = 0
        self._unanswered: collections.deque[str] = collections.deque(maxlen=_MAX_TRACE)
        self._close_hint: tuple[type[RpcError], str] | None = None   # what an EOF means right now
        self.sock = self._connect(connect_timeout)
        try:
            self._handshake(auth.token_bytes(token) if token is not None else None)
        except BaseException:
            self.close()
            raise
        self.sock.settimeout(timeout)

    # --- errors ----------------------------------------------------------------------------------------------
    def _fail(self, cls: type[RpcError], message: str) -> RpcError:
        self._queue.clear()   # nothing more goes to a connection in an unknown state
        self.close()
        return cls(self.endpoint, message)

    def _io_error(self, exc: OSError, what: str) -> RpcError:
        if isinstance(exc, TimeoutError):
            return self._fail(RpcError, f"timed out ({self.sock.gettimeout()} s) {what}")
        reason = exc.strerror or type(exc).__name__
        if isinstance(exc, (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)):
            return self._closed_by_worker(what, f"reset the connection ({reason})")
        return self._fail(RpcError, f"connection lost {what}: {reason}")

    def _closed_by_worker(self, what: str, how: str = "closed the connection") -> RpcError:
        if self._close_hint is not None:
            return self._fail(*self._close_hint)
        sent = ", ".join(self._unanswered)
        after = f" after {sent}" if sent else ""
        return self._fail(RpcError, f"the worker {how} {what}{after} (a worker closes on any request it "
                                    f"refuses, see its log; or it stopped)")

    # --- connect and HELLO -------------------------------------------------------------------------------------
    def _connect(self, timeout: float) -> socket.socket:
        try:
            sock = socket.create_connection((self.host, self.port), timeout=timeout)
        except OSError as exc:
            reason = "timed out" if isinstance(exc, TimeoutError) else exc.strerror or type(exc).__name__
            self.closed = True
            raise RpcError(self.endpoint, f"cannot connect: {reason}") from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for opt, value in _KEEPALIVE:   # a vanished host is noticed in about a minute, even without timeouts
            sock.setsockopt(socket.IPPROTO_TCP, opt, value)
        self.traffic.connections += 1
        return sock

    def _hello(self, caps: bytes, what: str) -> P.HelloRsp:
        """One HELLO exchange; the reply is checked by hand so an old server's short reply is still read."""
        self._queue_msg(P.HelloReq(caps))
        self.flush()
        self.traffic.round_trips += 1
        size, = P._RSP_FRAME.unpack(self._recv(P.RSP_HEADER_SIZE, what))
        if size != _HELLO_RSP_SIZE:
            if 3 <= size <= 64:
                ver = self._recv(size, what)
                raise self._fail(VersionMismatch, f"the worker speaks RPC protocol {ver[0]}.{ver[1]}.{ver[2]}; "
                                                  f"this client speaks {P.PROTO_VERSION[0]}.{P.PROTO_VERSION[1]}")
            raise self._fail(RpcError, f"malformed HELLO reply of {size} bytes (not an RPC worker?)")
        self._unanswered.clear()
        return P.HelloRsp.decode(self._recv(size, what))

    def _handshake(self, key: bytes | None) -> None:
        nonce = auth.new_nonce()
        self._close_hint = (RpcError, ("the worker closed the connection during HELLO (does it require a "
                                       "token? does it speak another protocol version?)"))
        rsp = self._hello(auth.hello_caps(nonce) if key else bytes(P.CONN_CAPS_SIZE), "during HELLO")
        self.version = (rsp.major, rsp.minor, rsp.patch)
        if rsp.major != P.PROTO_VERSION[0] or rsp.minor > P.PROTO_VERSION[1]:
            raise self._fail(VersionMismatch, f"the worker speaks RPC protocol {rsp.major}.{rsp.minor}."
                                              f"{rsp.patch}; this client needs {P.PROTO_VERSION[0]}.x with "
                                              f"minor <= {P.PROTO_VERSION[1]}")
        self._close_hint = None
        if key is None:
            return
        worker = auth.worker_nonce(rsp.conn_caps)
        if worker is None:
            raise self._fail(AuthError, "a token was given but the worker did not ask for one (llama.cpp's "
                                        "rpc-server, or a hybridllm worker started without --token)")
        proof = auth.proof(key, b"client", nonce, worker)
        self._close_hint = (AuthError, "the worker refused the token (wrong token?)")
        rsp = self._hello(proof, "during the token handshake")
        self._close_hint = None
        if not auth.check(auth.proof(key, b"worker", nonce, worker), rsp.conn_caps):
            raise self._fail(AuthError, "the worker could not prove it knows the token")
        self.authenticated = True

    # --- sending -----------------------------------------------------------------------------------------------
    def _queue_msg(self, msg: P.Message) -> None:
        self.send_frame(P.CMD_OF[type(msg)].name, P.encode_request(msg))

    def send_frame(self, name: str, parts: P.Buffers) -> None:
        """Queue (small) or send (large) one encoded request frame; no reply is read."""
        if self.closed:
            raise RpcError(self.endpoint, "connection is closed")
        size = sum(_nbytes(p) for p in parts)
        tr = self.traffic
        tr.bytes_sent += size
        tr.messages += 1
        tr.commands[name] += 1
        self._unanswered.append(name)
        if size <= _COPY_MAX:
            # copy now: the caller may reuse its buffer as soon as we return
            self._queue.append(b"".join(parts))
            self._queued += size
            if self._queued >= _QUEUE_MAX:
                self.flush()
            return
        self.flush()
        try:
            for part in parts:
                self.sock.sendall(part)
        except OSError as exc:
            raise self._io_error(exc, f"sending {name}") from None

    def send(self, msg: P.Message) -> None:
        """Queue a request that has no reply (FREE_BUFFER, SET_TENSOR, GRAPH_COMPUTE, ...)."""
        if P.response_size(msg) is not None:
            raise ValueError(f"{P.CMD_OF[type(msg)].name} has a reply: use call()")
        self._queue_msg(msg)

    def flush(self) -> None:
        if not self._queue:
            return
        data = b"".join(self._queue) if len(self._queue) > 1 else self._queue[0]
        self._queue.clear()
        self._queued = 0
        try:
            self.sock.sendall(data)
        except OSError as exc:
            raise self._io_error(exc, "sending") from None

    # --- replies -------------------------------------------------------------------------------------------------
    def _recv(self, n: int, what: str) -> bytearray:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        try:
            while got < n:
                k = self.sock.recv_into(view[got:])
                if k == 0:
                    raise self._closed_by_worker(what)
                got += k
        except OSError as exc:
            raise self._io_error(exc, what) from None
        self.traffic.bytes_received += n
        return buf

    def _reply(self, msg: P.Message) -> P.Message:
        name = P.CMD_OF[type(msg)].name
        what = f"waiting for the reply to {name}"
        size, = P._RSP_FRAME.unpack(self._recv(P.RSP_HEADER_SIZE, what))
        expected = P.response_size(msg)
        if size != expected:
            raise self._fail(RpcError, f"malformed reply to {name}: {size} bytes, expected {expected}")
        payload = self._recv(size, what)
        self._unanswered.clear()
        return P.decode_response(msg, payload)

    def call_many(self, msgs: Sequence[P.Message]) -> list[P.Message]:
        """Send requests (each with a reply) back to back and read every reply: one round trip."""
        for msg in msgs:
            if P.response_size(msg) is None:
                raise ValueError(f"{P.CMD_OF[type(msg)].name} has no reply: use send()")
            self._queue_msg(msg)
        self.flush()
        self.traffic.round_trips += 1
        return [self._reply(msg) for msg in msgs]

    def call(self, msg: P.Message) -> P.Message:
        return self.call_many([msg])[0]

    def close(self) -> None:
        """Send what is queued (best effort) and close; idempotent."""
        if self.closed:
            return
        self.closed = True
        try:
            if self._queue:
                self.sock.sendall(b"".join(self._queue))
        except OSError:
            pass
        self._queue.clear()
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
