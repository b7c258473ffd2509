"""The sans-IO codec: the command table, rpc_tensor, golden frames of the real peer, the incremental parser."""
from __future__ import annotations

import random
import struct

import pytest
from rpc_helpers import golden_frame, golden_index

from hybridllm.rpc import protocol as P
from hybridllm.rpc.client import rpc_tensor

# ggml-rpc.md §4: (request payload size or None if variable, response payload size or None)
SPEC_TABLE = {
    0: (12, 16), 1: (4, 8), 2: (4, 8), 3: (8, 8), 4: (8, None), 5: (9, None), 6: (None, None),
    7: (312, 1), 8: (312, "var"), 9: (592, 1), 10: (None, None), 11: (4, 16), 12: (296, None),
    13: (3260, 8), 14: (24, 28), 15: (0, 4), 16: (12, None), 17: (313, None), 18: (None, None),
    19: (328, "var"), 20: (80, 1), 21: (300, None), 22: (4, None),
}


def test_command_table_matches_spec():
    assert sorted(P.COMMANDS) == list(range(23))
    for cmd, (req, rsp) in SPEC_TABLE.items():
        spec = P.COMMANDS[cmd]
        assert spec.req_size == req, spec.cmd.name
        if rsp is None:
            assert spec.response is None, spec.cmd.name
        elif rsp == "var":
            assert spec.response is not None and spec.response.SIZE is None
        else:
            assert spec.response is not None and spec.response.SIZE == rsp, spec.cmd.name
    assert P.COMMANDS[6].min_req_size == 305 and P.COMMANDS[18].min_req_size == 328


def test_rpc_tensor_layout_offsets():
    """Field offsets of §3, checked with an independent struct.pack_into per field."""
    t = rpc_tensor(0x1122334455667788, 12, (256, 3, 2, 1), buffer=0xAABB, data=0xDEAD0000, op=29,
                   op_params=bytes(range(64)), flags=16, src=(1, 2, 3, 4, 5, 6, 7, 8, 9, 10), view_src=77,
                   view_offs=99, name="blk.0.attn_q.weight", use_count=5)
    raw = t.pack()
    expect = bytearray(296)
    struct.pack_into("<Q", expect, 0, 0x1122334455667788)
    struct.pack_into("<I", expect, 8, 12)
    struct.pack_into("<Q", expect, 12, 0xAABB)
    struct.pack_into("<4I", expect, 20, 256, 3, 2, 1)
    struct.pack_into("<4I", expect, 36, *t.nb)
    struct.pack_into("<I", expect, 52, 29)
    expect[56:120] = bytes(range(64))
    struct.pack_into("<i", expect, 120, 16)
    struct.pack_into("<10Q", expect, 124, *range(1, 11))
    struct.pack_into("<QQQ", expect, 204, 77, 99, 0xDEAD0000)
    expect[228:228 + 19] = b"blk.0.attn_q.weight"
    struct.pack_into("<i", expect, 292, 5)
    assert raw == bytes(expect)
    assert P.unpack_tensor(raw) == t
    assert P.unpack_tensor(raw).name_str == "blk.0.attn_q.weight"


def _samples() -> list[P.Message]:
    t = rpc_tensor(5, 0, (4, 2), buffer=7, data=4096, name="x")
    u = rpc_tensor(6, 1, (8,), op=2, src=(5, 5))
    return [
        P.HelloReq(), P.HelloRsp(), P.DeviceCountReq(), P.DeviceCountRsp(2), P.AllocBufferReq(1, 1 << 40),
        P.AllocBufferRsp(123, 456), P.GetAlignmentReq(0), P.GetAlignmentRsp(32), P.GetMaxSizeReq(0),
        P.GetMaxSizeRsp((1 << 64) - 1), P.BufferGetBaseReq(9), P.BufferGetBaseRsp(1 << 32),
        P.FreeBufferReq(9), P.BufferClearReq(9, 255), P.SetTensorReq(t, 8, b"\x01\x02\x03", 1),
        P.SetTensorHashReq(t, 0, 0xCBF29CE484222325), P.SetTensorHashRsp(1), P.GetTensorReq(t, 4, 16),
        P.GetTensorRsp(b"abcd"), P.CopyTensorReq(t, u), P.CopyTensorRsp(1),
        P.GraphComputeReq(0, 77, (6, 5), (t, u)), P.GetDeviceMemoryReq(0), P.GetDeviceMemoryRsp(1, 2),
        P.InitTensorReq(t), P.GetAllocSizeReq(0, u, (t,) + (P.NULL_TENSOR,) * 9), P.GetAllocSizeRsp(64),
        P.GraphRecomputeReq(0, 77), P.MemsetTensorReq(t, 1, 2, 3), P.SetTensor2dReq(t, 0, 2, 3, 4, b"xxyyzz"),
        P.GetTensor2dReq(t, 0, 2, 3, 4), P.CommInitReq(0, 1, 2, 51052, b"host".ljust(64, b"\0")),
        P.CommInitRsp(0), P.CommAllreduceReq(0, t), P.CommFreeReq(0),
    ]


