"""Differential replay of real llama.cpp graphs: llama.cpp's rpc-server vs our worker, node by node.

1. `record()` runs the real llama.cpp master (peer, subprocess) against llama.cpp's rpc-server through a
   proxy that stores every frame of the connection (weights, inputs, graphs, replies) in one file.
2. `Mirror` replays the recorded requests into any server (via the sync `RpcClient`), translating the
   recording's buffer handles and absolute addresses into that server's own.
3. `diff_step()` stops both servers just before one recorded graph and compares every node:
   * propagated: GRAPH_COMPUTE(uid 0) of node prefixes `nodes[:k+1]` and GET_TENSOR of the nodes whose
     bytes are still intact at k (the master's allocator reuses memory, so a node is read before the
     first later node that overwrites it); inputs are re-sent before each prefix;
   * local (`local=True`): each node alone on the candidate after writing the reference's values of its
     sources, so an op's own error is separated from the error it inherits;
   * oracle (`oracle=("MUL_MAT",)`): the candidate runs node by node but takes those ops' results from
     the reference; an exact last node proves every other op exact on this graph.

    python -m hybridllm.testing.diffgraph MODEL --steps 0,1 [--flash-attn on] [--local] [--oracle MUL_MAT]
        [--recording FILE] [--env K=V] [--dump]
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import socket
import struct
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, BinaryIO, Iterator, Sequence

import numpy as np

from ..ggml.types import VIEW_OPS, GGMLOp, TensorFlag, nbytes, type_name
from ..rpc import protocol as P
from ..rpc.client import RpcClient
from ..rpc.transport import recv_exact

_REC = struct.Struct("<IBBQ")      # conn, direction (0 request, 1 reply), cmd, payload size
_REQ, _RSP = 0, 1
_EMPTY = frozenset(int(op) for op in VIEW_OPS) | {int(GGMLOp.NONE)}
_COMPUTE = int(TensorFlag.COMPUTE)


# --- recording ------------------------------------------------------------------------------------------------

class RecordingProxy:
    """Forwards byte-exactly to `upstream` and appends every request and reply frame to `path`."""

    def __init__(self, upstream: tuple[str, int], path: Path) -> None:
        self.upstream, self.out = upstream, open(path, "wb")
        self.lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.conns = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _write(self, conn: int, direction: int, cmd: int, payload: bytes) -> None:
        with self.lock:
            self.out.write(_REC.pack(conn, direction, cmd, len(payload)))
            self.out.write(payload)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            self.conns += 1
            for args in ((self.conns, client, server, 9), (self.conns, server, client, 8)):
                threading.Thread(target=self._pump, args=args, daemon=True).start()

    def _pump(self, conn: int, src: socket.socket, dst: socket.socket, head_size: int) -> None:
        """Requests (`u8 cmd | u64 size`) or replies (`u64 size`): whole frames, recorded, then forwarded."""
        while True:
            head = recv_exact(src, head_size)
            if head is None:
                break
            cmd, size = struct.unpack("<BQ", head) if head_size == 9 else (0xFF, struct.unpack("<Q", head)[0])
            payload = recv_exact(src, size)
            if payload is None:
                break
            self._write(conn, _REQ if head_size == 9 else _RSP, cmd, payload)
            dst.sendall(head + payload)
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        self.listener.close()
        with self.lock:
            self.out.close()


def record(model: str | Path, path: str | Path, *, threads: int = 2, timeout: float = 600.0,
           **master_kwargs: Any) -> Any:
    """Run master -> proxy -> llama.cpp rpc-server once, storing the traffic in `path`; returns the
    MasterResult (its logits are the reference run's)."""
    from .peer_master import run_master
    from .procs import start_peer_server

    with start_peer_server(threads=threads) as srv:
        proxy = RecordingProxy((srv.host, srv.port), Path(path))
        try:
            with tempfile.TemporaryDirectory() as tmp:
                res = run_master(model, tmp, rpc=[f"127.0.0.1:{proxy.port}"], timeout=timeout, **master_kwargs)
            time.sleep(0.3)   # the pumps record the last frames
        finally:
            proxy.close()
    return res


@dataclass
class Frame:
    conn: int
    direction: int
    cmd: int
    offset: int
    size: int


class Recording:
    """A recorded file: frames indexed by their header, payloads read on demand."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.frames: list[Frame] = []
        with open(self.path, "rb") as f:
            pos, end = 0, os.fstat(f.fileno()).st_size
            while pos + _REC.size <= end:
                f.seek(pos)
                conn, direction, cmd, size = _REC.unpack(f.read(_REC.size))
                self.frames.append(Frame(conn, direction, cmd, pos + _REC.size, size))
                pos += _REC.size + size

    def payload(self, fr: Frame, f: BinaryIO) -> bytes:
        f.seek(fr.offset)
        return f.read(fr.size)

    @property
    def main_conn(self) -> int:
        """The connection that sent graphs (the master's data connection)."""
        conns = {fr.conn for fr in self.frames if fr.direction == _REQ and fr.cmd == P.Cmd.GRAPH_COMPUTE}
        if len(conns) != 1:
            raise ValueError(f"expected graphs on one connection, found {sorted(conns)}")
        return conns.pop()

    def exchanges(self, conn: int) -> Iterator[tuple[P.Message, P.Message | None]]:
        """(request, recorded reply or None) in order, for one connection."""
        frames = [fr for fr in self.frames if fr.conn == conn]
        replies = iter([fr for fr in frames if fr.direction == _RSP])
        with open(self.path, "rb") as f:
            for fr in frames:
                if fr.direction != _REQ:
                    continue
                msg = P.COMMANDS[fr.cmd].request.decode(self.payload(fr, f))
                rsp = None
                if P.response_size(msg) is not None:
                    rfr = next(replies)
                    rsp = P.decode_response(msg, self.payload(rfr, f))
                yield msg, rsp


# --- replay -----------------------------------------------------------------------------------------------------

_SKIP = (P.HelloReq, P.DeviceCountReq, P.GetDeviceMemoryReq, P.GetAlignmentReq, P.GetMaxSizeReq,
         P.GetAllocSizeReq, P.InitTensorReq, P.CommInitReq, P.CommFreeReq)
INPUT_REQS = (P.SetTensorReq, P.SetTensor2dReq, P.MemsetTensorReq, P.CopyTensorReq)


class Mirror:
    """Replays recorded requests into one server, with handles and addresses translated to its own."""

    def __init__(self, client: RpcClient, label: str) -> None:
        self.c, self.label = client, label
        self.handle: dict[int, int] = {}        # recorded handle -> this server's handle
        self.shift: dict[int, int] = {}         # recorded handle -> new base - recorded base
        self.new_base: dict[int, int] = {}

    def tensor(self, t: P.RpcTensor) -> P.RpcTensor:
        if not t.buffer:
            return t
        return t._replace(buffer=self.handle[t.buffer], data=t.data + self.shift[t.buffer])

    def translate(self, msg: P.Message) -> P.Message:
        if isinstance(msg, (P.FreeBufferReq, P.BufferClearReq, P.BufferGetBaseReq)):
            return dataclasses.replace(msg, remote_ptr=self.handle[msg.remote_ptr])
        if isinstance(msg, P.GraphComputeReq):
            return dataclasses.replace(msg, tensors=tuple(self.tensor(t) for t in msg.tensors))
        if isinstance(msg, P.CopyTensorReq):
            return dataclasses.replace(msg, src=self.tensor(msg.src), dst=self.tensor(msg.dst))
        if hasattr(msg, "tensor"):
            return dataclasses.replace(msg, tensor=self.tensor(msg.tensor))  # type: ignore[attr-defined]
        return msg

    def apply(self, msg: P.Message, recorded: P.Message | None) -> P.Message | None:
        """Send one recorded request; returns this server's reply (None for skipped or reply-less ones)."""
        if isinstance(msg, _SKIP):
            return None
        if isinstance(msg, P.SetTensorHashReq):
            # the recording server had no cache: it answered 0 and the data followed as SET_TENSOR
            assert isinstance(recorded, P.SetTensorHashRsp) and recorded.result == 0
            return None
        if isinstance(msg, P.AllocBufferReq):
            rsp = self.c.call(msg)
            assert isinstance(rsp, P.AllocBufferRsp) and isinstance(recorded, P.AllocBufferRsp)
            if recorded.remote_ptr:
                if not rsp.remote_ptr:
                    raise RuntimeError(f"{self.label}: ALLOC_BUFFER of {msg.size} bytes failed")
                base = self.c.call(P.BufferGetBaseReq(rsp.remote_ptr))
                self.handle[recorded.remote_ptr] = rsp.remote_ptr
                self.new_base[recorded.remote_ptr] = base.base_ptr  # type: ignore[union-attr]
            return rsp
        if isinstance(msg, P.BufferGetBaseReq):
            assert isinstance(recorded, P.BufferGetBaseRsp)
            self.shift[msg.remote_ptr] = self.new_base[msg.remote_ptr] - recorded.base_ptr
            return None
        return self.c.call(self.translate(msg))

    # --- direct access by recorded tensors ---------------------------------------------------------------
    def get(self, t: P.RpcTensor) -> bytes:
        n = nbytes(t.type, t.ne, t.nb)
        return self.c.get_tensor(self.tensor(t), n) if n else b""

    def set(self, t: P.RpcTensor, data: bytes) -> None:
        if data:
            self.c.set_tensor(self.tensor(t), data)

    def compute(self, graph: P.GraphComputeReq, nodes: Sequence[int]) -> None:
        """GRAPH_COMPUTE of `nodes` (uid 0: never cached), then a tiny round trip as a barrier."""
        self.c.call(self.translate(P.GraphComputeReq(graph.device, 0, tuple(nodes), graph.tensors)))
        self.c.call(P.GetAlignmentReq(graph.device))


# --- graph analysis -----------------------------------------------------------------------------------------------

@dataclass
class NodeInfo:
    index: int
    t: P.RpcTensor
    start: int
    end: int
    computes: bool            # executed by a server (COMPUTE flag, not a view/no-op)
    readable_until: int       # last prefix end at which its bytes are still intact

    @property
    def has_value(self) -> bool:
        """Computed, or a view into memory (reads what its base holds at that point)."""
        return self.computes or (self.t.op in _EMPTY and bool(self.t.buffer) and self.end > self.start)

    @property
    def op(self) -> str:
        return GGMLOp(self.t.op).name

    def describe(self, by_id: dict[int, P.RpcTensor]) -> str:
        srcs = [by_id[s] for s in self.t.src if s]
        src_txt = ", ".join(f"{type_name(s.type)}{list(s.ne)}" for s in srcs)
        return (f"#{self.index} {self.op} {self.t.name_str!r} {type_name(self.t.type)}{list(self.t.ne)}"
                f" <- {src_txt}")


def analyse(graph: P.GraphComputeReq) -> tuple[list[NodeInfo], dict[int, P.RpcTensor]]:
    """Per node: its byte range and the last prefix at which it can be read intact."""
    by_id: dict[int, P.RpcTensor] = {}
    for t in graph.tensors:
        by_id.setdefault(t.id, t)
    nodes = []
    for i, nid in enumerate(graph.nodes):
        t = by_id[nid]
        n = nbytes(t.type, t.ne, t.nb)
        computes = bool(t.flags & _COMPUTE) and t.op not in _EMPTY
        nodes.append(NodeInfo(i, t, t.data, t.data + n, computes, len(graph.nodes) - 1))
    starts = np.array([n.start for n in nodes], dtype=np.uint64)
    ends = np.array([n.end for n in nodes], dtype=np.uint64)
    writes = np.array([n.computes for n in nodes])
    for n in nodes:
        later = np.arange(len(nodes)) > n.index
        hit = np.flatnonzero(later & writes & (starts < n.end) & (ends > n.start))
        if hit.size:
            n.readable_until = int(hit[0]) - 1
    for a, b in zip(nodes, nodes[1:]):
        # ggml's CPU backend fuses RMS_NORM + MUL and then never writes the norm: read it alone
        if a.t.op == GGMLOp.RMS_NORM and b.t.op == GGMLOp.MUL and a.t.id in b.t.src[:2]:
            a.readable_until = a.index
    return nodes, by_id


def cut_plan(nodes: list[NodeInfo]) -> dict[int, list[NodeInfo]]:
    """Fewest prefix ends such that every computed node is read at one where it is intact
    (interval stabbing: sort by right end, greedy)."""
    plan: dict[int, list[NodeInfo]] = {}
    cut = -1
    for n in sorted((n for n in nodes if n.has_value), key=lambda n: n.readable_until):
        if cut < n.index:
            cut = n.readable_until
        plan.setdefault(cut, []).append(n)
    return plan


def values(raw: bytes, t: P.RpcTensor) -> np.ndarray:
    """The logical elements of a tensor's bytes (float64, or int64 for integer types)."""
    from .ggml_ref import tensor_values
    mem = np.frombuffer(raw, dtype=np.uint8)
    return tensor_values(mem, SimpleNamespace(ne=t.ne, nb=t.nb, type=t.type, offset=0))  # type: ignore[arg-type]


def rel_err(ref: np.ndarray, cand: np.ndarray) -> float:
    """max|cand - ref| / max|ref| over finite values; inf if the non-finite patterns differ."""
    if ref.dtype.kind == "i":
        return float(np.mean(ref != cand))
    fr, fc = np.isfinite(ref), np.isfinite(cand)
    if not np.array_equal(fr, fc) or not np.array_equal(ref[~fr], cand[~fc]):
        return float("inf")
    if not fr.any():
        return 0.0
    scale = max(float(np.abs(ref[fr]).max()), 1e-30)
    return float(np.abs(cand[fr] - ref[fr]).max()) / scale


# --- the differential run ---------------------------------------------------------------------------------------

@dataclass
class NodeDiff:
    info: NodeInfo
    err: float                          # propagated (both servers ran the same prefix)
    local: float | None = None          # candidate alone on the reference's source values
    src_err: float = 0.0                # worst propagated error among its sources


@dataclass
class StepDiff:
    step: int
    graph: P.GraphComputeReq
    nodes: list[NodeDiff]
    by_id: dict[int, P.RpcTensor]
    output_check: float = 0.0           # reference prefix run vs the recorded run's output (should be 0)
    logits: tuple[np.ndarray, np.ndarray] | None = None
    oracle: tuple[tuple[str, ...], float] | None = None   # (ops taken from the reference, last node's error)

    def first_jump(self, tol: float = 1e-4, factor: float = 10.0) -> NodeDiff | None:
        """First node above `tol` whose error is `factor` times its sources' (where error is born)."""
        for d in self.nodes:
            if d.info.computes and d.err > tol and d.err > factor * d.src_err:
                return d
        return None

    def table(self) -> str:
        """One line per node: propagated error, its sources' worst, local error."""
        rows = []
        for d in self.nodes:
            loc = f"{d.local:9.2e}" if d.local is not None else " " * 9
            rows.append(f"{d.err:9.2e} {d.src_err:9.2e} {loc}  {d.info.describe(self.by_id)}")
        return "      err   src_err     local  node\n" + "\n".join(rows)

    def report(self, tol: float = 1e-4, top: int = 12) -> str:
        lines = [f"step {self.step}: {len(self.graph.nodes)} nodes, reference self-check {self.output_check:.1e}"]
        if self.logits is not None:
            lines.append(f"  recorded output rel err {rel_err(*self.logits):.3e}")
        if self.oracle is not None:
            lines.append(f"  with {'/'.join(self.oracle[0])} taken from the reference: last node rel err "
                         f"{self.oracle[1]:.3e}")
        jump = self.first_jump(tol)
        lines.append("  first jump: " + (f"{jump.info.describe(self.by_id)} err {jump.err:.2e} "
                                         f"(sources {jump.src_err:.2e})" if jump else "none"))
        worst = sorted((d for d in self.nodes if d.info.computes and d.err > d.src_err * 2 and d.err > tol),
                       key=lambda d: -d.err / max(d.src_err, 1e-12))[:top]
        for d in worst:
            loc = f" local {d.local:.2e}" if d.local is not None else ""
            lines.append(f"  {d.info.describe(self.by_id)}: err {d.err:.2e} src {d.src_err:.2e}{loc}")
        by_op: dict[str, NodeDiff] = {}
        for d in self.nodes:
            if d.local is not None and d.local > (by_op[d.info.op].local if d.info.op in by_op else -1.0):
                by_op[d.info.op] = d
        if by_op:
            lines.append("  worst local error per op:")
        for op, d in sorted(by_op.items(), key=lambda kv: -(kv[1].local or 0.0)):
            lines.append(f"    {op:16s} {d.local:.2e}  {d.info.describe(self.by_id)}")
        return "\n".join(lines)


class DiffSession:
    """Feeds one recorded connection into a reference and a candidate server, stopping at graphs."""

    def __init__(self, rec: Recording, ref: RpcClient, cand: RpcClient) -> None:
        self.rec = rec
        self.ref, self.cand = Mirror(ref, "reference"), Mirror(cand, "candidate")
        self.graphs: dict[int, P.GraphComputeReq] = {}
        self._it = rec.exchanges(rec.main_conn)
        self._inputs: list[P.Message] = []
        self.step = -1
        self.outputs: list[tuple[int, bytes, bytes]] = []   # (step, ref, cand) of GET_TENSORs after graphs

    def _send_both(self, msg: P.Message, recorded: P.Message | None) -> None:
        a = self.ref.apply(msg, recorded)
        b = self.cand.apply(msg, recorded)
        if isinstance(msg, P.GetTensorReq) and self.step >= 0:
            self.outputs.append((self.step, bytes(a.data), bytes(b.data)))  # type: ignore[union-attr]

    def next_graph(self) -> tuple[P.Message, P.GraphComputeReq] | None:
        """Replay up to (not including) the next graph request; returns it and its full graph."""
        for msg, rsp in self._it:
            if isinstance(msg, (P.GraphComputeReq, P.GraphRecomputeReq)):
                self.step += 1
                if isinstance(msg, P.GraphComputeReq):
                    if msg.uid:
                        self.graphs[msg.uid] = msg
                    return msg, msg
                return msg, self.graphs[msg.uid]
            if isinstance(msg, INPUT_REQS):
                self._inputs.append(msg)
            self._send_both(msg, rsp)
        return None

    def run_graph(self, msg: P.Message) -> None:
        """Re-send this step's inputs (a diff may have clobbered them), then the recorded graph request."""
        self.resend_inputs(self.ref)
        self.resend_inputs(self.cand)
        self._send_both(msg, None)
        self._inputs = []

    def resend_inputs(self, side: Mirror) -> None:
        for msg in self._inputs:
            side.apply(msg, None)

    def finish(self) -> None:
        """Replay the rest (the final GET_TENSORs after the last graph)."""
        for msg, rsp in self._it:
            self._send_both(msg, rsp)

    # --- node-level comparison --------------------------------------------------------------------------------
    def prefix_values(self, side: Mirror, graph: P.GraphComputeReq, plan: dict[int, list[NodeInfo]]
                      ) -> dict[int, bytes]:
        out: dict[int, bytes] = {}
        for cut in sorted(plan):
            self.resend_inputs(side)
            side.compute(graph, graph.nodes[:cut + 1])
            for n in plan[cut]:
                out[n.index] = side.get(n.t)
        return out

    def local_values(self, graph: P.GraphComputeReq, nodes: list[NodeInfo], by_id: dict[int, P.RpcTensor],
                     ref_raw: dict[int, bytes]) -> dict[int, bytes]:
        """Each computed node alone on the candidate, its node sources holding the reference's bytes.
        In-place writes into persistent state (SET_ROWS/CPY into the KV cache views) are compared over the
        whole view, so their local error also counts cache rows written by earlier steps."""
        index = {n.t.id: n.index for n in nodes}
        out: dict[int, bytes] = {}
        for n in nodes:
            if not n.computes:
                continue
            self.resend_inputs(self.cand)
            for sid in n.t.src:
                j = index.get(sid)
                if sid and j is not None and j in ref_raw:
                    self.cand.set(by_id[sid], ref_raw[j])
            self.cand.compute(graph, [graph.nodes[n.index]])
            out[n.index] = self.cand.get(n.t)
        return out

    def oracle_values(self, graph: P.GraphComputeReq, nodes: list[NodeInfo], ref_raw: dict[int, bytes],
                      ops: Sequence[str]) -> dict[int, bytes]:
        """The candidate runs the graph node by node, except that nodes with an op in `ops` take the
        reference's result: if the output then matches, those ops hold the whole difference."""
        self.resend_inputs(self.cand)
        for n in nodes:
            if n.computes and n.op in ops and n.index in ref_raw:
                self.cand.set(n.t, ref_raw[n.index])
            elif n.computes:
                self.cand.compute(graph, [graph.nodes[n.index]])
        last = max(ref_raw)
        return {last: self.cand.get(nodes[last].t)}

    def diff(self, graph: P.GraphComputeReq, *, local: bool = False, oracle: Sequence[str] = ()) -> StepDiff:
        nodes, by_id = analyse(graph)
        plan = cut_plan(nodes)
        ref_raw = self.prefix_values(self.ref, graph, plan)
        orc_raw = self.oracle_values(graph, nodes, ref_raw, oracle) if oracle else {}
        cand_raw = self.prefix_values(self.cand, graph, plan)
        loc_raw = self.local_values(graph, nodes, by_id, ref_raw) if local else {}
        # self-check: a full reference run reproduces the last node read in the prefix passes
        last = max(ref_raw)
        self.resend_inputs(self.ref)
        self.ref.compute(graph, graph.nodes)
        check = rel_err(values(ref_raw[last], nodes[last].t), values(self.ref.get(nodes[last].t), nodes[last].t))
        errs: dict[int, float] = {}
        diffs = []
        index = {n.t.id: n.index for n in nodes}
        for n in nodes:
            if n.index not in ref_raw:
                continue
            r = values(ref_raw[n.index], n.t)
            err = rel_err(r, values(cand_raw[n.index], n.t))
            errs[n.index] = err
            src = [errs.get(index.get(s, -1), 0.0) for s in n.t.src if s]
            loc = rel_err(r, values(loc_raw[n.index], n.t)) if n.index in loc_raw else None
            diffs.append(NodeDiff(n, err, loc, max(src, default=0.0)))
        out = StepDiff(self.step, graph, diffs, by_id, check)
        if orc_raw:
            out.oracle = (tuple(oracle), rel_err(values(ref_raw[last], nodes[last].t),
                                                 values(orc_raw[last], nodes[last].t)))
        return out


def diff_steps(rec: Recording, ref: RpcClient, cand: RpcClient, steps: Sequence[int], *,
               local: bool = False, oracle: Sequence[str] = ()) -> tuple[list[StepDiff], list[tuple[int, float]]]:
    """Replay the whole recording, diffing the graphs of `steps` (0 = the first graph); also returns
    (step, rel err) of every float32 GET_TENSOR read after a graph (the logits, on identical inputs)."""
    sess = DiffSession(rec, ref, cand)
    out: list[StepDiff] = []
    while (nxt := sess.next_graph()) is not None:
        msg, graph = nxt
        if sess.step in steps:
            out.append(sess.diff(graph, local=local, oracle=oracle))
        sess.run_graph(msg)
    sess.finish()
    outputs = [(step, _f32(a), _f32(b)) for step, a, b in sess.outputs]
    for d in out:
        got = [(a, b) for step, a, b in outputs if step == d.step]
        d.logits = got[0] if got else None
    return out, [(step, rel_err(a, b)) for step, a, b in outputs]


def _f32(raw: bytes) -> np.ndarray:
    return np.frombuffer(raw[:len(raw) // 4 * 4], np.float32).astype(np.float64)


# --- command line --------------------------------------------------------------------------------------------------

def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--recording", help="frames file: reused if it exists, else recorded there")
    ap.add_argument("--steps", default="0", help="comma-separated graph indices to diff (0 = first graph)")
    ap.add_argument("--local", action="store_true", help="also run each node alone on reference inputs")
    ap.add_argument("--flash-attn", default="off", choices=("on", "off", "auto"))
    ap.add_argument("--prompt", default="Once upon a time, in a small village by the sea,")
    ap.add_argument("--prompt-ids", help="comma-separated prompt token ids (instead of --prompt)")
    ap.add_argument("--n-predict", type=int, default=2)
    ap.add_argument("--n-gpu-layers", type=int, default=99)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--env", action="append", default=[], metavar="K=V", help="environment of our worker")
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--dump", action="store_true", help="print every node's errors")
    ap.add_argument("--oracle", default="", help="comma-separated ops (e.g. MUL_MAT) whose results the "
                    "candidate takes from the reference in an extra node-by-node run")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    from .procs import start_peer_server, start_worker

    args = _parse_args(argv)
    tmp = tempfile.TemporaryDirectory()
    path = Path(args.recording) if args.recording else Path(tmp.name) / "frames.bin"
    if not path.exists():
        ids = [int(x) for x in args.prompt_ids.split(",")] if args.prompt_ids else None
        res = record(args.model, path, threads=args.threads, flash_attn=args.flash_attn, n_predict=args.n_predict,
                     n_gpu_layers=args.n_gpu_layers, prompt_ids=ids, prompt=None if ids else args.prompt)
        print(f"recorded {path.stat().st_size >> 20} MiB; reference tokens {res.tokens}", flush=True)
    rec = Recording(path)
    env = dict(kv.split("=", 1) for kv in args.env)
    steps = [int(s) for s in args.steps.split(",") if s.strip()]
    with start_peer_server(threads=args.threads) as ref_srv, start_worker(threads=args.threads, env=env) as cand_srv, \
            RpcClient(ref_srv.host, ref_srv.port, timeout=600) as ref, \
            RpcClient(cand_srv.host, cand_srv.port, timeout=600) as cand:
        t0 = time.perf_counter()
        oracle = [op.strip().upper() for op in args.oracle.split(",") if op.strip()]
        diffs, outputs = diff_steps(rec, ref, cand, steps, local=args.local, oracle=oracle)
    for d in diffs:
        print(d.table() if args.dump else "")
        print(d.report(args.tol))
    print("outputs (step, rel err): " + ", ".join(f"{s}:{e:.2e}" for s, e in outputs))
    print(f"done in {time.perf_counter() - t0:.0f}s")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
