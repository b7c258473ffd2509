"""The worker's network shell: asyncio (uvloop when installed) around the sans-IO parser and `Session`.

Unlike llama.cpp's rpc-server, which serves one client at a time, every connection is served at once with
its own isolated state. Each connection has one worker thread: the event loop only parses, so a long
GRAPH_COMPUTE on one connection never stalls accepting or serving the others.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import signal
import socket
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

from ..backends.base import Backend, Unsupported
from . import protocol as P
from .cache import TensorCache
from .worker import Session, SessionError

log = logging.getLogger("hybridllm.rpc")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 50052
_PAUSE_BYTES = 256 << 20   # stop reading a connection while this much decoded work is queued
_AUTH_MAX_PAYLOAD = 4096   # payload limit until a --token worker's client has proved the token


def _reason(exc: BaseException) -> str:
    if isinstance(exc, Unsupported):
        return f"unsupported: {exc}"
    if isinstance(exc, (SessionError, P.ProtocolError)):
        return str(exc)
    return f"internal error: {type(exc).__name__}: {exc}"


_INLINE_MAX = 64 << 10
_HEAVY = (P.GraphComputeReq, P.GraphRecomputeReq, P.SetTensorHashReq, P.CopyTensorReq, P.BufferClearReq,
          P.AllocBufferReq, P.FreeBufferReq)


def _light(ev: P.Event) -> bool:
    """Requests cheap enough to answer on the event loop (no compute, at most 64 KiB moved)."""
    if not isinstance(ev, P.Message) or isinstance(ev, _HEAVY):
        return False
    if isinstance(ev, (P.SetTensorReq, P.SetTensor2dReq)):
        return len(ev.data) <= _INLINE_MAX
    if isinstance(ev, (P.GetTensorReq, P.MemsetTensorReq)):
        return ev.size <= _INLINE_MAX
    if isinstance(ev, P.GetTensor2dReq):
        return ev.size * ev.n_copies <= _INLINE_MAX
    return True


def _weight(msg: P.Message) -> int:
    data = getattr(msg, "data", None)
    if data is not None:
        return len(data)
    tensors = getattr(msg, "tensors", None)
    return 512 + (P.RPC_TENSOR_SIZE * len(tensors) if tensors is not None else 0)


class Connection(asyncio.BufferedProtocol):
    """One client: bytes -> parser -> ordered queue -> the connection's thread -> responses."""

    def __init__(self, server: WorkerServer, number: int) -> None:
        self.server = server
        self.number = number
        token = server.token
        # with a token: two HELLOs first, and nothing large is parsed before the client proved it
        self.parser = P.ServerParser(server.max_payload if token is None else _AUTH_MAX_PAYLOAD,
                                     hellos=1 if token is None else 2)
        self.session = Session(server.devices, server.cache, token=token, on_auth=self._authenticated)
        self.executor = ThreadPoolExecutor(1, thread_name_prefix=f"rpc-conn{number}")
        self.queue: collections.deque[P.Event] = collections.deque()
        self.queued_bytes = 0
        self.busy = False
        self.closed = False
        self.paused = False
        self.eof = False
        self.peer = "?"
        self.transport: asyncio.Transport | None = None
        self.done: asyncio.Future[None] = server.loop.create_future()

    def _authenticated(self) -> None:
        self.parser.max_payload = self.server.max_payload
        log.debug("conn %d (%s) authenticated", self.number, self.peer)

    # --- asyncio callbacks (event-loop thread) -----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        log.debug("conn %d from %s", self.number, self.peer)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.parser.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        if self.closed:
            return
        for ev in self.parser.buffer_updated(nbytes):
            self.queue.append(ev)   # a ProtocolError is queued too: earlier requests still run first
            self.queued_bytes += _weight(ev) if isinstance(ev, P.Message) else 0
        if self.queued_bytes > _PAUSE_BYTES and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        if self.parser.dead and self.transport is not None and not self.paused:
            self.paused = True
            self.transport.pause_reading()
        self._kick()

    def _run_inline(self) -> None:
        """Answer small, cheap requests right here while the connection's thread is idle: a decode step's
        ~10 tiny SET_TENSORs and the logits GET would otherwise each pay a thread hand-off."""
        while not self.busy and not self.closed and self.queue and _light(self.queue[0]):
            msg = self.queue.popleft()
            self.queued_bytes -= _weight(msg)  # type: ignore[arg-type]
            try:
                rsp = self.session.handle(msg)  # type: ignore[arg-type]
            except Exception as exc:  # noqa: BLE001 - every refusal closes this connection only
                self.fail(_reason(exc), exc)
                return
            if rsp is not None:
                self._write(P.encode_response(rsp))

    def eof_received(self) -> bool:
        # like the reference, finish (and answer) what was received before the client's EOF, then close
        self.eof = True
        self._kick()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.queue.clear()
        self.server.connections.discard(self)
        # free the session's buffers in its own thread, after whatever it is running now
        fut = self.executor.submit(self.session.close)
        self.executor.shutdown(wait=False)
        fut.add_done_callback(lambda _f: self.server.loop.call_soon_threadsafe(self._finish))
        log.debug("conn %d from %s closed", self.number, self.peer)

    def _finish(self) -> None:
        if not self.done.done():
            self.done.set_result(None)

    # --- work (connection thread) --------------------------------------------------------------------------
    def _kick(self) -> None:
        self._run_inline()
        if self.eof and not self.busy and not self.queue and not self.closed and self.transport is not None:
            self.transport.close()
            return
        if self.busy or self.closed or not self.queue:
            return
        batch = list(self.queue)
        self.queue.clear()
        self.queued_bytes = 0
        self.busy = True
        fut = self.executor.submit(self._work, batch)
        fut.add_done_callback(lambda f: self.server.loop.call_soon_threadsafe(self._work_done, f))

    def _work(self, batch: list[P.Event]) -> None:
        call = self.server.loop.call_soon_threadsafe
        for ev in batch:
            if self.closed:
                return
            if isinstance(ev, P.ProtocolError):
                raise ev
            rsp = self.session.handle(ev)
            if rsp is not None:
                call(self._write, P.encode_response(rsp))

    def _write(self, frames: P.Buffers) -> None:
        if not self.closed and self.transport is not None:
            self.transport.writelines(frames)

    def _work_done(self, fut: Future[None]) -> None:
        self.busy = False
        exc = fut.exception()
        if exc is not None:
            self.fail(_reason(exc), exc)
            return
        if self.paused and not self.parser.dead and self.transport is not None and not self.closed:
            self.paused = False
            self.transport.resume_reading()
        self._kick()

    def fail(self, reason: str, exc: BaseException | None = None) -> None:
        """Close this connection with ONE log line; the server and other clients carry on."""
        if self.closed:
            return
        self.closed = True
        log.warning("conn %d (%s) closed: %s", self.number, self.peer, reason)
        if exc is not None and not isinstance(exc, (SessionError, Unsupported, P.ProtocolError)):
            log.debug("traceback of conn %d", self.number, exc_info=exc)
        if self.transport is not None:
            self.transport.close()


