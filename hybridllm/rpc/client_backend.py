"""`RpcBackend`: a Backend whose memory and compute live on a remote RPC worker (ours or llama.cpp's).

Buffers are ALLOC_BUFFER handles and their `.base` is the *server's* base address, so a tensor's wire
`data` is `base + offset`, exactly as ggml-alloc computes it in llama.cpp's master. `prepare(nodes)`
serializes a graph once (ggml-rpc.md §6.1) under a fresh uid; its Plan sends GRAPH_COMPUTE the first time
and the 12-byte GRAPH_RECOMPUTE afterwards, mirroring the worker's per-device uid cache (§6.4).

All devices of one endpoint share one connection, as in llama.cpp (its rpc-server serves one client at a
time). When the connection drops, every call raises `RpcError`; its buffers and plans are gone (the worker
frees them), so using them raises `BuffersLost`, while calls that need no buffer reconnect.
"""
from __future__ import annotations

import collections
import itertools
import threading
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from typing_extensions import Self

from ..backends.base import Backend, Buffer, Unsupported, nodes_to_run
from ..ggml.tensor import Tensor
from ..ggml.types import GGMLOp, GGMLType
from . import protocol as P
from .cache import fnv1a_64
from .transport import AuthError, RpcConnection, RpcError, Traffic, VersionMismatch

__all__ = ["AuthError", "BuffersLost", "RpcBackend", "RpcBuffer", "RpcError", "RpcPlan", "Traffic",
           "VersionMismatch"]

_U32 = 0xFFFFFFFF
_CHUNK = 1 << 30   # largest single SET_TENSOR (ne0 is 32-bit on the wire)
# ops whose remote allocation may exceed nbytes (ggml_op_alloc_size_may_expand)
_EXPANDING_OPS = frozenset({GGMLOp.FLASH_ATTN_EXT, GGMLOp.MUL_MAT, GGMLOp.MUL_MAT_ID, GGMLOp.CUMSUM,
                            GGMLOp.ARGSORT, GGMLOp.TOP_K})
_uids = itertools.count(1)   # graph uids, unique in this process like ggml's global counter


class BuffersLost(RpcError):
    """A buffer or plan belonged to a connection that has dropped; the worker freed it."""


class RpcBuffer(Buffer):
    """A remote buffer. `usage`: "weights" (large uploads go through SET_TENSOR_HASH), "compute", or None
    (automatic: weights until a prepared graph writes into the buffer)."""

    __slots__ = ("generation", "handle", "link", "usage", "written")

    def __init__(self, backend: RpcBackend, size: int, base: int, handle: int, generation: int,
                 usage: str | None) -> None:
        super().__init__(backend, size, base)
        self.handle = handle
        self.link = backend.link
        self.generation = generation
        self.usage = usage
        self.written = False

    @property
    def is_weights(self) -> bool:
        return self.usage == "weights" or (self.usage is None and not self.written)


class _Link:
    """One connection to an endpoint, shared by the RpcBackends of its devices, plus its mirrored state."""

    def __init__(self, endpoint: str, token: str | bytes | None, connect_timeout: float,
                 timeout: float | None) -> None:
        self.endpoint, self.token = endpoint, token
        self.connect_timeout, self.timeout = connect_timeout, timeout
        self.lock = threading.RLock()
        self.traffic = Traffic()
        self.conn: RpcConnection | None = None
        self.generation = 0
        self.lost: str | None = None        # why the last connection ended, while there is none
        self.device_count = 0
        self.n_buffers = 0                  # live buffers on the current connection
        self.uids: dict[int, dict[int, bool]] = {}   # device -> uid -> still valid (the worker's cache)
        self.alloc_sizes: dict[tuple, int] = {}
        self.users = 0

    def connection(self) -> RpcConnection:
        """The live connection, reconnecting (new generation: old buffers are lost) when there is none."""
        if self.conn is not None and not self.conn.closed:
            return self.conn
        self._note_drop()
        conn = RpcConnection(self.endpoint, token=self.token, connect_timeout=self.connect_timeout,
                             timeout=self.timeout, traffic=self.traffic)
        try:
            count = conn.call(P.DeviceCountReq()).device_count  # type: ignore[attr-defined]
        except RpcError:
            conn.close()
            raise
        self.conn, self.generation, self.device_count = conn, self.generation + 1, count
        self.lost, self.n_buffers, self.uids = None, 0, {}
        return conn

    def _note_drop(self) -> None:
        if self.conn is not None and self.lost is None:
            self.lost = "the connection dropped"
        self.conn = None

    def alive(self, generation: int) -> bool:
        return self.conn is not None and not self.conn.closed and generation == self.generation

    def invalidate_graphs(self) -> None:
        """FREE_BUFFER makes the worker drop every cached graph of every device (§5.7); uids stay counted."""
        for cache in self.uids.values():
            for uid in cache:
                cache[uid] = False

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


