"""Shared helpers for the RPC tests (a module with a unique name: tests/*/conftest.py files collide)."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np

from hybridllm.ggml.types import GGMLOp, GGMLType, TensorFlag
from hybridllm.rpc import protocol as P
from hybridllm.rpc.client import RpcClient, rpc_tensor

GOLDEN = Path(__file__).resolve().parents[2] / "protocol" / "golden"
HOST = "127.0.0.1"
F32 = GGMLType.F32
COMPUTE = int(TensorFlag.COMPUTE)


def golden_index() -> list[dict]:
    return json.loads((GOLDEN / "index.json").read_text())["frames"]


def golden_frame(name: str) -> bytes:
    data = (GOLDEN / name).read_bytes()
    return gzip.decompress(data) if name.endswith(".gz") else data


def add_graph(c: RpcClient, uid: int = 0, *, scale: float = 2.0) -> tuple[P.GraphComputeReq, P.RpcTensor]:
    """Upload a, b and send a graph e = SCALE(ADD(a, b), scale) (+ a MUL that is not COMPUTE-flagged)."""
    h, base = c.alloc_buffer(1024)
    a = rpc_tensor(11, F32, (8,), buffer=h, data=base, name="a")
    b = rpc_tensor(12, F32, (8,), buffer=h, data=base + 64, name="b")
    s = rpc_tensor(13, F32, (8,), buffer=h, data=base + 128, op=GGMLOp.ADD, src=(11, 12), flags=COMPUTE, name="s")
    d = rpc_tensor(14, F32, (8,), buffer=h, data=base + 192, op=GGMLOp.MUL, src=(11, 12), flags=0, name="d")
    e = rpc_tensor(15, F32, (8,), buffer=h, data=base + 256, op=GGMLOp.SCALE, src=(13,), flags=COMPUTE,
                   op_params=np.array([scale, 1.0], np.float32).tobytes(), name="e")
    c.set_tensor(a, np.arange(8, dtype=np.float32).tobytes())
    c.set_tensor(b, np.full(8, 10, np.float32).tobytes())
    c.call(P.MemsetTensorReq(d, 0, 32, 0x7F))
    req = P.GraphComputeReq(0, uid, (13, 14, 15), (a, b, s, d, e))
    c.call(req)
    return req, e


def check_good_client(port: int) -> None:
    """A fresh, well-behaved client computes correctly on the same server."""
    with RpcClient(HOST, port, timeout=30) as c:
        _, e = add_graph(c, uid=99)
        got = np.frombuffer(c.get_tensor(e, 32), np.float32)
        np.testing.assert_array_equal(got, 2 * (np.arange(8) + 10) + 1)
