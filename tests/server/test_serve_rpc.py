"""`hybridllm serve --rpc`: layers on our worker or on llama.cpp's rpc-server give the greedy output of the
all-local server; a worker killed mid-generation fails the request at once with a clear error and makes
/health degraded; once the worker is back (same port, same --cache) the next request recovers and /health
is ok again; `--rpc-token` is proven to a worker started with `--token`."""
from __future__ import annotations

import http.client
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from srv_helpers import Serve, error_of, get, http_json, post, spawn_serve, start_serve

from hybridllm.testing.procs import HOST, ServerProc, free_port, start_peer_server, start_worker
from hybridllm.testing.synth import model_path

SLOT_CTX = 2048
PROMPTS = ["hello world", "the quick brown fox jumps over"]
N_PREDICT = 24


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return model_path(tmp_path_factory.mktemp("models"), "llama", "q8_0", n_layer=4)


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("logs")


def completion(srv: Serve, prompt: str, n: int = N_PREDICT) -> dict[str, Any]:
    return post(srv, "/completion", {"prompt": prompt, "n_predict": n, "temperature": 0, "ignore_eos": True,
                                     "return_tokens": True, "cache_prompt": False})


def greedy(srv: Serve) -> list[tuple[str, list[int]]]:
    return [(r["content"], r["tokens"]) for r in (completion(srv, p) for p in PROMPTS)]


@pytest.fixture(scope="module")
def reference(model: Path, logs: Path) -> list[tuple[str, list[int]]]:
    """The all-local server's greedy answers."""
    srv = start_serve(model, ["--ctx", str(SLOT_CTX)], logs)
    try:
        out = greedy(srv)
    finally:
        srv.stop()
    assert all(len(toks) == N_PREDICT for _, toks in out)
    return out


@pytest.fixture(scope="module")
def ours(logs: Path) -> Iterator[ServerProc]:
    with start_worker(log_dir=logs, threads=1) as w:
        yield w


@pytest.mark.parametrize("split", [[], ["--tensor-split", "1,1"]], ids=["all-on-worker", "half"])
def test_ours_matches_local(model: Path, logs: Path, ours: ServerProc, reference: list, split: list[str]) -> None:
    srv = start_serve(model, ["--ctx", str(SLOT_CTX), "--rpc", ours.endpoint, *split], logs)
    try:
        assert greedy(srv) == reference
        props = get(srv, "/props")
        assert props["device"] == f"CPU+RPC0[{ours.endpoint}]"
        assert get(srv, "/health") == {"status": "ok"}
    finally:
        srv.stop()
    log = srv.log()
    layers = "layers 0-3" if not split else "layers 0-1"
    assert f"RPC0[{ours.endpoint}]" in log and layers in log, log   # the placement table


def test_llama_cpp_rpc_server_matches_local(model: Path, logs: Path, reference: list, peer: Any) -> None:
    with start_peer_server(threads=2, log_dir=logs) as rpc_server:
        srv = start_serve(model, ["--ctx", str(SLOT_CTX), "--rpc", rpc_server.endpoint], logs)
        try:
            assert greedy(srv) == reference
            assert get(srv, "/props")["device"] == f"CPU+RPC0[{rpc_server.endpoint}]"
        finally:
            srv.stop()
        assert rpc_server.alive


# ------------------------------------------------------------------------------------------------
# a worker that dies and comes back

def spawn_worker(port: int, cache: Path, log: Path, extra: list[str] = ()) -> subprocess.Popen:  # type: ignore[assignment]
    """`hybridllm worker` on a given port (a restart must reuse it); returns once it accepts."""
    import socket
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "hybridllm.cli", "worker", "--host", HOST, "--port",
                                 str(port), "--threads", "1", "--cache", str(cache), *extra],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        try:
            socket.create_connection((HOST, port), timeout=0.5).close()
            return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"worker did not start:\n{log.read_text()}")


