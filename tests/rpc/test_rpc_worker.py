"""Worker semantics over real sockets: every command's happy path, and one test per validation class that
checks the connection is closed with one log line while a second client on the same server keeps working."""
from __future__ import annotations

import socket
import struct
import time

import numpy as np
import pytest
from rpc_helpers import COMPUTE, F32, HOST, add_graph

from hybridllm.backends.numpy_backend import NumpyBackend
from hybridllm.ggml.types import GGMLOp, GGMLType
from hybridllm.rpc import protocol as P
from hybridllm.rpc.client import RpcClient, rpc_tensor
from hybridllm.rpc.worker import Session, SessionError

U64 = (1 << 64) - 1
I32 = GGMLType.I32


# --- happy paths ---------------------------------------------------------------------------------------------

def test_device_queries(connect):
    c = connect()
    assert c.call(P.DeviceCountReq()) == P.DeviceCountRsp(2)
    assert c.call(P.GetAlignmentReq(1)) == P.GetAlignmentRsp(32)
    assert c.call(P.GetMaxSizeReq(0)) == P.GetMaxSizeRsp(U64)
    mem = c.call(P.GetDeviceMemoryReq(1))
    assert 0 < mem.free_mem <= mem.total_mem


def test_memory_is_capped_by_mem_limit():
    from hybridllm.rpc.server import ServerThread
    with ServerThread([NumpyBackend(mem_limit=1 << 20)]) as st, RpcClient(HOST, st.port) as c:
        assert c.call(P.GetDeviceMemoryReq(0)) == P.GetDeviceMemoryRsp(1 << 20, 1 << 20)
        h, _ = c.alloc_buffer(1 << 19)
        assert c.call(P.GetDeviceMemoryReq(0)) == P.GetDeviceMemoryRsp(1 << 19, 1 << 20)
        assert c.call(P.AllocBufferReq(0, 1 << 20)) == P.AllocBufferRsp(0, 0)  # a refusal, not a close
        c.call(P.FreeBufferReq(h))
        assert c.call(P.GetDeviceMemoryReq(0)).free_mem == 1 << 20


def test_alloc_buffers(connect):
    c = connect()
    rsp = c.call(P.AllocBufferReq(0, 0))
    assert rsp.remote_ptr != 0 and rsp.remote_size == 0
    assert c.call(P.BufferGetBaseReq(rsp.remote_ptr)).base_ptr == 0
    h1, b1 = c.alloc_buffer(100)
    h2, b2 = c.alloc_buffer(100, device=1)
    assert len({rsp.remote_ptr, h1, h2}) == 3 and b1 % 32 == 0 and b2 % 32 == 0 and b1 != b2
    assert c.call(P.AllocBufferReq(0, 1 << 62)) == P.AllocBufferRsp(0, 0)
    assert c.call(P.DeviceCountReq()) == P.DeviceCountRsp(2)  # still open


def test_tensor_data_commands(connect):
    c = connect()
    h, base = c.alloc_buffer(256)
    t = rpc_tensor(1, F32, (16,), buffer=h, data=base)
    c.call(P.BufferClearReq(h, 0xAB))
    assert c.get_tensor(t, 64) == b"\xab" * 64
    c.call(P.InitTensorReq(t))
    c.set_tensor(t, bytes(range(8)), offset=4)
    assert c.get_tensor(t, 16) == b"\xab" * 4 + bytes(range(8)) + b"\xab" * 4
    c.call(P.MemsetTensorReq(t, 2, 3, 0x11))
    assert c.get_tensor(t, 6) == b"\xab\xab\x11\x11\x11\x01"
    c.call(P.MemsetTensorReq(t, 64, 0, 0x22))  # size 0 at the very end: a no-op
    # 2D: rows of 4 bytes every 8 bytes
    c.call(P.SetTensor2dReq(t, 16, 4, 3, 8, b"AAAABBBBCCCC"))
    assert c.get_tensor(t, 24, offset=16) == b"AAAA" + b"\xab" * 4 + b"BBBB" + b"\xab" * 4 + b"CCCC" + b"\xab" * 4
    rsp = c.call(P.GetTensor2dReq(t, 16, 4, 3, 8))
    assert bytes(rsp.data) == b"AAAABBBBCCCC"
    u = rpc_tensor(2, F32, (16,), buffer=h, data=base + 128)
    assert c.call(P.CopyTensorReq(t, u)) == P.CopyTensorRsp(1)
    assert c.get_tensor(u, 64) == c.get_tensor(t, 64)
    q = rpc_tensor(3, GGMLType.Q4_K, (512, 3))
    assert c.call(P.GetAllocSizeReq(0, q)) == P.GetAllocSizeRsp(3 * 2 * 144)


