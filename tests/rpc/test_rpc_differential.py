"""Differential tests: the same client script against llama.cpp's rpc-server (subprocess) and our worker.
Replies must be equal (except handles and addresses, which are the server's choice), and the bad inputs the
reference rejects by closing must close on ours too. Inputs that crash the reference process are not sent."""
from __future__ import annotations

import struct
from collections.abc import Callable, Iterator

import numpy as np
import pytest
from rpc_helpers import COMPUTE, F32, HOST, add_graph

from hybridllm.backends.numpy_backend import NumpyBackend
from hybridllm.ggml.types import GGMLOp, GGMLType
from hybridllm.rpc import protocol as P
from hybridllm.rpc.client import RpcClient, rpc_tensor
from hybridllm.rpc.server import ServerThread
from hybridllm.testing.procs import start_peer_server

U64 = (1 << 64) - 1


@pytest.fixture(scope="module")
def servers(peer, tmp_path_factory) -> Iterator[dict[str, int]]:
    with start_peer_server(threads=1, log_dir=tmp_path_factory.mktemp("peer")) as ref, \
            ServerThread([NumpyBackend()]) as ours:
        yield {"peer": ref.port, "ours": ours.port}


def both(servers: dict[str, int], script: Callable[[RpcClient], object]) -> dict[str, object]:
    out = {}
    for kind, port in servers.items():
        with RpcClient(HOST, port) as c:   # the reference serves one client at a time: close each
            out[kind] = script(c)
    return out


def _data_script(c: RpcClient) -> list[object]:
    h, base = c.alloc_buffer(512)
    zero = c.call(P.AllocBufferReq(0, 0))
    t = rpc_tensor(1, F32, (32,), buffer=h, data=base)
    u = rpc_tensor(2, F32, (32,), buffer=h, data=base + 256)
    c.call(P.BufferClearReq(h, 0x5A))
    c.set_tensor(t, bytes(range(40)), offset=8)
    c.call(P.MemsetTensorReq(t, 60, 10, 0x33))
    c.call(P.SetTensor2dReq(t, 80, 4, 3, 12, b"xxxxyyyyzzzz"))
    q = rpc_tensor(3, GGMLType.Q6_K, (768, 5))
    return [zero.remote_size, c.call(P.BufferGetBaseReq(zero.remote_ptr)),  # type: ignore[union-attr]
            c.call(P.DeviceCountReq()), c.call(P.GetAlignmentReq(0)), c.call(P.GetMaxSizeReq(0)),
            c.get_tensor(t, 128), bytes(c.call(P.GetTensor2dReq(t, 4, 6, 5, 20)).data),  # type: ignore
            c.call(P.CopyTensorReq(t, u)), c.get_tensor(u, 128), c.call(P.GetAllocSizeReq(0, q)),
            c.call(P.SetTensorHashReq(t, 0, 12345)), c.call(P.AllocBufferReq(0, 1 << 62))]


def test_data_commands_answer_like_the_reference(servers):
    out = both(servers, _data_script)
    assert out["ours"] == out["peer"]


def _graph_script(c: RpcClient) -> list[bytes]:
    req, e = add_graph(c, uid=1234, scale=3.0)
    first = c.get_tensor(e, 32)
    untouched = c.get_tensor(req.tensors[3], 32)   # the MUL without the COMPUTE flag
    c.set_tensor(req.tensors[0], np.linspace(-1, 1, 8, dtype=np.float32).tobytes())
    c.call(P.GraphRecomputeReq(0, 1234))
    h, base = c.alloc_buffer(256)   # ggml_cast: a CPY F32 -> F16 whose src[1] is the node itself
    x = rpc_tensor(1, F32, (4,), buffer=h, data=base)
    y = rpc_tensor(2, GGMLType.F16, (4,), buffer=h, data=base + 64, op=GGMLOp.CPY, src=(1, 2), flags=COMPUTE)
    c.set_tensor(x, np.array([1.5, -2.25, 65504, 1e-8], np.float32).tobytes())
    c.call(P.GraphComputeReq(0, 0, (2,), (x, y)))
    c.call(P.GraphComputeReq(0, 0, (), ()))
    return [first, untouched, c.get_tensor(e, 32), c.get_tensor(y, 8)]