_links: weakref.WeakValueDictionary[tuple, _Link] = weakref.WeakValueDictionary()
_links_lock = threading.Lock()


def _shared_link(endpoint: str, token: str | bytes | None, connect_timeout: float,
                 timeout: float | None) -> _Link:
    with _links_lock:
        link = _links.get((endpoint, token))
        if link is None:
            link = _Link(endpoint, token, connect_timeout, timeout)
            _links[(endpoint, token)] = link
        link.users += 1
        return link


def _storage(t: Tensor) -> tuple[Buffer | None, int]:
    if t.buffer is not None:
        return t.buffer, t.offset
    if t.view_src is not None and t.view_src.buffer is not None:   # a view not bound yet
        return t.view_src.buffer, t.view_src.offset + t.view_offs
    return None, 0


def _post_order(nodes: Sequence[Tensor]) -> list[Tensor]:
    """Every tensor the nodes reach through src[] then view_src, once each, after what it reaches
    (serialize_graph's add_tensor, marking before descending, so self-references end). Iterative."""
    out: list[Tensor] = []
    seen: set[int] = set()

    def children(t: Tensor) -> Iterator[Tensor]:
        yield from (s for s in t.src if s is not None)
        if t.view_src is not None:
            yield t.view_src

    for root in nodes:
        if id(root) in seen:
            continue
        seen.add(id(root))
        stack = [(root, children(root))]
        while stack:
            t, it = stack[-1]
            for c in it:
                if id(c) not in seen:
                    seen.add(id(c))
                    stack.append((c, children(c)))
                    break
            else:
                stack.pop()
                out.append(t)
    return out


def _name(t: Tensor) -> bytes:
    return t.name.encode("utf-8")[:63].ljust(64, b"\0")


class RpcPlan:
    """A serialized graph bound to one connection. `run()` queues GRAPH_COMPUTE or GRAPH_RECOMPUTE and
    flushes, so the worker starts at once; results are read with `get` (the first reply-bearing call)."""

    __slots__ = ("backend", "buffers", "compute", "generation", "n_nodes", "n_tensors", "recompute", "uid")

    def __init__(self, backend: RpcBackend, uid: int, generation: int, buffers: list[RpcBuffer],
                 compute: bytes, recompute: bytes, n_nodes: int, n_tensors: int) -> None:
        self.backend, self.uid, self.generation, self.buffers = backend, uid, generation, buffers
        self.compute, self.recompute = compute, recompute
        self.n_nodes, self.n_tensors = n_nodes, n_tensors

    def run(self) -> None:
        self.backend._run_plan(self)