def test_graph_compute_recompute_and_flags(connect):
    c = connect()
    req, e = add_graph(c, uid=1234)
    np.testing.assert_array_equal(np.frombuffer(c.get_tensor(e, 32), np.float32), 2 * (np.arange(8) + 10) + 1)
    d = req.tensors[3]
    assert c.get_tensor(d, 32) == b"\x7f" * 32  # not COMPUTE-flagged: untouched (§6.3)
    a = req.tensors[0]
    c.set_tensor(a, np.ones(8, np.float32).tobytes())
    c.call(P.GraphRecomputeReq(0, 1234))
    np.testing.assert_array_equal(np.frombuffer(c.get_tensor(e, 32), np.float32), np.full(8, 23.0))


def test_graph_with_self_reference_and_zero_nodes(connect):
    """ggml_cast: a CPY whose src[1] is the node itself; an empty graph is accepted."""
    c = connect()
    h, base = c.alloc_buffer(256)
    x = rpc_tensor(1, F32, (4,), buffer=h, data=base)
    y = rpc_tensor(2, GGMLType.F16, (4,), buffer=h, data=base + 64, op=GGMLOp.CPY, src=(1, 2), flags=COMPUTE)
    c.set_tensor(x, np.array([1.5, -2.25, 65504, 1e-8], np.float32).tobytes())
    c.call(P.GraphComputeReq(0, 0, (), ()))
    c.call(P.GraphComputeReq(0, 0, (2,), (x, y)))
    assert c.get_tensor(y, 8) == bytes.fromhex("003e80c0ff7b0000")  # values observed on the reference (§A)


def test_graph_cache_1024_rule():
    be = NumpyBackend()
    s = Session([be])
    h = s.handle(P.AllocBufferReq(0, 64)).remote_ptr
    base = s.buffers[h].base
    x = rpc_tensor(1, F32, (4,), buffer=h, data=base)
    y = rpc_tensor(2, F32, (4,), buffer=h, data=base + 16, op=GGMLOp.SCALE, src=(1,), flags=COMPUTE,
                   op_params=np.array([1.0, 0.0], np.float32).tobytes())
    for uid in range(1, P.GRAPH_CACHE_LIMIT + 2):
        s.handle(P.GraphComputeReq(0, uid, (2,), (x, y)))
    assert list(s.graphs[0]) == [P.GRAPH_CACHE_LIMIT + 1]  # cleared at 1024 entries, like the client
    s.handle(P.GraphRecomputeReq(0, P.GRAPH_CACHE_LIMIT + 1))
    with pytest.raises(SessionError, match="uid 1 not found"):
        s.handle(P.GraphRecomputeReq(0, 1))
    s.close()
    assert be.allocated == 0


def test_many_clients_at_once(worker):
    """Unlike the reference server, concurrent clients are served at the same time, each isolated."""
    clients = [RpcClient(HOST, worker.port) for _ in range(6)]
    try:
        results = []
        for i, c in enumerate(clients):
            _, e = add_graph(c, uid=5, scale=float(i))
            results.append((c, e, i))
        for c, e, i in results:
            np.testing.assert_array_equal(np.frombuffer(c.get_tensor(e, 32), np.float32),
                                          i * (np.arange(8) + 10) + 1)
    finally:
        for c in clients:
            c.close()


# --- validation: each closes only its own connection -------------------------------------------------------------

def raw(cmd: int, payload: bytes) -> bytes:
    return struct.pack("<BQ", cmd, len(payload)) + payload


def test_bad_hello(connect, expect_close):
    c = connect(hello=False)
    c.send_raw(P.request_bytes(P.DeviceCountReq()))
    expect_close(c, "expected HELLO")
    c = connect(hello=False)
    c.send_raw(raw(14, bytes(20)))
    expect_close(c, "HELLO payload of 20")
    c = connect()
    c.send_raw(P.request_bytes(P.HelloReq()))
    expect_close(c, "HELLO inside")