def test_graphs_compute_like_the_reference(servers):
    out = both(servers, _graph_script)
    assert out["ours"] == out["peer"]


def _raw(cmd: int, payload: bytes) -> bytes:
    return struct.pack("<BQ", cmd, len(payload)) + payload


def _bad(kind: str) -> Callable[[RpcClient], None]:
    def script(c: RpcClient) -> None:
        if kind in ("no_hello", "short_hello"):
            return
        h, base = c.alloc_buffer(1024)
        t = rpc_tensor(1, F32, (4,), buffer=h, data=base)
        a = rpc_tensor(1, F32, (4,), buffer=h, data=base, name="a")
        node = rpc_tensor(2, F32, (4,), buffer=h, data=base + 64, op=GGMLOp.ADD, src=(1, 3), flags=COMPUTE)
        send = {
            "device_count_payload": lambda: c.send_raw(_raw(15, bytes(4))),
            "cmd_23": lambda: c.send_raw(_raw(23, b"")),
            "cmd_24": lambda: c.send_raw(_raw(24, b"")),
            "hello_again": lambda: c.send(P.HelloReq()),
            "v7_recompute": lambda: c.send_raw(_raw(16, bytes(4))),
            "unknown_handle": lambda: c.send(P.BufferGetBaseReq(h ^ 1)),
            "device_5": lambda: c.send(P.GetAlignmentReq(5)),
            "past_buffer": lambda: c.send(P.SetTensorReq(rpc_tensor(1, F32, (8,), buffer=h, data=base + 1008), 0,
                                                         bytes(4))),
            "before_buffer": lambda: c.send(P.GetTensorReq(rpc_tensor(1, F32, (4,), buffer=h, data=base - 16),
                                                           0, 4)),
            "null_buffer_tensor": lambda: c.send(P.SetTensorReq(rpc_tensor(1, F32, (4,), data=base), 0, bytes(4))),
            "bad_type": lambda: c.send(P.InitTensorReq(rpc_tensor(1, 5, (4,), nb=(4, 16, 16, 16)))),
            "missing_src": lambda: c.send(P.GraphComputeReq(0, 0, (2,), (node, a))),
            "null_buffer_with_data": lambda: c.send(P.GraphComputeReq(0, 0, (2,), (
                node._replace(src=(1, 1) + (0,) * 8), a._replace(buffer=0)))),
            "unknown_uid": lambda: c.send(P.GraphRecomputeReq(0, 777)),
            "span2d_zero": lambda: c.send(P.GetTensor2dReq(t, 0, 0, 1, 4)),
        }
        send[kind]()
    return script


BAD = ["no_hello", "short_hello", "device_count_payload", "cmd_23", "cmd_24", "hello_again", "v7_recompute",
       "unknown_handle", "device_5", "past_buffer", "before_buffer", "null_buffer_tensor", "bad_type",
       "missing_src", "null_buffer_with_data", "unknown_uid", "span2d_zero"]


@pytest.mark.parametrize("kind", BAD)
def test_both_close_on_the_same_bad_input(servers, kind):
    for name, port in servers.items():
        with RpcClient(HOST, port, hello=kind not in ("no_hello", "short_hello")) as c:
            if kind == "no_hello":
                c.send(P.DeviceCountReq())
            elif kind == "short_hello":
                c.send_raw(_raw(14, bytes(20)))
            else:
                _bad(kind)(c)
            assert c.is_closed(timeout=10), f"{name} kept the connection open after {kind}"
    # and both still serve a good client afterwards
    out = both(servers, lambda c: c.call(P.DeviceCountReq()))
    assert out["ours"] == out["peer"] == P.DeviceCountRsp(1)
