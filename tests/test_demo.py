"""`python3 -m hybridllm demo` (the README's main command) as a user runs it: a worker and a server on the
bundled gemma3-270m with its layers on the worker, one streamed answer and its speed; both processes are
gone afterwards, also when the server fails to load or the demo is stopped by SIGTERM."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hybridllm.demo import PROMPT
from hybridllm.rpc.transport import RpcConnection, RpcError
from hybridllm.testing.synth import write_model

DEMO = [sys.executable, "-m", "hybridllm", "demo"]
SPEED = re.compile(r"^\[generation: (\d+) tokens, ([\d.]+) tokens/s; prompt: (\d+) tokens, ([\d.]+) tokens/s\]$")
ENDPOINTS = re.compile(r"worker on 127\.0\.0\.1:(\d+), server on http://127\.0\.0\.1:(\d+)")


def demo(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(DEMO + list(args), check=False, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "HYBRIDLLM_API_KEY": "stray"})   # must not lock the demo out


def accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def logs_of(stderr: str) -> Path:
    m = re.search(r"logs: (\S+)", stderr)
    assert m, stderr
    return Path(m.group(1).rstrip(")"))


@pytest.fixture(autouse=True)
def _no_leftover_logs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The demo's log folders go under this test's tmp_path, not /tmp."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))


def test_demo_answers_with_its_speed(gemma_path: Path) -> None:
    t0 = time.monotonic()
    proc = demo()
    elapsed = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.rstrip("\n").splitlines()
    m = SPEED.match(lines[-1])
    assert m, proc.stdout + proc.stderr
    n_gen, gen_tps, n_prompt, prompt_tps = int(m[1]), float(m[2]), int(m[3]), float(m[4])
    assert 1 <= n_gen <= 64 and n_prompt > 5 and gen_tps > 0 and prompt_tps > 0
    answer = "\n".join(lines[:-1])
    assert answer.startswith(PROMPT) and len(answer[len(PROMPT):].split()) >= 10, proc.stdout + proc.stderr
    # the layers ran on the worker, over RPC
    wport, sport = map(int, ENDPOINTS.search(proc.stderr).groups())  # type: ignore[union-attr]
    assert re.search(rf"RPC0\[127\.0\.0\.1:{wport}\]\s+layers 0-17", proc.stderr), proc.stderr
    serve_log = (logs_of(proc.stderr) / "serve.log").read_text()
    assert f"device CPU+RPC0[127.0.0.1:{wport}]" in serve_log
    assert not accepts(wport) and not accepts(sport)   # both stopped
    print(f"demo: {elapsed:.1f} s, {n_gen} tokens at {gen_tps:.1f} tokens/s, prompt {prompt_tps:.1f} tokens/s")


def test_demo_chat_on_another_model(tmp_path: Path) -> None:
    model = write_model(tmp_path / "synth.gguf", "llama", "q8_0")
    proc = demo("--chat", "--model", str(model), "-n", "8", "-p", "hi there")
    assert proc.returncode == 0, proc.stderr
    m = SPEED.match(proc.stdout.rstrip("\n").splitlines()[-1])
    assert m and 1 <= int(m[1]) <= 8, proc.stdout
    wport, sport = map(int, ENDPOINTS.search(proc.stderr).groups())  # type: ignore[union-attr]
    assert not accepts(wport) and not accepts(sport)


def test_demo_load_failure_is_one_line_and_stops_the_worker(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 60)
    proc = demo("--model", str(bad), timeout=120)
    assert proc.returncode == 2, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("hybridllm demo: error:")]
    assert len(errors) == 1 and errors[0].startswith(
        f"hybridllm demo: error: the server exited (code 1): failed to load the model: {bad}: "), proc.stderr
    logs = logs_of(proc.stderr)
    assert f"(logs: {logs})" in proc.stderr
    worker_log = (logs / "worker.log").read_text()
    port = re.search(r"127\.0\.0\.1:(\d+)", worker_log)
    assert port, worker_log
    assert not accepts(int(port[1]))


def test_demo_missing_model_file(tmp_path: Path) -> None:
    proc = demo("--model", str(tmp_path / "nope.gguf"), timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"hybridllm demo: error: model file not found: {tmp_path / 'nope.gguf'}"


def test_locked_worker_and_sigterm_stops_both(tmp_path: Path) -> None:
    model = write_model(tmp_path / "synth.gguf", "llama", "q8_0")
    proc = subprocess.Popen(DEMO + ["--model", str(model), "-n", "100000", "--chat"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            m = ENDPOINTS.search(line)
            if m:
                break
        else:
            pytest.fail("the demo never started its server")
        wport, sport = int(m[1]), int(m[2])
        assert accepts(wport) and accepts(sport)
        with pytest.raises(RpcError, match="does it require a token"):   # the demo's pair shares a secret
            RpcConnection(f"127.0.0.1:{wport}", connect_timeout=5).close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 130
        assert not accepts(wport) and not accepts(sport)
    finally:
        proc.kill()
        proc.wait()
