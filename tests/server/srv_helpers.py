"""Helpers for the HTTP server tests: `hybridllm serve` in a subprocess, plain HTTP calls, an SSE parser
written from the SSE spec (independent of hybridllm.server.sse), and Prometheus text parsing."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from prometheus_client.parser import text_string_to_metric_families

from hybridllm.testing.procs import free_port

HOST = "127.0.0.1"


@dataclass
class Serve:
    """One `hybridllm serve` subprocess."""
    proc: subprocess.Popen
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        return int(self.proc.returncode)


def spawn_serve(model: str | Path, args: Sequence[str], log_dir: Path, port: int | None = None) -> Serve:
    port = port or free_port()
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"serve-{port}.log"
    cmd = [sys.executable, "-m", "hybridllm.cli", "serve", str(model), "--host", HOST, "--port", str(port),
           *args]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return Serve(proc, port, log_path)


def start_serve(model: str | Path, args: Sequence[str], log_dir: Path, timeout: float = 90.0) -> Serve:
    """Start the server and wait until /health says ok (the model is loaded)."""
    srv = spawn_serve(model, args, log_dir)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if srv.proc.poll() is not None:
            raise RuntimeError(f"serve exited with {srv.proc.returncode}:\n{srv.log()[-3000:]}")
        try:
            status, _ = http_json("GET", srv.url + "/health", timeout=2)
            if status == 200:
                return srv
        except OSError:
            pass
        time.sleep(0.1)
    srv.stop()
    raise RuntimeError(f"serve did not become healthy in {timeout}s:\n{srv.log()[-3000:]}")


def http(method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None,
         timeout: float = 60.0) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def http_json(method: str, url: str, obj: Any = None, headers: dict[str, str] | None = None,
              timeout: float = 60.0) -> tuple[int, Any]:
    body = None if obj is None else json.dumps(obj).encode()
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    status, _, data = http(method, url, body, hdrs, timeout)
    return status, json.loads(data) if data else None


def post(srv: Serve, path: str, obj: Any, expect: int = 200, **kw: Any) -> Any:
    status, data = http_json("POST", srv.url + path, obj, **kw)
    assert status == expect, f"POST {path} -> {status}: {data}"
    return data


def get(srv: Serve, path: str, expect: int = 200) -> Any:
    status, data = http_json("GET", srv.url + path)
    assert status == expect, f"GET {path} -> {status}: {data}"
    return data


def parse_sse(raw: bytes | str) -> list[str]:
    """The `data` of every event in an event-stream (WHATWG SSE: lines, blank line ends an event,
    multi-line data joined with newlines, comment lines ignored)."""
    text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    events, data = [], []
    for line in text.replace("\r\n", "\n").split("\n"):
        if line == "":
            if data:
                events.append("\n".join(data))
            data = []
        elif line.startswith(":"):
            continue
        elif line.startswith("data:"):
            value = line[5:]
            data.append(value[1:] if value.startswith(" ") else value)
    assert not data, f"stream ended inside an event: {data}"
    return events


def sse_post(srv: Serve, path: str, obj: Any, timeout: float = 60.0) -> tuple[int, str, list[str]]:
    """POST and read the whole event stream: (status, content type, event data list)."""
    status, headers, data = http("POST", srv.url + path, json.dumps(obj).encode(),
                                 {"Content-Type": "application/json"}, timeout)
    return status, headers.get("Content-Type", ""), parse_sse(data) if status == 200 else [data.decode()]


async def stream_events(session: Any, url: str, body: dict[str, Any],
                        on_event: Any = None) -> list[dict[str, Any]]:
    """A native /completion stream's events (an aiohttp session); on_event(event) as each arrives."""
    events = []
    async with session.post(url + "/completion", json={**body, "stream": True}) as resp:
        assert resp.status == 200, await resp.text()
        buf = b""
        async for data in resp.content.iter_any():
            buf += data
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                assert event.startswith(b"data: ")
                events.append(json.loads(event[6:]))
                if on_event is not None:
                    on_event(events[-1])
    return events


def metrics(srv: Serve) -> dict[str, float]:
    """Sample name -> value from /metrics (parsed with prometheus_client's own text parser)."""
    status, headers, data = http("GET", srv.url + "/metrics")
    assert status == 200 and headers.get("Content-Type", "").startswith("text/plain")
    out = {}
    for fam in text_string_to_metric_families(data.decode()):
        for s in fam.samples:
            out[s.name] = s.value
    return out


def wait_until(pred: Any, timeout: float = 10.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return bool(pred())


def error_of(data: Any) -> dict[str, Any]:
    """The OpenAI-style error object of a response body (asserting its shape)."""
    assert isinstance(data, dict) and isinstance(data.get("error"), dict), data
    err = data["error"]
    assert isinstance(err.get("message"), str) and err["message"]
    assert isinstance(err.get("type"), str) and isinstance(err.get("code"), int)
    return err


def texts(chunks: Iterable[dict[str, Any]]) -> str:
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