def kill(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait(10)


def stream_events(srv: Serve, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """POST a streamed /completion and yield each SSE event's JSON as it arrives."""
    conn = http.client.HTTPConnection(HOST, srv.port, timeout=60)
    try:
        conn.request("POST", "/completion", json.dumps({**body, "stream": True}),
                     {"Content-Type": "application/json"})
        rsp = conn.getresponse()
        assert rsp.status == 200, rsp.read()
        for line in rsp:
            if line.startswith(b"data: "):
                yield json.loads(line[6:])
    finally:
        conn.close()


def test_worker_killed_mid_generation_then_back(model: Path, logs: Path, reference: list,
                                                tmp_path: Path) -> None:
    port, cache, wlog = free_port(), tmp_path / "cache", tmp_path / "worker.log"
    endpoint = f"{HOST}:{port}"
    worker = spawn_worker(port, cache, wlog)
    srv = start_serve(model, ["--ctx", str(2 * SLOT_CTX), "--parallel", "2", "--rpc", endpoint], logs)
    try:
        assert greedy(srv) == reference
        # a long generation; the worker dies after its first token
        events = stream_events(srv, {"prompt": PROMPTS[0], "n_predict": SLOT_CTX - 16, "ignore_eos": True,
                                     "temperature": 0})
        assert next(events)["content"] is not None
        kill(worker)
        t_kill = time.monotonic()
        rest = list(events)
        elapsed = time.monotonic() - t_kill
        last = rest[-1]
        assert not any(e.get("stop") for e in rest), "the generation finished before the worker was killed"
        err = error_of(last)
        assert err["code"] == 503 and err["type"] == "unavailable_error"
        assert f"RPC0[{endpoint}] (holding layers 0-3) failed: RPC worker {endpoint}" in err["message"]
        assert elapsed < 5, elapsed

        health = get(srv, "/health")
        assert health["status"] == "degraded" and f"RPC0[{endpoint}]" in health["message"]
        # still down: each request fails at once with 503, the server stays up and degraded
        t0 = time.monotonic()
        status, data = http_json("POST", srv.url + "/completion", {"prompt": "x", "n_predict": 2})
        assert status == 503 and "still down" in error_of(data)["message"] and endpoint in error_of(data)["message"]
        assert time.monotonic() - t0 < 5
        assert get(srv, "/health")["status"] == "degraded"

        worker = spawn_worker(port, cache, wlog)   # back on the same port with the same cache
        assert get(srv, "/health")["status"] == "degraded"   # recovery waits for the next request
        got: list[Any] = [None, None]
        threads = [threading.Thread(target=lambda i=i: got.__setitem__(i, greedy(srv))) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert got == [reference, reference]   # both slots, concurrently, after recovery
        assert get(srv, "/health") == {"status": "ok"}
        assert "recovered" in srv.log()
    finally:
        srv.stop()
        kill(worker)


def test_health_notices_a_worker_that_died_while_idle(model: Path, logs: Path, tmp_path: Path) -> None:
    port = free_port()
    worker = spawn_worker(port, tmp_path / "cache", tmp_path / "worker.log")
    srv = start_serve(model, ["--ctx", "256", "--rpc", f"{HOST}:{port}"], logs)
    try:
        assert get(srv, "/health") == {"status": "ok"}
        kill(worker)
        health = get(srv, "/health")   # no request ran since: the probe finds out
        assert health["status"] == "degraded" and f"{HOST}:{port}" in health["message"], health
    finally:
        srv.stop()
        kill(worker)


# ------------------------------------------------------------------------------------------------
# --rpc-token, and one-line load errors

@pytest.fixture(scope="module")
def locked(logs: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    d = tmp_path_factory.mktemp("locked")
    worker = spawn_worker(port, d / "cache", d / "worker.log", ["--token", "s3cret"])
    yield f"{HOST}:{port}"
    kill(worker)


def test_rpc_token_accepted(model: Path, logs: Path, locked: str, reference: list) -> None:
    """--rpc-token is the workers' secret; --token stays the HTTP API key."""
    srv = start_serve(model, ["--ctx", str(SLOT_CTX), "--rpc", locked, "--rpc-token", "s3cret", "--token", "api"],
                      logs)
    try:
        assert http_json("POST", srv.url + "/completion", {"prompt": "x"})[0] == 401
        auth = {"Authorization": "Bearer api"}
        got = [post(srv, "/completion", {"prompt": p, "n_predict": N_PREDICT, "temperature": 0, "ignore_eos": True,
                                         "return_tokens": True}, headers=auth) for p in PROMPTS]
        assert [(r["content"], r["tokens"]) for r in got] == reference
    finally:
        srv.stop()


def load_error(model: Path, logs: Path, args: list[str]) -> str:
    """Run serve, which must exit 1 with exactly one ERROR line (no traceback); return that line."""
    srv = spawn_serve(model, ["--ctx", "256", *args], logs)
    try:
        assert srv.proc.wait(60) == 1, srv.log()
    finally:
        srv.stop()
    log = srv.log()
    errors = [ln for ln in log.splitlines() if " ERROR " in ln]
    assert len(errors) == 1 and "Traceback" not in log, log
    return errors[0].split("ERROR hybridllm.server: ", 1)[1]


@pytest.mark.parametrize("args, env, message", [
    (["--rpc-token", "wrong"], None, "the worker refused the token (wrong token?)"),
    ([], None, "the worker closed the connection during HELLO (does it require a token?"),
    ([], "nope", "the worker refused the token"),
], ids=["wrong", "none", "env-wrong"])
def test_rpc_token_refused(model: Path, logs: Path, locked: str, args: list[str], env: str | None,
                           message: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HYBRIDLLM_RPC_TOKEN", raising=False)
    if env is not None:
        monkeypatch.setenv("HYBRIDLLM_RPC_TOKEN", env)
    line = load_error(model, logs, ["--rpc", locked, *args])
    assert line.startswith(f"failed to load the model: RPC worker {locked}: ") and message in line, line


def test_rpc_token_from_env(model: Path, logs: Path, locked: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HYBRIDLLM_RPC_TOKEN", "s3cret")
    srv = start_serve(model, ["--ctx", "256", "--rpc", locked], logs)   # waits for /health ok
    try:
        assert get(srv, "/props")["device"] == f"CPU+RPC0[{locked}]"
    finally:
        srv.stop()


def test_unreachable_worker_is_one_line(model: Path, logs: Path) -> None:
    port = free_port()
    line = load_error(model, logs, ["--rpc", f"{HOST}:{port}"])
    assert line == f"failed to load the model: RPC worker {HOST}:{port}: cannot connect: Connection refused"


def test_tensor_split_mismatch_is_one_line(model: Path, logs: Path, ours: ServerProc) -> None:
    line = load_error(model, logs, ["--rpc", ours.endpoint, "--tensor-split", "1,1,1"])
    assert "--tensor-split has 3 values for 2 devices" in line, line

