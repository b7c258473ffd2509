"""Golden traffic of the real peer (protocol/golden) replayed into a Session: our deterministic replies equal
llama.cpp's byte for byte, and the real graphs (gemma: 818 nodes, 1103 tensors) pass every validation with
the peer's own buffer handles and addresses, fast."""
from __future__ import annotations

import statistics
import struct
import time

import pytest
from rpc_helpers import golden_frame, golden_index

from hybridllm.backends.numpy_backend import NumpyBackend, NumpyBuffer
from hybridllm.rpc import protocol as P
from hybridllm.rpc.worker import Session

FRAMES = golden_index()


def _decode_req(name: str) -> P.Message:
    frame = golden_frame(name)
    return P.decode_request(frame[0], frame[9:], in_loop=frame[0] != P.Cmd.HELLO)


def _pairs(cmd: str) -> list[tuple[P.Message, bytes]]:
    """(request, peer's response frame) pairs: per source and connection, replies come in request order."""
    out = []
    for prefix in "gs":
        conns = {f["conn"] for f in FRAMES if f["file"][0] == prefix and f["cmd"] == cmd}
        for conn in conns:
            sel = [f for f in FRAMES if f["file"][0] == prefix and f["cmd"] == cmd and f["conn"] == conn]
            reqs = [f for f in sel if f["dir"] == "req"]
            rsps = [f for f in sel if f["dir"] == "rsp"]
            out += [(_decode_req(q["file"]), golden_frame(r["file"])) for q, r in zip(reqs, rsps)]
    return out


@pytest.mark.parametrize("cmd", ["HELLO", "DEVICE_COUNT", "GET_ALIGNMENT", "GET_MAX_SIZE", "GET_ALLOC_SIZE"])
def test_deterministic_replies_equal_the_peers(cmd):
    pairs = _pairs(cmd)
    assert pairs, cmd
    s = Session([NumpyBackend()])
    for req, peer_frame in pairs:
        ours = b"".join(bytes(p) for p in P.encode_response(s.handle(req)))  # type: ignore[arg-type]
        assert ours == peer_frame, (cmd, req)


def _session_with_peer_buffers(prefix: str) -> Session:
    """A Session holding NumpyBuffers under the peer's own handles and base addresses (lazily allocated)."""
    be = NumpyBackend()
    s = Session([be])
    alloc_rsp = [P.AllocBufferRsp.decode(golden_frame(f["file"])[8:]) for f in FRAMES
                 if f["file"][0] == prefix and f["cmd"] == "ALLOC_BUFFER" and f["dir"] == "rsp"]
    sizes = {r.remote_ptr: r.remote_size for r in alloc_rsp}
    for req, frame in _pairs("BUFFER_GET_BASE"):
        if req.remote_ptr in sizes:  # type: ignore[attr-defined]
            base, = struct.unpack_from("<Q", frame, 8)
            s.buffers[req.remote_ptr] = NumpyBuffer(be, sizes[req.remote_ptr], base)  # type: ignore[attr-defined]
    return s


@pytest.mark.parametrize("prefix", ["g", "s"])
def test_real_graphs_validate_and_parse_fast(prefix):
    s = _session_with_peer_buffers(prefix)
    graphs = [f for f in FRAMES if f["file"][0] == prefix and f["cmd"] == "GRAPH_COMPUTE"]
    assert graphs
    for entry in graphs:
        frame = golden_frame(entry["file"])
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            req = P.decode_request(frame[0], frame[9:])
            nodes = s.build_graph(req)  # type: ignore[arg-type]
            times.append(time.perf_counter() - t0)
        assert len(nodes) == len(req.nodes) and all(n.buffer is not None for n in nodes)  # type: ignore
        ms = statistics.median(times) * 1e3
        t0 = time.perf_counter()
        s.devices[0].prepare(nodes)     # every op of the real graph is supported by the numpy backend
        prep = (time.perf_counter() - t0) * 1e3
        print(f"\n{entry['file']}: {len(req.tensors)} tensors, decode+rebuild {ms:.2f} ms, prepare {prep:.1f} ms")
        assert ms < 100, ms  # a few ms on a quiet machine; generous for loaded CI


def test_golden_set_tensor_lands_in_the_peers_buffer():
    s = _session_with_peer_buffers("g")
    for f in FRAMES:
        if f["file"][0] == "g" and f["cmd"] == "SET_TENSOR" and f["payload_size"] < 10000:
            req = _decode_req(f["file"])
            assert isinstance(req, P.SetTensorReq)
            s.handle(req)
            back = s.handle(P.GetTensorReq(req.tensor, req.offset, len(req.data)))
            assert bytes(back.data) == bytes(req.data)  # type: ignore[union-attr]
