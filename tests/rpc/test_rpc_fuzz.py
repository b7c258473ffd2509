"""Property-based fuzzing (hypothesis) of the decoder, of Session semantics and of whole sessions over sockets
while a well-behaved client keeps computing on another connection. Bounded to roughly 20 s in total."""
from __future__ import annotations

import dataclasses
import os
import socket
import struct
import threading
import time

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rpc_helpers import HOST, add_graph

from hybridllm.backends.base import Unsupported
from hybridllm.backends.numpy_backend import NumpyBackend
from hybridllm.rpc import protocol as P
from hybridllm.rpc.client import RpcClient
from hybridllm.rpc.server import ServerThread
from hybridllm.rpc.worker import Session, SessionError

U64 = (1 << 64) - 1
U32 = (1 << 32) - 1
BUF_SIZE = 4096
# HYBRIDLLM_FUZZ_SCALE=N runs N times the examples with fresh randomness (CI: 1, derandomized)
SCALE = int(os.environ.get("HYBRIDLLM_FUZZ_SCALE", "1"))
FUZZ = settings(deadline=None, suppress_health_check=list(HealthCheck), derandomize=SCALE == 1)
COUNTS: dict[str, int] = {}


def _count(name: str) -> None:
    COUNTS[name] = COUNTS.get(name, 0) + 1


# --- strategies: values clustered around the boundaries the worker checks -----------------------------------

def u64_near(*anchors: int) -> st.SearchStrategy[int]:
    return st.one_of(st.sampled_from([0, 1, U64, U64 - 7, 1 << 63, 1 << 32]),
                     st.builds(lambda a, d: min(max(a + d, 0), U64), st.sampled_from(anchors or (0,)),
                               st.integers(-80, 80)),
                     st.integers(0, U64))


def rpc_tensors(handles: list[int], base: int) -> st.SearchStrategy[P.RpcTensor]:
    ids = st.sampled_from([0, 1, 2, 3, 4, 5])
    small = st.one_of(st.integers(0, 8), st.sampled_from([16, 32, 256, U32]))
    return st.builds(
        P.RpcTensor,
        id=ids,
        type=st.one_of(st.sampled_from([0, 0, 0, 1, 26, 27, 30, 8, 12]), st.integers(0, 60)),
        buffer=st.one_of(st.sampled_from(handles), st.integers(0, U64)),
        ne=st.tuples(small, small, small, small),
        nb=st.tuples(*[st.one_of(st.sampled_from([1, 2, 4, 16, 32, 64, 256]), st.integers(0, U32))] * 4),
        op=st.one_of(st.sampled_from([0, 1, 2, 7, 25, 29, 32, 34, 35, 37, 40, 42, 46, 91, 92, 95, 100]),
                     st.integers(0, 255)),
        op_params=st.binary(min_size=64, max_size=64),
        flags=st.sampled_from([0, 16, 16, 3]),
        src=st.tuples(*[ids] * 3).map(lambda t: t + (0,) * 7),
        view_src=ids, view_offs=st.sampled_from([0, 4, 64, U64]),
        data=u64_near(base, base + BUF_SIZE),
        name=st.just(b"fuzz".ljust(64, b"\0")),
        use_count=st.integers(0, 3))


def good_tensors(handle: int, base: int) -> st.SearchStrategy[P.RpcTensor]:
    """Mostly-valid tensors (contiguous F32/I32 inside the buffer) so that fuzzing also reaches compute."""
    def make(id_, typ, ne, k, op, params, flags, src):
        nb = (4, 4 * ne[0], 4 * ne[0] * ne[1], 4 * ne[0] * ne[1] * ne[2])
        return P.RpcTensor(id_, typ, handle, ne, nb, op, params, flags, src + (0,) * 7, 0, 0, base + 16 * k,
                           b"good".ljust(64, b"\0"), 0)
    ids = st.sampled_from([1, 2, 3, 4, 5])
    return st.builds(make, ids, st.sampled_from([0, 0, 26]), st.tuples(*[st.integers(1, 4)] * 2 + [st.just(1)] * 2),
                     st.integers(0, 250), st.sampled_from([0, 2, 6, 7, 8, 9, 10, 25, 32, 34, 35, 40, 42, 50, 91, 100]),
                     st.one_of(st.just(bytes(64)), st.binary(min_size=64, max_size=64)), st.sampled_from([16, 16, 0]),
                     st.tuples(ids, ids, st.sampled_from([0, 1])))