@pytest.mark.parametrize("msg", _samples(), ids=lambda m: type(m).__name__)
def test_round_trip(msg: P.Message):
    payload = b"".join(bytes(p) for p in msg.encode())
    if type(msg).SIZE is not None:
        assert len(payload) == type(msg).SIZE
    back = type(msg).decode(payload)
    assert b"".join(bytes(p) for p in back.encode()) == payload
    if not hasattr(msg, "data"):
        assert back == msg


def test_server_parser_round_trips_every_request_in_any_chunking():
    reqs = [m for m in _samples() if m.__class__ in P.CMD_OF]
    hello, rest = reqs[0], [m for m in reqs[1:] if not isinstance(m, P.HelloReq)]
    stream = b"".join(P.request_bytes(m) for m in [hello, *rest])
    rng = random.Random(0)
    for _ in range(20):
        parser, events, pos = P.ServerParser(), [], 0
        while pos < len(stream):
            k = rng.randint(1, 400)
            events += parser.feed(stream[pos:pos + k])
            pos += k
        assert [P.request_bytes(e) for e in events] == [P.request_bytes(m) for m in [hello, *rest]]


def test_large_set_tensor_payload_is_not_copied():
    """A big SET_TENSOR lands in one buffer via get_buffer/buffer_updated; its data is a view of it."""
    t = rpc_tensor(1, 0, (1 << 18,))
    frame = P.request_bytes(P.SetTensorReq(t, 0, bytes(range(256)) * 4096))
    parser = P.ServerParser()
    assert parser.feed(P.request_bytes(P.HelloReq()))
    events, pos = [], 0
    while pos < len(frame):
        buf = parser.get_buffer(-1)
        k = min(len(buf), len(frame) - pos, 70_000)
        buf[:k] = frame[pos:pos + k]
        pos += k
        events += parser.buffer_updated(k)
    (msg,) = events
    assert isinstance(msg, P.SetTensorReq) and isinstance(msg.data, memoryview)
    assert isinstance(msg.data.obj, bytearray) and len(msg.data.obj) == len(frame) - 9
    assert msg.data == bytes(range(256)) * 4096


@pytest.mark.parametrize("frames,reason", [
    ([P.request_bytes(P.DeviceCountReq())], "expected HELLO"),
    ([b"\x0e" + struct.pack("<Q", 20) + bytes(20)], "HELLO payload of 20"),
    ([P.request_bytes(P.HelloReq()), P.request_bytes(P.HelloReq())], "HELLO inside"),
    ([P.request_bytes(P.HelloReq()), b"\x18" + struct.pack("<Q", 0)], "unknown command 24"),
    ([P.request_bytes(P.HelloReq()), b"\xff" + struct.pack("<Q", 0)], "unknown command 255"),
    ([P.request_bytes(P.HelloReq()), b"\x17" + struct.pack("<Q", 0)], "unhandled command 23"),
    ([P.request_bytes(P.HelloReq()), b"\x0f" + struct.pack("<Q", 4) + bytes(4)], "DEVICE_COUNT payload of 4"),
    ([P.request_bytes(P.HelloReq()), b"\x10" + struct.pack("<Q", 4) + bytes(4)], "expected 12"),  # v7 RECOMPUTE
    ([P.request_bytes(P.HelloReq()), b"\x06" + struct.pack("<Q", 304) + bytes(304)], "shorter than 305"),
    ([P.request_bytes(P.HelloReq()), b"\x12" + struct.pack("<Q", 327) + bytes(327)], "shorter than 328"),
    ([P.request_bytes(P.HelloReq()), b"\x0a" + struct.pack("<Q", 15) + bytes(15)], "shorter than 16"),
    ([P.request_bytes(P.HelloReq()), b"\x0a" + struct.pack("<QIQI", 16, 0, 0, 5)], "5 node ids"),
    ([P.request_bytes(P.HelloReq()), b"\x0a" + struct.pack("<QIQIQI", 28, 0, 0, 1, 1, 2)], "2 tensors"),
    ([P.request_bytes(P.HelloReq()), b"\x06" + struct.pack("<Q", 1 << 62)], "exceeds the limit"),
])
def test_parser_rejects(frames: list[bytes], reason: str):
    parser = P.ServerParser(max_payload=1 << 30)
    events = []
    for f in frames:
        events += parser.feed(f)
    assert isinstance(events[-1], P.ProtocolError), events
    assert reason.lower() in events[-1].reason.lower()
    assert "\n" not in events[-1].reason
    assert parser.dead and parser.feed(P.request_bytes(P.DeviceCountReq())) == []


