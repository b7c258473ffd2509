"""Start and stop RPC servers in subprocesses: our `hybridllm worker` or the peer's llama.cpp rpc-server.

Each server gets a free loopback port, its stdout/stderr go to a log file, `start_*` returns once the port
accepts connections (or raises `ServerFailed` with the log tail), and `stop()` terminates it, killing it
if it does not exit in time. `ServerProc` is a context manager.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

HOST = "127.0.0.1"

# the peer's start_rpc_server blocks in native code forever; SIGTERM's default action ends it
_PEER_SERVER = (
    "import sys\n"
    "from hybridllm.testing.peer import load_peer\n"
    "load_peer()\n"
    "import llama_cpp_py_sync.rpc as rpc\n"
    "rpc.start_rpc_server(sys.argv[1], devices=['CPU'], n_threads=int(sys.argv[2]))\n"
)


class ServerFailed(RuntimeError):
    """A server subprocess did not come up; the message carries its log tail."""


def free_port(host: str = HOST) -> int:
    """A port the kernel considers free right now (bind to port 0, read it back, release it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


@dataclass
class ServerProc:
    """One running server subprocess."""
    kind: str                       # "ours" or "peer"
    host: str
    port: int
    proc: subprocess.Popen
    log_path: Path
    cmd: list[str] = field(default_factory=list)

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, n: int = 30) -> str:
        return _tail(self.log_path, n)

    def stop(self, timeout: float = 5.0) -> int:
        """Terminate (then kill after `timeout` s); returns the exit code."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        return int(self.proc.returncode)

    def __enter__(self) -> "ServerProc":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _spawn(kind: str, cmd_for_port, log_dir: str | Path | None, start_timeout: float,
           env: dict[str, str] | None, attempts: int = 3) -> ServerProc:
    """Start a server, retrying on a fresh port when the first one was taken in the meantime."""
    log_root = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="hybridllm-srv-"))
    log_root.mkdir(parents=True, exist_ok=True)
    last = ""
    for _ in range(attempts):
        port = free_port()
        cmd = cmd_for_port(port)
        log_path = log_root / f"{kind}-{port}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        server = ServerProc(kind, HOST, port, proc, log_path, cmd)
        deadline = time.monotonic() + start_timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            if _accepts(HOST, port):
                return server
            time.sleep(0.1)
        server.stop()
        last = f"{kind} server {' '.join(cmd)} did not accept on {HOST}:{port} " \
               f"(exit {proc.returncode}):\n{server.log_tail()}"
        if "address already in use" not in last.lower():
            break
    raise ServerFailed(last)


def start_worker(*, device: str = "cpu", threads: int | None = 2, extra_args: Sequence[str] = (),
                 log_dir: str | Path | None = None, start_timeout: float = 60.0,
                 env: dict[str, str] | None = None) -> ServerProc:
    """Start `python -m hybridllm.cli worker --device DEVICE --host 127.0.0.1 --port P [--threads N]`."""
    def cmd(port: int) -> list[str]:
        extra = ["--threads", str(threads)] if threads else []
        return [sys.executable, "-m", "hybridllm.cli", "worker", "--device", device,
                "--host", HOST, "--port", str(port), *extra, *extra_args]
    return _spawn("ours", cmd, log_dir, start_timeout, env)


def start_peer_server(*, threads: int = 2, log_dir: str | Path | None = None, start_timeout: float = 60.0,
                      env: dict[str, str] | None = None) -> ServerProc:
    """Start llama.cpp's own rpc-server (the peer wheel's `start_rpc_server`, CPU device)."""
    def cmd(port: int) -> list[str]:
        return [sys.executable, "-c", _PEER_SERVER, f"{HOST}:{port}", str(threads)]
    return _spawn("peer", cmd, log_dir, start_timeout, env)


def start_server(kind: str, **kwargs: object) -> ServerProc:
    """`start_worker` for kind "ours", `start_peer_server` for kind "peer"."""
    if kind == "ours":
        return start_worker(**kwargs)  # type: ignore[arg-type]
    if kind == "peer":
        return start_peer_server(**kwargs)  # type: ignore[arg-type]
    raise ValueError(f"unknown server kind {kind!r} (expected 'ours' or 'peer')")