@pytest.mark.parametrize("frame,reason", [
    (raw(15, bytes(4)), "DEVICE_COUNT payload of 4"),
    (raw(1, bytes(5)), "GET_ALIGNMENT payload of 5"),
    (raw(16, bytes(4)), "GRAPH_RECOMPUTE payload of 4"),
    (raw(6, bytes(300)), "shorter than 305"),
    (raw(10, struct.pack("<IQI", 0, 0, 1000)), "1000 node ids"),
])
def test_wrong_sizes(connect, expect_close, frame, reason):
    c = connect()
    c.send_raw(frame)
    expect_close(c, reason)


@pytest.mark.parametrize("cmd,reason", [(24, "unknown command 24"), (200, "unknown command 200"),
                                        (23, "unhandled command 23")])
def test_unknown_commands(connect, expect_close, cmd, reason):
    c = connect()
    c.send_raw(raw(cmd, b""))
    expect_close(c, reason)


@pytest.mark.parametrize("msg", [P.BufferGetBaseReq(0x1234), P.FreeBufferReq(0x1234), P.BufferClearReq(0x1234, 0)],
                         ids=lambda m: type(m).__name__)
def test_unknown_buffer_handle(connect, expect_close, msg):
    c = connect()
    c.send(msg)
    expect_close(c, "buffer 0x1234 not found")


def test_foreign_buffer_handle_in_tensor(connect, expect_close):
    """A handle of another connection is unknown here: the tensor has no buffer, SET_TENSOR closes."""
    other = connect()
    h, base = other.alloc_buffer(64)
    c = connect()
    c.set_tensor(rpc_tensor(1, F32, (4,), buffer=h, data=base), bytes(16))
    expect_close(c, "not in a buffer of this connection")


@pytest.mark.parametrize("msg", [P.GetAlignmentReq(2), P.AllocBufferReq(7, 16), P.GraphRecomputeReq(9, 1),
                                 P.GetDeviceMemoryReq(2), P.CommFreeReq(5)], ids=lambda m: type(m).__name__)
def test_device_out_of_range(connect, expect_close, msg):
    c = connect()
    c.send(msg)
    expect_close(c, "out of range")


def _tensor_case(kind: str, h: int, base: int) -> tuple[P.Message, str]:
    t = lambda **kw: rpc_tensor(1, kw.pop("type", F32), kw.pop("ne", (4,)), buffer=h, **kw)
    cases = {
        "before_base": (P.GetTensorReq(t(data=base - 4), 0, 4), "outside its buffer"),
        "past_end": (P.GetTensorReq(t(data=base + 1020), 0, 4), "outside its buffer"),
        "u64_overflow": (P.GetTensorReq(t(data=U64 - 8), 0, 4), "outside its buffer"),
        "nb_overflow": (P.GetTensorReq(t(ne=(4, 1, 1, 2), nb=(4, 16, 16, 0xFFFFFFFF), data=base), 0, 4),
                        "outside its buffer"),
        "offset_overflow": (P.GetTensorReq(t(data=base), U64 - 2, 4), "outside buffer"),
        "get_past_nbytes": (P.GetTensorReq(t(data=base), 8, 16), "exceeds"),
        "set_past_nbytes": (P.SetTensorReq(t(data=base), 12, bytes(8)), "exceeds"),
        "set_past_buffer": (P.SetTensorReq(t(data=base + 1008), 0, bytes(32)), "outside buffer"),
        "memset_past_nbytes": (P.MemsetTensorReq(t(data=base), 4, 16, 0), "exceeds"),
        "copy_overflow": (P.CopyTensorReq(t(ne=(64,), data=base), t(ne=(1,), data=base + 1020)), "overflow"),
        "span2d_overflow": (P.GetTensor2dReq(t(data=base), 0, 4, 1 << 40, 1 << 40), "outside its buffer"),
        "span2d_past_nbytes": (P.GetTensor2dReq(t(data=base), 0, 4, 2, 16), "exceeds"),
        "set2d_size_mismatch": (P.SetTensor2dReq(t(data=base), 0, 4, 3, 8, bytes(8)), "data bytes"),
        "set2d_zero_copies": (P.SetTensor2dReq(t(data=base), 0, 4, 0, 8, b""), "empty copy"),
        "bad_type": (P.InitTensorReq(t(type=4, data=base, nb=(4, 16, 16, 16))), "invalid type 4"),
        "type_43": (P.InitTensorReq(t(type=43, data=base, nb=(4, 4, 4, 4))), "invalid type 43"),
        "bad_op": (P.InitTensorReq(t(op=101, data=base)), "invalid op 101"),
        "bad_block": (P.InitTensorReq(t(type=GGMLType.Q4_0, ne=(33,), nb=(18, 36, 36, 36), data=base)),
                      "multiple of the block size"),
        "ne_overflow": (P.InitTensorReq(rpc_tensor(1, F32, (0xFFFFFFFF,) * 4, nb=(4, 4, 4, 4))), "overflows int64"),
        "allreduce": (P.CommAllreduceReq(0, t(data=base)), "COMM_ALLREDUCE"),
    }
    return cases[kind]


