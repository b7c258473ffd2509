"""Server life cycle: 503 while the model loads, ready, degraded, a failed load, and the CLI's one-line errors."""
from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from hybridllm.cli import main
from hybridllm.server.app import serve
from hybridllm.server.local_engine import LocalEngine
from hybridllm.server.state import ServerConfig, ServerState
from hybridllm.testing.procs import free_port

from srv_helpers import HOST, error_of, http_json, spawn_serve, wait_until


class _InProcess:
    """`serve()` on its own event loop in a thread, with a given loader."""

    def __init__(self, state: ServerState, load: Callable[[], Any]) -> None:
        self.state, self.port = state, free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.result: int | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main(load)), daemon=True)
        self._thread.start()
        assert self._ready.wait(10)

    async def _main(self, load: Callable[[], Any]) -> None:
        self.loop = asyncio.get_running_loop()
        self.stop_event = asyncio.Event()
        task = asyncio.create_task(serve(self.state, HOST, self.port, load, self.stop_event))
        await asyncio.sleep(0.2)  # listening by now
        self._ready.set()
        self.result = await task

    def stop(self) -> int | None:
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.stop_event.set)
            self._thread.join(30)
        return self.result


@pytest.fixture
def gated(synth_model: Path) -> Iterator[tuple[_InProcess, threading.Event]]:
    gate = threading.Event()

    def load() -> LocalEngine:
        assert gate.wait(60), "test never opened the gate"
        return LocalEngine.load(synth_model, n_ctx=256)
    srv = _InProcess(ServerState(ServerConfig(model_path=str(synth_model))), load)
    yield srv, gate
    gate.set()
    srv.stop()


def test_loading_ready_degraded(gated: tuple[_InProcess, threading.Event]) -> None:
    srv, gate = gated
    status, data = http_json("GET", srv.url + "/health")
    assert status == 503 and error_of(data) == {"code": 503, "message": "Loading model", "type": "unavailable_error"}
    for method, path, body in (("GET", "/v1/models", None), ("GET", "/props", None),
                               ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}),
                               ("POST", "/tokenize", {"content": "x"})):
        status, data = http_json(method, srv.url + path, body)
        assert status == 503 and error_of(data)["type"] == "unavailable_error", path
    gate.set()
    assert wait_until(lambda: http_json("GET", srv.url + "/health")[0] == 200, timeout=60)
    assert http_json("GET", srv.url + "/health")[1] == {"status": "ok"}
    engine = srv.state.engine
    assert isinstance(engine, LocalEngine)
    engine.mark_degraded("rpc worker 127.0.0.1:50052 lost")
    status, data = http_json("GET", srv.url + "/health")
    assert status == 200 and data == {"status": "degraded", "message": "rpc worker 127.0.0.1:50052 lost"}
    status, data = http_json("POST", srv.url + "/completion", {"prompt": "x", "n_predict": 2, "ignore_eos": True})
    assert status == 200 and data["tokens_predicted"] == 2  # degraded still serves
    engine.mark_ok()
    assert http_json("GET", srv.url + "/health")[1] == {"status": "ok"}
    assert srv.stop() == 0


def test_failed_load(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    srv = _InProcess(ServerState(ServerConfig(model_path=str(bad))), lambda: LocalEngine.load(bad))
    srv._thread.join(30)
    assert srv.result == 1
    assert "failed to load the model" in (srv.state.load_error or "")


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hybridllm.cli", "serve", *args], capture_output=True,
                          text=True, timeout=timeout)


def _main_error(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """Run `hybridllm serve ARGS` in this process; it must fail with exit code 2 and one stderr line."""
    try:
        rc = main(["serve", *args])
    except SystemExit as exc:  # argparse
        rc = int(exc.code or 0)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err, err
    assert len(err) == 1 or err[0].startswith("usage:"), err  # one line, or argparse's usage + one line
    return err[-1]


def test_cli_errors(synth_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = str(synth_model)
    cases = [((str(tmp_path / "missing.gguf"),), "model file not found"),
             ((model, "--rpc", "127.0.0.1"), "invalid RPC endpoint"),
             ((model, "--tensor-split", "1,1"), "--tensor-split has 2 values for 1 device"),
             ((model, "--device", "tpu9"), "--device tpu9"),
             ((model, "--parallel", "0"), "--parallel"),
             ((model, "--ctx", "4", "--parallel", "4"), "too small"),
             ((model, "--tensor-split", "a,b"), "comma-separated numbers"),
             ((model, "--port", "70000"), "port out of range")]
    for args, needle in cases:
        line = _main_error(capsys, *args)
        assert needle in line, (args, line)


def test_cli_port_taken(synth_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import socket
    with socket.socket() as s:
        s.bind((HOST, 0))
        s.listen()
        port = s.getsockname()[1]
        assert "cannot listen" in _main_error(capsys, str(synth_model), "--host", HOST, "--port", str(port))


def test_cli_module_one_line_error(tmp_path: Path) -> None:
    """`python -m hybridllm.cli serve` reports a user error in one line, without a traceback."""
    proc = _cli(str(tmp_path / "missing.gguf"))
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"hybridllm serve: error: model file not found: {tmp_path / 'missing.gguf'}"]


def test_cli_bad_model_exits(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all" * 4)
    srv = spawn_serve(bad, [], tmp_path)
    try:
        assert srv.proc.wait(60) == 1
    finally:
        srv.stop()
    errors = [ln for ln in srv.log().splitlines() if "ERROR" in ln]
    assert len(errors) == 1 and "failed to load the model" in errors[0] and "Traceback" not in srv.log()


def test_cli_sigterm_exits_cleanly(synth_model: Path, tmp_path: Path) -> None:
    srv = spawn_serve(synth_model, ["--ctx", "256"], tmp_path)
    try:
        assert wait_until(lambda: _healthy(srv.url), timeout=60), srv.log()
    finally:
        rc = srv.stop()
    assert rc == 0, srv.log()


def _healthy(url: str) -> bool:
    try:
        return http_json("GET", url + "/health", timeout=2)[0] == 200
    except OSError:
        return False


def test_stop_while_loading(synth_model: Path) -> None:
    gate = threading.Event()

    def load() -> LocalEngine:
        gate.wait(60)
        return LocalEngine.load(synth_model, n_ctx=256)
    srv = _InProcess(ServerState(ServerConfig(model_path=str(synth_model))), load)
    try:
        assert http_json("GET", srv.url + "/health")[0] == 503
        t0 = time.monotonic()
        assert srv.stop() == 0
        assert time.monotonic() - t0 < 5  # did not wait for the load
    finally:
        gate.set()


def test_engine_context_shared_and_alias(synth_model: Path) -> None:
    """--ctx 0 is the training context (512 for the synthetic model), shared by the slots: each may use
    all of it (llama-server's unified KV cache)."""
    engine = LocalEngine.load(synth_model, n_ctx=0, n_parallel=2, name="my-model")
    try:
        assert engine.n_slots == 2 and engine.info.n_ctx == 512 and engine.info.n_ctx_train == 512
        assert engine.info.name == "my-model"
    finally:
        asyncio.run(engine.close())
