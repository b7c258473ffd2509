"""Per-connection worker state and the semantics of every command (ggml-rpc.md §3, §5-§8).

A `Session` owns the buffers one client allocated and its graph cache. `Session.handle(request)` returns the
response message (or None) and raises `SessionError` (one-line reason) for anything the reference would
reject or assert on: the server then closes that connection only. Addresses on the wire are absolute; a
tensor's `data` maps back to (buffer, data - buffer.base) after the bounds checks below.
"""
from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..backends.base import Backend, Buffer, Plan, Unsupported
from ..ggml.tensor import Tensor
from ..ggml.types import (
    GGML_OP_COUNT,
    GGML_TYPE_COUNT,
    TRAITS,
    VIEW_OPS,
    GGMLOp,
    GGMLType,
    GluOp,
    TensorFlag,
    UnaryOp,
)
from . import auth
from . import protocol as P
from .cache import TensorCache

log = logging.getLogger("hybridllm.rpc")

U64 = (1 << 64) - 1
I64_MAX = (1 << 63) - 1

# Ops that carry host function pointers in op_params: executing them is remote code execution.
CUSTOM_OPS = frozenset({GGMLOp.MAP_CUSTOM1, GGMLOp.MAP_CUSTOM2, GGMLOp.MAP_CUSTOM3, GGMLOp.CUSTOM})
# Leading sources an op cannot run without (default 1; ops absent here need only src0).
_REQUIRED_SRCS = {
    GGMLOp.ARANGE: 0,
    GGMLOp.ADD: 2, GGMLOp.SUB: 2, GGMLOp.MUL: 2, GGMLOp.DIV: 2, GGMLOp.ADD1: 2, GGMLOp.ACC: 2,
    GGMLOp.MUL_MAT: 2, GGMLOp.OUT_PROD: 2, GGMLOp.GET_ROWS: 2, GGMLOp.SET_ROWS: 2, GGMLOp.CPY: 2,
    GGMLOp.SET: 2, GGMLOp.CONCAT: 2, GGMLOp.ROPE: 2, GGMLOp.COUNT_EQUAL: 2, GGMLOp.IM2COL: 2,
    GGMLOp.MUL_MAT_ID: 3, GGMLOp.ADD_ID: 3, GGMLOp.FLASH_ATTN_EXT: 3,
}
# (op, src index) -> the integer types that index tensor may have
_INDEX_TYPES = {
    (GGMLOp.GET_ROWS, 1): (GGMLType.I32,),
    (GGMLOp.SET_ROWS, 1): (GGMLType.I32, GGMLType.I64),
    (GGMLOp.MUL_MAT_ID, 2): (GGMLType.I32,),
    (GGMLOp.ADD_ID, 2): (GGMLType.I32,),
}
_TYPES = {t: GGMLType(t) for t in TRAITS}
_OPS = tuple(GGMLOp(i) for i in range(GGML_OP_COUNT))
_BLCK = tuple(TRAITS[t].blck_size if t in TRAITS else 0 for t in range(GGML_TYPE_COUNT))
_TSIZE = tuple(TRAITS[t].type_size if t in TRAITS else 0 for t in range(GGML_TYPE_COUNT))
_COMPUTE = int(TensorFlag.COMPUTE)
# Building Tensors slot by slot is ~3x faster than Tensor.__init__; only valid while we know every slot.
_FAST_TENSOR = set(Tensor.__slots__) == {"type", "ne", "nb", "op", "op_params", "flags", "src", "view_src",
                                         "view_offs", "buffer", "offset", "name", "id", "extra"}
_new_tensor = object.__new__


_MAX_ROW_LOOP = 1 << 16   # per-row Python loops (overlapping or non-host rows) beyond this are refused


def _strided_rows(buf: Buffer, off: int, size: int, n: int, stride: int) -> np.ndarray | None:
    """An (n, size) uint8 view of rows `stride` bytes apart in a host buffer, or None for other buffers."""
    arr = getattr(buf, "array", None)
    if not isinstance(arr, np.ndarray):
        return None
    return np.lib.stride_tricks.as_strided(arr[off:], shape=(n, size), strides=(stride, 1))


# Connections allocate and free from their own threads; backends count memory and hand out addresses with
# plain read-modify-write, so every alloc/free/memory query goes through this lock.
_ALLOC_LOCK = threading.Lock()


class SessionError(Exception):
    """A request the worker refuses; the message is the one-line reason logged when it closes."""