@pytest.mark.parametrize("kind", ["before_base", "past_end", "u64_overflow", "nb_overflow", "offset_overflow",
                                  "get_past_nbytes", "set_past_nbytes", "set_past_buffer", "memset_past_nbytes",
                                  "copy_overflow", "span2d_overflow", "span2d_past_nbytes", "set2d_size_mismatch",
                                  "set2d_zero_copies", "bad_type", "type_43", "bad_op", "bad_block",
                                  "ne_overflow", "allreduce"])
def test_tensor_and_region_checks(connect, expect_close, kind):
    c = connect()
    h, base = c.alloc_buffer(1024)
    msg, reason = _tensor_case(kind, h, base)
    c.send(msg)
    expect_close(c, reason)


def test_comm_init_answers_zero(connect):
    c = connect()
    assert c.call(P.CommInitReq(0, 0, 2, 51000)) == P.CommInitRsp(0)
    assert c.call(P.CommInitReq(9, 0, 2, 51000)) == P.CommInitRsp(0)
    c.call(P.CommFreeReq(0))
    assert c.call(P.DeviceCountReq()) == P.DeviceCountRsp(2)


# --- graph validation ----------------------------------------------------------------------------------------

def _graph(c: RpcClient, kind: str) -> tuple[P.GraphComputeReq, str]:
    h, base = c.alloc_buffer(1024)
    a = rpc_tensor(1, F32, (4, 2), buffer=h, data=base, name="a")
    scale = np.array([1.0, 0.0], np.float32).tobytes()
    node = lambda src, **kw: rpc_tensor(2, kw.pop("type", F32), kw.pop("ne", (4, 2)), buffer=h,
                                        data=kw.pop("data", base + 64), src=src, flags=COMPUTE, name="n", **kw)
    if kind == "missing_src":
        return P.GraphComputeReq(0, 0, (2,), (node((1, 3), op=GGMLOp.ADD), a)), "not sent"
    if kind == "missing_node":
        return P.GraphComputeReq(0, 0, (5,), (a,)), "not sent"
    if kind == "null_node":
        return P.GraphComputeReq(0, 0, (0,), (a,)), "null node"
    if kind == "null_buffer_with_data":
        b = rpc_tensor(1, F32, (4, 2), buffer=0, data=base, name="a")
        return P.GraphComputeReq(0, 0, (2,), (node((1,), op=GGMLOp.SCALE, op_params=scale), b)), "invalid data ptr"
    if kind == "custom_op":
        return P.GraphComputeReq(0, 0, (2,), (node((1,), op=GGMLOp.MAP_CUSTOM1), a)), "MAP_CUSTOM1"
    if kind == "custom_op_in_source":
        bad = rpc_tensor(1, F32, (4, 2), buffer=h, data=base, op=GGMLOp.CUSTOM)
        return P.GraphComputeReq(0, 0, (2,), (node((1,), op=GGMLOp.SCALE, op_params=scale), bad)), "CUSTOM"
    if kind == "get_rows_f32_index":
        return P.GraphComputeReq(0, 0, (2,), (node((1, 1), op=GGMLOp.GET_ROWS), a)), "must be I32"
    if kind == "get_rows_out_of_range":
        idx = rpc_tensor(3, I32, (2,), buffer=h, data=base + 512, name="idx")
        c.set_tensor(idx, np.array([1, 7], np.int32).tobytes())
        return P.GraphComputeReq(0, 0, (2,), (node((1, 3), op=GGMLOp.GET_ROWS), a, idx)), "out of range"
    if kind == "missing_required_src":
        return P.GraphComputeReq(0, 0, (2,), (node((1,), op=GGMLOp.ADD), a)), "missing src[1]"
    if kind == "bad_unary":
        p = struct.pack("<i", 99).ljust(64, b"\0")
        return P.GraphComputeReq(0, 0, (2,), (node((1,), op=GGMLOp.UNARY, op_params=p), a)), "invalid unary"
    if kind == "unsupported_op":
        return P.GraphComputeReq(0, 0, (2,), (node((1,), op=GGMLOp.CONV_TRANSPOSE_1D), a)), "unsupported"
    if kind == "forged_view":
        other_h, other_base = c.alloc_buffer(64)
        v = rpc_tensor(4, F32, (4,), buffer=other_h, data=other_base, op=GGMLOp.VIEW, view_src=1, name="v")
        return P.GraphComputeReq(0, 0, (2,), (node((4,), op=GGMLOp.SCALE, op_params=scale, ne=(4,)), a, v)), \
            "view is not in the buffer"
    if kind == "view_offs_mismatch":
        v = rpc_tensor(4, F32, (4,), buffer=h, data=base + 16, op=GGMLOp.VIEW, view_src=1, view_offs=8, name="v")
        return P.GraphComputeReq(0, 0, (2,), (node((4,), op=GGMLOp.SCALE, op_params=scale, ne=(4,)), a, v)), \
            "does not match"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["missing_src", "missing_node", "null_node", "null_buffer_with_data", "custom_op",
                                  "custom_op_in_source", "get_rows_f32_index", "get_rows_out_of_range",
                                  "missing_required_src", "bad_unary", "unsupported_op", "forged_view",
                                  "view_offs_mismatch"])