def requests(handles: list[int], base: int) -> st.SearchStrategy[P.Message]:
    t = st.one_of(rpc_tensors(handles, base), good_tensors(handles[0], base))
    off = u64_near(0, 4, BUF_SIZE)
    size = st.one_of(st.integers(0, 64), u64_near(BUF_SIZE))
    dev = st.sampled_from([0, 0, 1, 7, U32])
    handle = st.one_of(st.sampled_from(handles), st.integers(0, U64))
    return st.one_of(
        st.builds(P.AllocBufferReq, dev, st.one_of(st.integers(0, 8192), st.sampled_from([1 << 40, U64]))),
        st.builds(P.GetAlignmentReq, dev), st.builds(P.GetMaxSizeReq, dev), st.builds(P.GetDeviceMemoryReq, dev),
        st.builds(P.BufferGetBaseReq, handle), st.builds(P.FreeBufferReq, handle),
        st.builds(P.BufferClearReq, handle, st.integers(0, 255)),
        st.builds(P.SetTensorReq, t, off, st.binary(max_size=96), st.integers(0, 1)),
        st.builds(P.SetTensorHashReq, t, off, st.integers(0, U64)),
        st.builds(P.GetTensorReq, t, off, size), st.builds(P.CopyTensorReq, t, t),
        st.builds(P.InitTensorReq, t), st.builds(P.GetAllocSizeReq, dev, t),
        st.builds(P.MemsetTensorReq, t, off, size, st.integers(0, 255)),
        st.builds(lambda tt, o, s, n, sd: P.SetTensor2dReq(tt, o, s, n, sd, bytes(s * n)), t, off,
                  st.integers(0, 16), st.integers(0, 16), u64_near(0, 4, 16)),
        st.builds(P.GetTensor2dReq, t, off, size, st.one_of(st.integers(0, 16), u64_near(1 << 40)), u64_near(0, 4)),
        st.builds(P.GraphComputeReq, dev, st.integers(0, 3), st.lists(st.sampled_from([0, 1, 2, 3, 4, 5, 9]),
                                                                       max_size=4).map(tuple),
                  st.lists(t, max_size=6).map(tuple)),
        st.builds(P.GraphRecomputeReq, dev, st.integers(0, 3)),
        st.builds(P.CommInitReq, dev, st.integers(0, 3), st.integers(0, 3), st.integers(0, 65535)),
        st.builds(P.CommAllreduceReq, dev, t), st.builds(P.CommFreeReq, dev), st.just(P.DeviceCountReq()))


# --- 1. the decoder never raises, whatever the bytes and however they are split ------------------------------

@settings(FUZZ, max_examples=600 * SCALE)
@given(st.lists(st.one_of(st.binary(max_size=64),
                          st.tuples(st.integers(0, 30), st.integers(0, 400)).map(
                              lambda cs: struct.pack("<BQ", *cs) + bytes(cs[1] % 97))), max_size=8),
       st.lists(st.integers(1, 50), min_size=1, max_size=8))
def test_parser_never_raises(chunks, cuts):
    _count("parser")
    stream = P.request_bytes(P.HelloReq()) + b"".join(chunks)
    parser = P.ServerParser(max_payload=1 << 20)
    events, pos, i = [], 0, 0
    while pos < len(stream):
        k = cuts[i % len(cuts)]
        events += parser.feed(stream[pos:pos + k])
        pos, i = pos + k, i + 1
    errors = [e for e in events if isinstance(e, P.ProtocolError)]
    assert len(errors) <= 1 and (not errors or events[-1] is errors[0])
    assert all(isinstance(e, (P.Message, P.ProtocolError)) for e in events)


# --- 2. Session semantics: only the two refusal types ever come out --------------------------------------------

HANDLE = 0x4848_4848_4848_4848   # the fuzzed session's buffer is re-keyed to this handle
BASE = 1 << 32                    # the fuzzed buffer is re-based here (bases are process-wide otherwise)
REQUESTS = requests([HANDLE], BASE)   # built once: building strategies per example dominates the runtime


@settings(FUZZ, max_examples=800 * SCALE)
@given(st.lists(REQUESTS, min_size=1, max_size=6))
def test_session_refuses_cleanly(reqs):
    _count("session")
    be = NumpyBackend(mem_limit=1 << 20)
    s = Session([be])
    buf = s.buffers.pop(s.handle(P.AllocBufferReq(0, BUF_SIZE)).remote_ptr)
    buf.base = BASE  # the session maps data through buf.base alone, so re-basing is a fixed-address buffer
    s.buffers[HANDLE] = buf
    try:
        for req in reqs:
            try:
                payload = b"".join(bytes(p) for p in req.encode())
            except struct.error:
                continue  # out-of-range field for its C type: cannot be on the wire
            req = type(req).decode(payload) if type(req).SIZE is not None else req
            try:
                s.handle(req)
                _count("accepted")
                _count("ok " + type(req).__name__)
            except (SessionError, Unsupported):
                _count("refused")
                break  # the server would close here
    finally:
        s.close()
    assert be.allocated == 0