class RpcBackend(Backend):
    """Device `device` of the RPC worker at `endpoint` ("host:port")."""

    alignment = 32

    def __init__(self, endpoint: str, device: int = 0, token: str | bytes | None = None, *,
                 connect_timeout: float = 10.0, timeout: float | None = 300.0) -> None:
        super().__init__()
        self.endpoint, self.device = endpoint, device
        self.name = f"RPC{device}[{endpoint}]"
        self.link = _shared_link(endpoint, token, connect_timeout, timeout)
        self._closed = False
        try:
            with self._conn() as conn:
                if device >= self.link.device_count:
                    raise RpcError(endpoint, f"device {device} out of range: the worker has "
                                             f"{self.link.device_count} device(s)")
                align, size = conn.call_many([P.GetAlignmentReq(device), P.GetMaxSizeReq(device)])
        except BaseException:
            self.close()
            raise
        self.alignment = align.alignment  # type: ignore[attr-defined]
        self.max_size = size.max_size  # type: ignore[attr-defined]

    # --- connection --------------------------------------------------------------------------------------------
    @contextmanager
    def _conn(self, buffers: Sequence[Buffer] = (), generation: int | None = None) -> Iterator[RpcConnection]:
        """The locked live connection. With `buffers` (or a plan's `generation`) they must belong to it."""
        link = self.link
        with link.lock:
            if self._closed:
                raise RpcError(self.endpoint, "backend is closed")
            gens = [self._generation_of(b) for b in buffers]
            if generation is not None:
                gens.append(generation)
            for gen in gens:
                if not link.alive(gen):
                    why = link.lost or "the connection dropped"
                    raise BuffersLost(self.endpoint, f"buffers and graphs of an earlier connection are lost "
                                                     f"({why}); allocate and upload again")
            conn = link.connection()
            try:
                yield conn
            except RpcError as exc:
                if not conn.closed or isinstance(exc, BuffersLost):
                    raise
                link.lost = exc.detail
                raise type(exc)(self.endpoint, f"{exc.detail}; the connection is closed and the "
                                               f"{link.n_buffers} buffer(s) allocated on it are lost "
                                               f"(the next call reconnects)") from None

    def _generation_of(self, buf: Buffer) -> int:
        if not isinstance(buf, RpcBuffer) or buf.link is not self.link:
            raise ValueError(f"{buf!r} is not a buffer of {self.name}")
        if buf.freed:
            raise ValueError(f"{buf!r} was freed")
        return buf.generation

    @property
    def traffic(self) -> Traffic:
        """Cumulative counters of this endpoint's connection(s); subtract two `.copy()`s for one operation."""
        return self.link.traffic

    @property
    def broken(self) -> str | None:
        """Why the connection is down (the next call reconnects; old buffers are lost), or None."""
        link = self.link
        if link.conn is None or link.conn.closed:
            return link.lost or "the connection dropped"
        return None

    def reconnect(self) -> None:
        with self._conn():
            pass

    def flush(self) -> None:
        """Send queued requests now (they otherwise go with the next request that has a reply)."""
        with self._conn() as conn:
            conn.flush()

    def close(self) -> None:
        """Release this device; the connection closes (freeing its remote buffers) with its last user."""
        if self._closed:
            return
        self._closed = True
        link = self.link
        with _links_lock, link.lock:
            link.users -= 1
            if link.users <= 0:
                link.close()
                if _links.get((link.endpoint, link.token)) is link:
                    del _links[(link.endpoint, link.token)]

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- memory ------------------------------------------------------------------------------------------------
    def memory(self) -> tuple[int, int]:
        with self._conn() as conn:
            rsp = conn.call(P.GetDeviceMemoryReq(self.device))
        return rsp.free_mem, rsp.total_mem  # type: ignore[attr-defined]

    def alloc_buffer(self, size: int, usage: str | None = None) -> RpcBuffer | None:
        if usage not in (None, "weights", "compute"):
            raise ValueError(f"buffer usage {usage!r} (expected 'weights', 'compute' or None)")
        with self._conn() as conn:
            rsp = conn.call(P.AllocBufferReq(self.device, size))
            if rsp.remote_ptr == 0:  # type: ignore[attr-defined]
                return None  # the worker could not allocate it (an answer, not an error)
            base = conn.call(P.BufferGetBaseReq(rsp.remote_ptr))  # type: ignore[attr-defined]
            self.link.n_buffers += 1
            return RpcBuffer(self, rsp.remote_size, base.base_ptr, rsp.remote_ptr,  # type: ignore[attr-defined]
                             self.link.generation, usage)

    def free_buffer(self, buf: Buffer) -> None:
        """FREE_BUFFER (queued). Freeing a buffer of a dropped connection only marks it freed."""
        if buf.freed:
            return
        self._generation_of(buf)
        buf.freed = True
        link = self.link
        with link.lock:
            if not link.alive(buf.generation):  # type: ignore[attr-defined]
                return
            link.n_buffers -= 1
            link.invalidate_graphs()
            link.connection().send(P.FreeBufferReq(buf.handle))  # type: ignore[attr-defined]

    def _span(self, buf: Buffer, offset: int, size: int) -> P.RpcTensor:
        """A 1-D I8 tensor covering [offset, offset + size) of `buf`: what SET/GET/MEMSET/COPY carry."""
        if offset < 0 or size < 0 or offset + size > buf.size:
            raise ValueError(f"region [{offset}, +{size}) outside {buf!r}")  # the worker would close on it
        return P.RpcTensor(1, GGMLType.I8, buf.handle, (size, 1, 1, 1), (1, size, size, size),  # type: ignore
                           data=buf.base + offset)

    def set(self, buf: Buffer, offset: int, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B") if not isinstance(data, (bytes, bytearray)) else memoryview(data)
        with self._conn([buf]) as conn:
            self._span(buf, offset, view.nbytes)
            for pos in range(0, view.nbytes, _CHUNK):
                chunk = view[pos:pos + _CHUNK]
                self._set_chunk(conn, buf, offset + pos, chunk)

    def _set_chunk(self, conn: RpcConnection, buf: Buffer, offset: int, chunk: memoryview) -> None:
        t = self._span(buf, offset, chunk.nbytes)
        flag = 0
        if chunk.nbytes > P.HASH_THRESHOLD and buf.is_weights:  # type: ignore[attr-defined]
            # like llama.cpp: a worker with a cache dir may already hold these bytes
            rsp = conn.call(P.SetTensorHashReq(t, 0, fnv1a_64(chunk)))
            if rsp.result:  # type: ignore[attr-defined]
                conn.traffic.hash_hits += 1
                conn.traffic.hash_bytes_saved += chunk.nbytes
                return
            flag = 1  # not cached yet: ask the worker to keep a copy
        conn.send(P.SetTensorReq(t, 0, chunk, flag))

    def get(self, buf: Buffer, offset: int, size: int) -> bytes:
        with self._conn([buf]) as conn:
            self._span(buf, offset, size)
            reqs = [P.GetTensorReq(self._span(buf, offset + pos, min(_CHUNK, size - pos)), 0,
                                   min(_CHUNK, size - pos)) for pos in range(0, size, _CHUNK)]
            rsps = conn.call_many(reqs) if reqs else []   # one round trip however many chunks
        if len(rsps) == 1:
            return bytes(rsps[0].data)  # type: ignore[attr-defined]
        return b"".join(r.data for r in rsps)  # type: ignore[attr-defined]

    def memset(self, buf: Buffer, offset: int, size: int, value: int) -> None:
        with self._conn([buf]) as conn:
            self._span(buf, offset, size)
            for pos in range(0, size, _CHUNK):
                n = min(_CHUNK, size - pos)
                conn.send(P.MemsetTensorReq(self._span(buf, offset + pos, n), 0, n, value & 0xFF))

    def clear(self, buf: Buffer, value: int) -> None:
        with self._conn([buf]) as conn:
            conn.send(P.BufferClearReq(buf.handle, value & 0xFF))  # type: ignore[attr-defined]

    def copy(self, src: Buffer, src_off: int, dst: Buffer, dst_off: int, size: int) -> bool:
        """COPY_TENSOR when both buffers are on this connection; False otherwise (the caller copies)."""
        if not isinstance(src, RpcBuffer) or src.link is not self.link:
            return False
        with self._conn([src, dst]) as conn:
            reqs = [P.CopyTensorReq(self._span(src, src_off + pos, min(_CHUNK, size - pos)),
                                    self._span(dst, dst_off + pos, min(_CHUNK, size - pos)))
                    for pos in range(0, size, _CHUNK)]
            rsps = conn.call_many(reqs) if reqs else []
        return all(r.result for r in rsps)  # type: ignore[attr-defined]

    def alloc_size(self, tensor: Tensor) -> int:
        """GET_ALLOC_SIZE where llama.cpp asks it (padded quantized rows, ops with scratch), cached per
        shape and never below nbytes; plain nbytes otherwise (no round trip)."""
        nbytes = tensor.nbytes
        padded = tensor.is_quantized and tensor.ne[0] % 512 != 0 and tensor.view_src is None
        if not padded and tensor.op not in _EXPANDING_OPS:
            return nbytes
        key = (self.device, int(tensor.type), int(tensor.op), tensor.op_params,
               tuple(n & _U32 for n in tensor.ne), tensor.nb)
        size = self.link.alloc_sizes.get(key)
        if size is None:
            with self._conn() as conn:
                ids = {id(tensor): 1}
                srcs = [s for s in tensor.src if s is not None]
                ids.update((id(s), 2 + i) for i, s in enumerate(srcs))
                wire = [self._wire(s, ids, 0) if s is not None else P.NULL_TENSOR for s in tensor.src]
                wire += [P.NULL_TENSOR] * (P.MAX_SRC - len(wire))
                rsp = conn.call(P.GetAllocSizeReq(self.device, self._wire(tensor, ids, 0), tuple(wire)))
                size = self.link.alloc_sizes[key] = rsp.alloc_size  # type: ignore[attr-defined]
        return max(size, nbytes)

    def init_tensor(self, tensor: Tensor) -> None:
        """INIT_TENSOR (queued) where llama.cpp sends it: quantized, ne0 % 512 != 0, not a view (a CUDA
        worker pads such rows). CPU workers ignore it."""
        if tensor.is_quantized and tensor.ne[0] % 512 != 0 and tensor.view_src is None:
            with self._conn() as conn:
                conn.send(P.InitTensorReq(self._wire(tensor, {id(tensor): 1}, 0)))

    # --- graphs ------------------------------------------------------------------------------------------------
    def _wire(self, t: Tensor, ids: dict[int, int], use_count: int) -> P.RpcTensor:
        """serialize_tensor: `buffer`/`data` only for storage in this connection's live buffers."""
        buf, offset = _storage(t)
        handle = data = 0
        if isinstance(buf, RpcBuffer) and buf.link is self.link:
            if not self.link.alive(buf.generation):
                raise BuffersLost(self.endpoint, f"tensor {t.name!r} is in a buffer of a dropped connection")
            if buf.freed:
                raise ValueError(f"tensor {t.name!r} is in a freed buffer")
            handle, data = buf.handle, buf.base + offset
        src = tuple(ids.get(id(s), 0) if s is not None else 0 for s in t.src)
        return P.RpcTensor(ids[id(t)], int(t.type), handle, tuple(n & _U32 for n in t.ne),  # type: ignore
                           tuple(n & _U32 for n in t.nb), int(t.op), t.op_params, t.flags,  # type: ignore
                           src + (0,) * (P.MAX_SRC - len(src)),
                           ids.get(id(t.view_src), 0) if t.view_src is not None else 0, t.view_offs,
                           data, _name(t), use_count)

    def prepare(self, nodes: Sequence[Tensor]) -> RpcPlan:
        """Serialize the graph once (tensor ids are local, 1..n) under a new uid."""
        return self._plan(nodes, next(_uids))

    def compute(self, nodes: Sequence[Tensor]) -> None:
        """Run a graph once: uid 0, so the worker does not cache it."""
        self._plan(nodes, 0).run()

    def _plan(self, nodes: Sequence[Tensor], uid: int) -> RpcPlan:
        tensors = _post_order(nodes)
        ids = {id(t): i + 1 for i, t in enumerate(tensors)}
        uses: collections.Counter[int] = collections.Counter()
        for n in dict.fromkeys(nodes):   # ggml's use counts: how many graph nodes read each tensor
            uses.update(id(s) for s in n.src if s is not None)
        with self._conn():
            wire = [self._wire(t, ids, uses.get(id(t), 0)) for t in tensors]
            buffers = self._check_placement(nodes, tensors, wire, ids)
            req = P.GraphComputeReq(self.device, uid, tuple(ids[id(n)] for n in nodes), tuple(wire))
            return RpcPlan(self, uid, self.link.generation, buffers, P.request_bytes(req),
                           P.request_bytes(P.GraphRecomputeReq(self.device, uid)), len(nodes), len(wire))

    def _check_placement(self, nodes: Sequence[Tensor], tensors: list[Tensor], wire: list[P.RpcTensor],
                         ids: dict[int, int]) -> list[RpcBuffer]:
        """Nodes that run, and what they read, must be stored on this connection (else the worker would
        compute into nothing); their buffers stop being treated as weights."""
        placed = {rt.id for rt in wire if rt.buffer}
        for node in nodes_to_run(nodes):
            for t in (node, *node.src):
                if t is not None and t.nelements > 0 and ids[id(t)] not in placed:
                    raise Unsupported(f"tensor {t.name!r} (used by node {node.name!r}) is not stored in a "
                                      f"buffer of {self.name}")
            buf, _ = _storage(node)
            if isinstance(buf, RpcBuffer):
                buf.written = True
        bufs: dict[int, RpcBuffer] = {}
        for t in tensors:
            buf, _ = _storage(t)
            if isinstance(buf, RpcBuffer) and buf.link is self.link:
                bufs[id(buf)] = buf
        return list(bufs.values())

    def _run_plan(self, plan: RpcPlan) -> None:
        with self._conn(generation=plan.generation) as conn:
            for buf in plan.buffers:
                if buf.freed:
                    raise ValueError(f"the graph uses {buf!r}, which was freed: prepare it again")
            if plan.n_nodes == 0:
                return
            cache = self.link.uids.setdefault(self.device, {})
            if plan.uid == 0:
                conn.send_frame("GRAPH_COMPUTE", [plan.compute])
            elif cache.get(plan.uid):
                conn.send_frame("GRAPH_RECOMPUTE", [plan.recompute])
            else:
                if len(cache) >= P.GRAPH_CACHE_LIMIT:
                    cache.clear()  # the worker clears its cache at the same count (§6.2 step 5)
                cache[plan.uid] = True
                conn.send_frame("GRAPH_COMPUTE", [plan.compute])
            conn.flush()