class WorkerServer:
    """A listening worker over `devices` (one Backend per wire device index)."""

    def __init__(self, devices: Sequence[Backend], host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
                 cache: TensorCache | None = None, max_payload: int | None = None,
                 token: bytes | None = None) -> None:
        if not devices:
            raise ValueError("a worker needs at least one device")
        self.devices = list(devices)
        self.token = token   # clients must pass hybridllm's token handshake (auth.py)
        self.host, self.port = host, port
        self.cache = cache
        # no legitimate payload is larger than the biggest device memory (plus graph overhead)
        self.max_payload = max_payload or max(d.memory()[1] for d in self.devices) + (64 << 20)
        self.connections: set[Connection] = set()
        self._count = 0
        self._server: asyncio.AbstractServer | None = None
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]

    def _new_connection(self) -> Connection:
        self._count += 1
        conn = Connection(self, self._count)
        self.connections.add(conn)
        return conn

    async def start(self) -> int:
        """Bind and listen; returns the bound port (useful with port 0)."""
        self.loop = asyncio.get_running_loop()
        self._server = await self.loop.create_server(self._new_connection, self.host, self.port,
                                                     reuse_address=True, backlog=128)
        self.port = self._server.sockets[0].getsockname()[1]
        names = ", ".join(d.name for d in self.devices)
        log.info("hybridllm worker (RPC protocol %d.%d.%d) listening on %s:%d, %d device(s): %s",
                 *P.PROTO_VERSION, self.host, self.port, len(self.devices), names)
        return self.port

    async def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting, close every connection, wait (bounded) for their threads to free state."""
        if self._server is not None:
            self._server.close()
        conns = list(self.connections)
        for conn in conns:
            if conn.transport is not None:
                conn.transport.close()
        waits = [c.done for c in conns]
        if waits:
            await asyncio.wait(waits, timeout=timeout)
        log.info("worker stopped")


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
        return uvloop.new_event_loop()
    except ImportError:  # pragma: no cover - uvloop is a dependency on POSIX
        return asyncio.new_event_loop()


def serve(server: WorkerServer) -> None:
    """Run until SIGINT/SIGTERM, then stop gracefully."""
    loop = _new_loop()
    asyncio.set_event_loop(loop)

    async def main() -> None:
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await server.start()
        await stop.wait()
        await server.stop()

    try:
        loop.run_until_complete(main())
    finally:
        loop.close()


class ServerThread:
    """A WorkerServer on its own event loop in a background thread (tests, embedding)."""

    def __init__(self, devices: Sequence[Backend], host: str = DEFAULT_HOST, port: int = 0,
                 cache: TensorCache | None = None, token: bytes | None = None) -> None:
        self.server = WorkerServer(devices, host, port, cache, token=token)
        self.loop = _new_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rpc-server", daemon=True)
        self._error: BaseException | None = None

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self.server.start())
        except BaseException as exc:  # noqa: BLE001 - reported to the starting thread
            self._error = exc
            self._started.set()
            return
        self._started.set()
        self.loop.run_forever()
        self.loop.close()

    def start(self) -> ServerThread:
        self._thread.start()
        self._started.wait()
        if self._error is not None:
            raise self._error
        return self

    @property
    def port(self) -> int:
        return self.server.port

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=30)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