def test_graph_checks(connect, expect_close, kind):
    c = connect()
    req, reason = _graph(c, kind)
    c.send(req)
    expect_close(c, reason)


def test_recompute_after_free_buffer(connect, expect_close):
    c = connect()
    add_graph(c, uid=42)
    h2, _ = c.alloc_buffer(64)
    c.call(P.GraphRecomputeReq(0, 42))
    c.call(P.FreeBufferReq(h2))   # any FREE_BUFFER invalidates every cached graph (§5.7)
    c.call(P.GraphRecomputeReq(0, 42))
    expect_close(c, "uid 42 not found")


@pytest.mark.parametrize("uid", [0, 12345])
def test_recompute_unknown_uid(connect, expect_close, uid):
    c = connect()
    add_graph(c, uid=0)
    c.call(P.GraphRecomputeReq(0, uid))
    expect_close(c, f"uid {uid} not found")


def test_closing_frees_the_connection_buffers():
    from hybridllm.rpc.server import ServerThread
    be = NumpyBackend()
    with ServerThread([be]) as st:
        c = RpcClient(HOST, st.port)
        c.alloc_buffer(1 << 20)
        c.alloc_buffer(1 << 10)
        assert be.allocated == (1 << 20) + (1 << 10)
        c.close()
        deadline = time.monotonic() + 10
        while be.allocated and time.monotonic() < deadline:
            time.sleep(0.01)
        assert be.allocated == 0


def test_half_closed_client_still_gets_its_answers(worker):
    """Requests received before the client's EOF are answered (then the worker closes), as the reference does."""
    with socket.create_connection((HOST, worker.port), timeout=10) as s:
        s.sendall(P.request_bytes(P.HelloReq()) + P.request_bytes(P.DeviceCountReq())
                  + P.request_bytes(P.GetAlignmentReq(0)))
        s.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := s.recv(4096):
            got += chunk
    expect = b"".join(b"".join(P.encode_response(r)) for r in
                      (P.HelloRsp(), P.DeviceCountRsp(2), P.GetAlignmentRsp(32)))
    assert got == expect


def test_overlapping_2d_rows(connect, expect_close):
    """stride < size: rows overlap; writes are sequential (later rows win) and reads are capped."""
    c = connect()
    h, base = c.alloc_buffer(64)
    t = rpc_tensor(1, F32, (16,), buffer=h, data=base)
    c.call(P.SetTensor2dReq(t, 0, 4, 3, 2, b"AAAABBBBCCCC"))
    assert c.get_tensor(t, 8) == b"AABBCCCC"
    assert bytes(c.call(P.GetTensor2dReq(t, 0, 4, 3, 2)).data) == b"AABBBBCCCCCC"
    c.send(P.GetTensor2dReq(t, 0, 4, 1 << 20, 0))   # 4 MiB of the same row from a 64-byte buffer
    expect_close(c, "exceed the buffer size")