def _label(rt: P.RpcTensor) -> str:
    return f"tensor {rt.name_str!r} (id {rt.id:#x})"


class Session:
    """The state of one client connection over the server's shared devices."""

    def __init__(self, devices: Sequence[Backend], cache: TensorCache | None = None, *,
                 token: bytes | None = None, on_auth: Callable[[], None] | None = None) -> None:
        if not devices:
            raise ValueError("a worker needs at least one device")
        self.devices = list(devices)
        self.cache = cache
        self.buffers: dict[int, Buffer] = {}
        # per device: uid -> Plan, or None once FREE_BUFFER invalidated it (the uid still counts, §5.7)
        self.graphs: list[dict[int, Plan | None]] = [{} for _ in self.devices]
        if token is not None:   # every message goes through the token handshake until it succeeds
            self._auth = _TokenCheck(token, on_auth)
            self.handle = self._authenticate  # type: ignore[method-assign]

    def _authenticate(self, msg: P.Message) -> P.Message | None:
        rsp = self._auth.step(msg)
        if self._auth.done:
            del self.handle  # back to the class's dispatch
        return rsp

    def handle(self, msg: P.Message) -> P.Message | None:
        return _DISPATCH[type(msg)](self, msg)

    def close(self) -> None:
        """Free everything this connection owned (the reference does the same on disconnect)."""
        self.graphs = [{} for _ in self.devices]
        with _ALLOC_LOCK:
            for buf in self.buffers.values():
                buf.backend.free_buffer(buf)
        self.buffers.clear()

    # --- lookups and validation --------------------------------------------------------------------------------
    def _device(self, index: int) -> Backend:
        if index >= len(self.devices):
            raise SessionError(f"device {index} out of range ({len(self.devices)} devices)")
        return self.devices[index]

    def _buffer(self, handle: int) -> Buffer:
        buf = self.buffers.get(handle)
        if buf is None:
            raise SessionError(f"buffer {handle:#x} not found")
        return buf

    def _tensor(self, rt: P.RpcTensor) -> Tensor:
        """deserialize_tensor (§3): validate type, op and shape, map `data` into its buffer.

        Inlined arithmetic: a gemma GRAPH_COMPUTE rebuilds ~1100 of these per new graph.
        """
        typ, op = rt.type, rt.op
        blck = _BLCK[typ] if typ < len(_BLCK) else 0
        if not blck:
            raise SessionError(f"{_label(rt)}: invalid type {typ}")
        if op >= GGML_OP_COUNT:
            raise SessionError(f"{_label(rt)}: invalid op {op}")
        if op in CUSTOM_OPS:
            raise SessionError(f"{_label(rt)}: refused op {GGMLOp(op).name} (function pointers on the wire)")
        n0, n1, n2, n3 = rt.ne
        if n0 % blck:
            raise SessionError(f"{_label(rt)}: ne0={n0} is not a multiple of the block size {blck}")
        if n0 * n1 * n2 * n3 > I64_MAX:
            raise SessionError(f"{_label(rt)}: element count overflows int64")
        buf = self.buffers.get(rt.buffer) if rt.buffer else None
        offset = 0
        if buf is not None:
            data, base = rt.data, buf.base
            offset = data - base
            if n0 and n1 and n2 and n3:  # ggml_nbytes (§10.1) from the wire ne/nb
                b0, b1, b2, b3 = rt.nb
                rest = (n1 - 1) * b1 + (n2 - 1) * b2 + (n3 - 1) * b3
                size = (_TSIZE[typ] + (n0 - 1) * b0 if blck == 1 else n0 * b0 // blck) + rest
                if offset < 0 or offset + size > buf.size or data + size > U64:
                    raise SessionError(f"{_label(rt)}: data [{data:#x}, {data + size:#x}) outside its buffer "
                                       f"[{base:#x}, {base + buf.size:#x})")
            elif not 0 <= offset <= buf.size:
                offset = 0  # an empty tensor never touches memory
        name = rt.name.split(b"\0", 1)[0].decode("utf-8", "replace")
        if not _FAST_TENSOR:
            t = Tensor(_TYPES[typ], rt.ne, rt.nb, op=_OPS[op], op_params=rt.op_params, flags=rt.flags,
                       src=[None] * P.MAX_SRC, buffer=buf, offset=offset, name=name)
            t.id = rt.id
            return t
        t = _new_tensor(Tensor)
        t.type, t.ne, t.nb, t.op, t.op_params, t.flags = _TYPES[typ], rt.ne, rt.nb, _OPS[op], rt.op_params, rt.flags
        t.src, t.view_src, t.view_offs, t.buffer, t.offset = [None] * P.MAX_SRC, None, 0, buf, offset
        t.name, t.id, t.extra = name, rt.id, None
        return t

    def _stored(self, rt: P.RpcTensor, what: str) -> tuple[Tensor, Buffer]:
        t = self._tensor(rt)
        if t.buffer is None:
            raise SessionError(f"{what}: {_label(rt)} is not in a buffer of this connection")
        return t, t.buffer

    @staticmethod
    def _region(buf: Buffer, start: int, size: int, what: str) -> int:
        """The reference's region check: start inside the buffer and size fitting; returns the offset."""
        end = buf.base + buf.size
        if start < buf.base or start >= end or size > end - start:
            raise SessionError(f"{what}: region [{start:#x}, +{size}) outside buffer "
                               f"[{buf.base:#x}, {end:#x})")
        return start - buf.base

    @staticmethod
    def _within_tensor(t: Tensor, offset: int, size: int, what: str) -> None:
        # ggml_backend_tensor_set/get assert this (the reference process aborts); we close instead
        if offset + size > t.nbytes:
            raise SessionError(f"{what}: offset {offset} + size {size} exceeds {t.name!r} nbytes {t.nbytes}")

    # --- handshake and device queries -----------------------------------------------------------------------
    def _hello(self, req: P.HelloReq) -> P.HelloRsp:
        return P.HelloRsp()  # 8.0.0, 24 zero caps: plain TCP, no RDMA upgrade (§2.4)

    def _device_count(self, req: P.DeviceCountReq) -> P.DeviceCountRsp:
        return P.DeviceCountRsp(len(self.devices))

    def _get_alignment(self, req: P.GetAlignmentReq) -> P.GetAlignmentRsp:
        return P.GetAlignmentRsp(self._device(req.device).alignment)

    def _get_max_size(self, req: P.GetMaxSizeReq) -> P.GetMaxSizeRsp:
        return P.GetMaxSizeRsp(min(self._device(req.device).max_size, U64))

    def _get_device_memory(self, req: P.GetDeviceMemoryReq) -> P.GetDeviceMemoryRsp:
        dev = self._device(req.device)
        with _ALLOC_LOCK:
            free, total = dev.memory()
        return P.GetDeviceMemoryRsp(free, total)

    def _get_alloc_size(self, req: P.GetAllocSizeReq) -> P.GetAllocSizeRsp:
        dev = self._device(req.device)
        t = self._tensor(req.tensor)
        for i, s in enumerate(req.srcs):
            if s.id:
                t.src[i] = self._tensor(s)
        backend = t.buffer.backend if t.buffer is not None else dev
        return P.GetAllocSizeRsp(backend.alloc_size(t))

    # --- buffers ---------------------------------------------------------------------------------------------
    def _alloc_buffer(self, req: P.AllocBufferReq) -> P.AllocBufferRsp:
        dev = self._device(req.device)
        # never ask for more than the device has: a failed huge request must not disturb the backend
        with _ALLOC_LOCK:
            buf = dev.alloc_buffer(req.size) if req.size <= min(dev.memory()[1], dev.max_size) else None
        if buf is None:
            log.info("ALLOC_BUFFER of %d bytes on device %d failed", req.size, req.device)
            return P.AllocBufferRsp(0, 0)  # an answer, not a close (§5.5)
        handle = 0
        while handle == 0 or handle in self.buffers:
            handle = secrets.randbits(64)
        self.buffers[handle] = buf
        return P.AllocBufferRsp(handle, buf.size)

    def _buffer_get_base(self, req: P.BufferGetBaseReq) -> P.BufferGetBaseRsp:
        return P.BufferGetBaseRsp(self._buffer(req.remote_ptr).base)

    def _free_buffer(self, req: P.FreeBufferReq) -> None:
        buf = self._buffer(req.remote_ptr)
        for cache in self.graphs:  # every cached graph of every device may point into it (§5.7)
            for uid in cache:
                cache[uid] = None
        del self.buffers[req.remote_ptr]
        with _ALLOC_LOCK:
            buf.backend.free_buffer(buf)

    def _buffer_clear(self, req: P.BufferClearReq) -> None:
        buf = self._buffer(req.remote_ptr)
        buf.backend.clear(buf, req.value)

    # --- tensor data -----------------------------------------------------------------------------------------
    def _init_tensor(self, req: P.InitTensorReq) -> None:
        self._tensor(req.tensor)  # validated only: CPU-like buffers have no init hook (§5.9)

    def _set_tensor(self, req: P.SetTensorReq) -> None:
        t, buf = self._stored(req.tensor, "SET_TENSOR")
        n = len(req.data)
        off = self._region(buf, req.tensor.data + req.offset, n, "SET_TENSOR")
        self._within_tensor(t, req.offset, n, "SET_TENSOR")
        if self.cache is not None and req.cache_flag:
            self.cache.store(req.data)
        buf.backend.set(buf, off, req.data)

    def _set_tensor_hash(self, req: P.SetTensorHashReq) -> P.SetTensorHashRsp:
        data = self.cache.load(req.hash) if self.cache is not None else None
        if data is None:
            return P.SetTensorHashRsp(0)
        t, buf = self._stored(req.tensor, "SET_TENSOR_HASH")
        off = self._region(buf, req.tensor.data + req.offset, len(data), "SET_TENSOR_HASH")
        self._within_tensor(t, req.offset, len(data), "SET_TENSOR_HASH")
        buf.backend.set(buf, off, data)
        return P.SetTensorHashRsp(1)

    def _get_tensor(self, req: P.GetTensorReq) -> P.GetTensorRsp:
        t, buf = self._stored(req.tensor, "GET_TENSOR")
        off = self._region(buf, req.tensor.data + req.offset, req.size, "GET_TENSOR")
        self._within_tensor(t, req.offset, req.size, "GET_TENSOR")
        return P.GetTensorRsp(buf.backend.get(buf, off, req.size))

    def _copy_tensor(self, req: P.CopyTensorReq) -> P.CopyTensorRsp:
        src, sbuf = self._stored(req.src, "COPY_TENSOR")
        _, dbuf = self._stored(req.dst, "COPY_TENSOR")
        n = src.nbytes
        if req.dst.data < dbuf.base or req.dst.data + n > dbuf.base + dbuf.size:
            raise SessionError(f"COPY_TENSOR: {n} bytes at {req.dst.data:#x} overflow the destination buffer")
        ok = dbuf.backend.copy(sbuf, src.offset, dbuf, req.dst.data - dbuf.base, n)
        return P.CopyTensorRsp(int(ok))

    def _memset_tensor(self, req: P.MemsetTensorReq) -> None:
        t, buf = self._stored(req.tensor, "MEMSET_TENSOR")
        if req.offset > t.nbytes or req.size > t.nbytes - req.offset:
            raise SessionError(f"MEMSET_TENSOR: [{req.offset}, +{req.size}) exceeds {t.name!r} nbytes {t.nbytes}")
        rel = req.tensor.data - buf.base
        if rel < 0 or rel > buf.size or req.offset > buf.size - rel or req.size > buf.size - rel - req.offset:
            raise SessionError("MEMSET_TENSOR: region outside its buffer")
        if req.size:
            buf.backend.memset(buf, rel + req.offset, req.size, req.value)

    def _span_2d(self, t: Tensor, buf: Buffer, rt: P.RpcTensor, offset: int, size: int, n_copies: int,
                 stride: int, what: str) -> int:
        """Validate a strided region (§5.16); returns the buffer offset of the first row."""
        if n_copies == 0 or size == 0:
            raise SessionError(f"{what}: empty copy (size {size}, n_copies {n_copies})")
        span = (n_copies - 1) * stride + size
        end = buf.base + buf.size
        if span > U64 or not buf.base <= rt.data <= end or offset > end - rt.data \
                or span > end - rt.data - offset:
            raise SessionError(f"{what}: span {span} at offset {offset} outside its buffer")
        self._within_tensor(t, offset, span, what)
        return rt.data - buf.base + offset

    def _set_tensor_2d(self, req: P.SetTensor2dReq) -> None:
        if req.n_copies == 0 or req.size == 0:
            raise SessionError(f"SET_TENSOR_2D: empty copy (size {req.size}, n_copies {req.n_copies})")
        if req.size * req.n_copies != len(req.data):
            raise SessionError(f"SET_TENSOR_2D: {len(req.data)} data bytes for {req.n_copies} x {req.size}")
        t, buf = self._stored(req.tensor, "SET_TENSOR_2D")
        off = self._span_2d(t, buf, req.tensor, req.offset, req.size, req.n_copies, req.stride, "SET_TENSOR_2D")
        rows = _strided_rows(buf, off, req.size, req.n_copies, req.stride)
        if rows is not None and req.stride >= req.size:   # rows do not overlap: one strided numpy copy
            rows[...] = np.frombuffer(req.data, np.uint8).reshape(req.n_copies, req.size)
            return
        if req.n_copies > _MAX_ROW_LOOP:
            raise SessionError(f"SET_TENSOR_2D: {req.n_copies} overlapping rows (stride {req.stride} < size {req.size})")
        data = memoryview(req.data)
        for i in range(req.n_copies):  # overlapping rows: sequential writes, later rows win
            buf.backend.set(buf, off + i * req.stride, data[i * req.size:(i + 1) * req.size])

    def _get_tensor_2d(self, req: P.GetTensor2dReq) -> P.GetTensorRsp:
        t, buf = self._stored(req.tensor, "GET_TENSOR_2D")
        off = self._span_2d(t, buf, req.tensor, req.offset, req.size, req.n_copies, req.stride, "GET_TENSOR_2D")
        if req.size * req.n_copies > buf.size:  # only overlapping rows can ask for more than the buffer holds
            raise SessionError(f"GET_TENSOR_2D: {req.n_copies} x {req.size} bytes exceed the buffer size")
        rows = _strided_rows(buf, off, req.size, req.n_copies, req.stride)
        if rows is not None:
            return P.GetTensorRsp(rows.tobytes())
        if req.n_copies > _MAX_ROW_LOOP:
            raise SessionError(f"GET_TENSOR_2D: too many rows ({req.n_copies}) for this device")
        get = buf.backend.get
        return P.GetTensorRsp(b"".join(get(buf, off + i * req.stride, req.size) for i in range(req.n_copies)))

    # --- graphs ----------------------------------------------------------------------------------------------
    def _graph_compute(self, req: P.GraphComputeReq) -> None:
        dev = self._device(req.device)
        t0 = time.perf_counter()
        nodes = self.build_graph(req)
        t1 = time.perf_counter()
        plan = dev.prepare(nodes)
        t2 = time.perf_counter()
        if req.uid:
            cache = self.graphs[req.device]
            if len(cache) >= P.GRAPH_CACHE_LIMIT:
                cache.clear()  # the client clears its uid set at the same count (§6.4)
            cache[req.uid] = plan
        self._run(plan)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("GRAPH_COMPUTE dev %d uid %d: %d nodes, %d tensors; rebuild %.1f ms, prepare %.1f ms, "
                      "run %.1f ms", req.device, req.uid, len(req.nodes), len(req.tensors), 1e3 * (t1 - t0),
                      1e3 * (t2 - t1), 1e3 * (time.perf_counter() - t2))

    def _graph_recompute(self, req: P.GraphRecomputeReq) -> None:
        self._device(req.device)
        plan = self.graphs[req.device].get(req.uid)
        if plan is None:
            raise SessionError(f"graph with uid {req.uid} not found on device {req.device}")
        t0 = time.perf_counter()
        self._run(plan)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("GRAPH_RECOMPUTE dev %d uid %d: run %.1f ms", req.device, req.uid,
                      1e3 * (time.perf_counter() - t0))

    @staticmethod
    def _run(plan: Plan) -> None:
        try:
            plan.run()
        except (Unsupported, SessionError):
            raise
        except Exception as exc:  # a kernel tripping on bad data must not take the worker down
            raise SessionError(f"graph compute failed: {type(exc).__name__}: {exc}") from exc

    # --- collectives: no peer links in this worker (tensor parallelism is out of scope) ----------------------
    def _comm_init(self, req: P.CommInitReq) -> P.CommInitRsp:
        log.info("COMM_INIT (rank %d of %d) declined: no collective support", req.rank, req.world)
        return P.CommInitRsp(0)  # the client then falls back to copies through the master (§5.20)

    def _comm_allreduce(self, req: P.CommAllreduceReq) -> None:
        self._device(req.device)
        raise SessionError("COMM_ALLREDUCE without a peer (COMM_INIT was declined)")

    def _comm_free(self, req: P.CommFreeReq) -> None:
        self._device(req.device)

    @staticmethod
    def _link_view(t: Tensor, rt: P.RpcTensor, base: Tensor, base_rt: P.RpcTensor) -> None:
        """ggml's view invariants (ggml_backend_view_init): same buffer, data = base data + view_offs,
        and the view's span inside its base. Real masters always satisfy them; anything else is forged."""
        t.view_src, t.view_offs = base, rt.view_offs
        if base.buffer is not t.buffer:
            raise SessionError(f"{_label(rt)}: view is not in the buffer of its view_src")
        if t.buffer is not None and (rt.data != base_rt.data + rt.view_offs
                                     or rt.view_offs + t.nbytes > base.nbytes):
            raise SessionError(f"{_label(rt)}: view [+{rt.view_offs}, {t.nbytes} bytes) does not match "
                               f"its view_src {base.name!r} ({base.nbytes} bytes)")

    def build_graph(self, req: P.GraphComputeReq) -> list[Tensor]:
        """Rebuild the nodes of a GRAPH_COMPUTE (§6.2), iteratively (graphs can be deeper than Python's stack)."""
        index: dict[int, P.RpcTensor] = {}
        for rt in reversed(req.tensors):   # the first occurrence of an id wins
            index[rt.id] = rt
        memo: dict[int, Tensor] = {}
        made: list[tuple[Tensor, P.RpcTensor]] = []
        stack = list(req.nodes)
        if not all(stack):
            raise SessionError("graph has a null node id")
        while stack:
            tid = stack.pop()
            if tid in memo:
                continue
            found = index.get(tid)
            if found is None:
                raise SessionError(f"graph references tensor id {tid:#x} that was not sent")
            rt = found
            t = self._tensor(rt)
            if t.buffer is None and rt.data:
                raise SessionError(f"{_label(rt)}: invalid data ptr {rt.data:#x} without a buffer")
            memo[tid] = t
            made.append((t, rt))
            stack += [s for s in rt.src if s and s not in memo]
            if rt.view_src and rt.view_src not in memo:
                stack.append(rt.view_src)
        for t, rt in made:
            t.src = [memo[s] if s else None for s in rt.src]
            if rt.view_src:
                self._link_view(t, rt, memo[rt.view_src], index[rt.view_src])
        nodes = [memo[n] for n in req.nodes]
        for node in nodes:
            if node.flags & _COMPUTE and node.op not in VIEW_OPS:
                _check_node(node)
        return nodes


class _TokenCheck:
    """The worker's side of hybridllm's token handshake (auth.py, protocol/README.md §9): two HELLOs."""

    def __init__(self, token: bytes, on_auth: Callable[[], None] | None) -> None:
        self.key, self.on_auth = token, on_auth
        self.client: bytes | None = None
        self.worker = auth.new_nonce()
        self.done = False

    def step(self, msg: P.Message) -> P.HelloRsp:
        if not isinstance(msg, P.HelloReq):
            raise SessionError(f"authentication required: got {P.CMD_OF[type(msg)].name} before the token proof")
        if self.client is None:
            self.client = auth.client_nonce(msg.conn_caps)
            if self.client is None:
                raise SessionError("authentication required: the client sent no token (this worker runs "
                                   "with --token; llama.cpp masters cannot connect to it)")
            return P.HelloRsp(conn_caps=auth.challenge_caps(self.worker))
        if not auth.check(auth.proof(self.key, b"client", self.client, self.worker), msg.conn_caps):
            raise SessionError("authentication failed: wrong token")
        self.done = True
        if self.on_auth is not None:
            self.on_auth()
        return P.HelloRsp(conn_caps=auth.proof(self.key, b"worker", self.client, self.worker))


# The command table drives dispatch: every request class maps to the handler named after its command.
_DISPATCH: dict[type[P.Message], Callable[[Session, Any], P.Message | None]] = {
    spec.request: getattr(Session, "_" + spec.cmd.name.lower()) for spec in P.COMMANDS.values()}


def _check_node(node: Tensor) -> None:
    """Structural checks for a node that will run; value checks (index ranges) are the kernels' job."""
    need = _REQUIRED_SRCS.get(node.op, 1)
    for i in range(need):
        if node.src[i] is None:
            raise SessionError(f"node {node.name!r} ({node.op.name}) is missing src[{i}]")
    for (op, i), types in _INDEX_TYPES.items():
        if node.op == op and node.src[i] is not None and node.src[i].type not in types:  # type: ignore
            raise SessionError(f"node {node.name!r} ({op.name}): src[{i}] must be "
                               f"{'/'.join(t.name for t in types)}, got {node.src[i].type.name}")  # type: ignore
    if node.op == GGMLOp.UNARY and not 0 <= node.param_i32(0) < len(UnaryOp):
        raise SessionError(f"node {node.name!r}: invalid unary op {node.param_i32(0)}")
    if node.op == GGMLOp.GLU and not 0 <= node.param_i32(0) < len(GluOp):
        raise SessionError(f"node {node.name!r}: invalid glu op {node.param_i32(0)}")