def test_client_side_response_checks():
    req = P.GetTensorReq(rpc_tensor(1, 0, (4,)), 0, 16)
    assert P.response_size(req) == 16
    assert P.response_size(P.GetTensor2dReq(rpc_tensor(1, 0, (4,)), 0, 4, 3, 8)) == 12
    assert P.response_size(P.SetTensorReq(rpc_tensor(1, 0, (4,)), 0, b"")) is None
    with pytest.raises(P.ProtocolError):
        P.decode_response(req, bytes(15))
    with pytest.raises(P.ProtocolError):
        P.decode_response(P.HelloReq(), bytes(27))


# --- golden frames captured from the real peer (protocol/capture.py) -----------------------------------------

GOLDEN_FRAMES = golden_index()


def test_golden_covers_the_commands_a_master_sends():
    seen = {(f["cmd"], f["dir"]) for f in GOLDEN_FRAMES}
    for cmd in ("HELLO", "DEVICE_COUNT", "GET_DEVICE_MEMORY", "GET_ALIGNMENT", "GET_MAX_SIZE", "GET_ALLOC_SIZE",
                "ALLOC_BUFFER", "BUFFER_GET_BASE", "SET_TENSOR_HASH", "GET_TENSOR"):
        assert (cmd, "req") in seen and (cmd, "rsp") in seen, cmd
    for cmd in ("INIT_TENSOR", "SET_TENSOR", "BUFFER_CLEAR", "GRAPH_COMPUTE", "GRAPH_RECOMPUTE", "FREE_BUFFER"):
        assert (cmd, "req") in seen, cmd


@pytest.mark.parametrize("entry", [f for f in GOLDEN_FRAMES if f["dir"] == "req"], ids=lambda f: f["file"])
def test_golden_request_decodes_and_reencodes_byte_exactly(entry: dict):
    frame = golden_frame(entry["file"])
    cmd, size = struct.unpack_from("<BQ", frame)
    assert P.Cmd(cmd).name == entry["cmd"] and size == len(frame) - 9 == entry["payload_size"]
    parser = P.ServerParser()
    if cmd != P.Cmd.HELLO:
        parser.feed(P.request_bytes(P.HelloReq()))
    (msg,) = parser.feed(frame)
    assert not isinstance(msg, P.ProtocolError), msg
    assert P.request_bytes(msg) == frame


@pytest.mark.parametrize("entry", [f for f in GOLDEN_FRAMES if f["dir"] == "rsp"], ids=lambda f: f["file"])
def test_golden_response_decodes_and_reencodes_byte_exactly(entry: dict):
    frame = golden_frame(entry["file"])
    size, = struct.unpack_from("<Q", frame)
    spec = P.COMMANDS[P.Cmd[entry["cmd"]]]
    assert spec.response is not None and size == len(frame) - 8
    msg = spec.response.decode(frame[8:])
    assert b"".join(bytes(p) for p in P.encode_response(msg)) == frame


def test_golden_hello_is_the_documented_handshake():
    req = golden_frame(next(f["file"] for f in GOLDEN_FRAMES if f["cmd"] == "HELLO" and f["dir"] == "req"))
    rsp = golden_frame(next(f["file"] for f in GOLDEN_FRAMES if f["cmd"] == "HELLO" and f["dir"] == "rsp"))
    assert req == P.request_bytes(P.HelloReq()) == bytes.fromhex("0e1800000000000000") + bytes(24)
    assert rsp == b"".join(P.encode_response(P.HelloRsp())) == bytes.fromhex("1c0000000000000008000000") + bytes(24)


def test_client_parser_pipelined_replies():
    t = rpc_tensor(1, 0, (4,))
    reqs = [P.HelloReq(), P.DeviceCountReq(), P.GetTensorReq(t, 0, 5), P.AllocBufferReq(0, 64)]
    rsps = [P.HelloRsp(), P.DeviceCountRsp(3), P.GetTensorRsp(b"12345"), P.AllocBufferRsp(7, 64)]
    cp = P.ClientParser()
    for r in reqs:
        cp.expect(r)
    stream = b"".join(b"".join(bytes(x) for x in P.encode_response(r)) for r in rsps)
    got = []
    for i in range(0, len(stream), 3):
        got += cp.feed(stream[i:i + 3])
    assert [q for q, _ in got] == reqs and [type(r) for _, r in got] == [type(r) for r in rsps]
    assert got[1][1] == P.DeviceCountRsp(3) and bytes(got[2][1].data) == b"12345" and cp.waiting == 0
    with pytest.raises(ValueError):
        cp.expect(P.FreeBufferReq(1))
    cp.expect(P.GetAlignmentReq(0))
    with pytest.raises(P.ProtocolError, match="GET_ALIGNMENT response of 4 bytes"):
        cp.feed(struct.pack("<Q", 4) + bytes(4))