# --- 3. whole sessions over sockets while a good client computes ------------------------------------------------

def _wire(msgs: list[P.Message], mutation: int, cut: int) -> bytes:
    out = bytearray(P.request_bytes(P.HelloReq()))
    for m in msgs:
        try:
            out += P.request_bytes(m)
        except struct.error:
            continue
    if mutation == 1 and len(out) > 40:   # truncate somewhere
        del out[33 + cut % (len(out) - 33):]
    elif mutation == 2 and len(out) > 42:  # corrupt a size field
        struct.pack_into("<Q", out, 34, (cut * 7919) % (1 << 24))
    elif mutation == 3:                    # oversized garbage frame
        out += struct.pack("<BQ", cut % 24, 1 << 40)
    return bytes(out)


def test_sessions_over_sockets_while_a_good_client_computes():
    be = NumpyBackend(mem_limit=64 << 20)
    with ServerThread([be]) as srv:
        stop, good_runs, failures = threading.Event(), [0], []

        def good() -> None:
            try:
                with RpcClient(HOST, srv.port) as c:
                    req, e = add_graph(c, uid=7)
                    a = req.tensors[0]
                    while not stop.is_set():
                        x = np.random.default_rng(good_runs[0]).normal(size=8).astype(np.float32)
                        c.set_tensor(a, x.tobytes())
                        c.call(P.GraphRecomputeReq(0, 7))
                        got = np.frombuffer(c.get_tensor(e, 32), np.float32)
                        np.testing.assert_allclose(got, 2 * (x + 10) + 1, rtol=1e-6)
                        good_runs[0] += 1
            except Exception as exc:  # noqa: BLE001 - reported below
                failures.append(exc)

        worker = threading.Thread(target=good)
        worker.start()

        @settings(FUZZ, max_examples=300 * SCALE)
        @given(st.lists(REQUESTS, max_size=5), st.integers(0, 3), st.integers(0, 1 << 20))
        def one_session(msgs, mutation, cut):
            _count("socket")
            with socket.create_connection((HOST, srv.port), timeout=10) as sock:
                sock.sendall(P.request_bytes(P.HelloReq()) + P.request_bytes(P.AllocBufferReq(0, BUF_SIZE)))
                reply = _recv(sock, 36 + 24)
                if reply is None:
                    return
                h = struct.unpack_from("<Q", reply, 44)[0]
                sock.sendall(P.request_bytes(P.BufferGetBaseReq(h)))
                base = struct.unpack("<Q", _recv(sock, 16)[8:])[0]  # type: ignore[index]
                msgs = [_rebase(m, h, base) for m in msgs]
                try:
                    sock.sendall(_wire(msgs, mutation, cut)[33:])
                    sock.shutdown(socket.SHUT_WR)
                    while sock.recv(65536):
                        pass
                except OSError:
                    pass

        t0 = time.monotonic()
        try:
            one_session()
        finally:
            stop.set()
            worker.join(30)
        elapsed = time.monotonic() - t0
        assert not failures, failures
        assert good_runs[0] > 0
        assert not worker.is_alive()
        with RpcClient(HOST, srv.port) as c:    # the server is still healthy
            assert c.call(P.DeviceCountReq()) == P.DeviceCountRsp(1)
    deadline = time.monotonic() + 10
    while be.allocated and time.monotonic() < deadline:
        time.sleep(0.01)
    assert be.allocated == 0   # every fuzz connection's buffers were freed
    print(f"\nfuzz examples: {COUNTS}; good client computed {good_runs[0]} times in {elapsed:.1f} s")


def _rebase(m: P.Message, handle: int, base: int) -> P.Message:
    """Point the placeholder handle/addresses of a generated request at this connection's real buffer."""
    def fix(t: P.RpcTensor) -> P.RpcTensor:
        data = t.data - BASE + base if BASE - 256 <= t.data <= BASE + 2 * BUF_SIZE else t.data
        return t._replace(buffer=handle if t.buffer == HANDLE else t.buffer, data=data)
    changes = {}
    for f in m.__dataclass_fields__:  # type: ignore[attr-defined]
        v = getattr(m, f)
        if isinstance(v, P.RpcTensor):
            changes[f] = fix(v)
        elif f == "tensors":
            changes[f] = tuple(fix(t) for t in v)
        elif f == "remote_ptr" and v == HANDLE:
            changes[f] = handle
    return dataclasses.replace(m, **changes) if changes else m


def _recv(sock: socket.socket, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf
