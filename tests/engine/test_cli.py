"""`hybridllm run / bench` end to end on a synthetic model (subprocesses, as a user runs them)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hybridllm.engine.runner import load
from hybridllm.engine.tokenizer import Tokenizer
from hybridllm.testing.synth import model_path

CLI = [sys.executable, "-c", "import sys; from hybridllm.cli import main; sys.exit(main())"]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return model_path(tmp_path_factory.mktemp("cli"), "llama", "q8_0")


def _run(args: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(CLI + args, input=stdin, capture_output=True, text=True, check=False, timeout=120)


def test_run_greedy_matches_runner(model: Path) -> None:
    prompt = "hello world"
    proc = _run(["run", str(model), "-p", prompt, "-n", "8", "--temp", "0", "--ctx", "256"])
    assert proc.returncode == 0, proc.stderr
    assert "tok/s" in proc.stderr
    runner = load(model, n_ctx=256)
    tok = Tokenizer.from_gguf(runner.metadata)
    ids = tok.tokenize(prompt, add_special=True, parse_special=True)
    out = [int(np.argmax(runner.decode(ids)[0]))]
    while len(out) < 8 and not tok.is_eog(out[-1]):
        out.append(int(np.argmax(runner.decode([out[-1]])[0])))
    out = [t for t in out if not tok.is_eog(t)]
    assert proc.stdout == prompt + tok.detokenize(out, unparse_special=True).decode("utf-8", "replace")


def test_chat_reads_turns_from_stdin(model: Path) -> None:
    proc = _run(["run", str(model), "--chat", "-n", "4", "--temp", "0", "--ctx", "256"], stdin="hi\nagain\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("generation:") == 2


def test_bench_json(model: Path) -> None:
    proc = _run(["bench", str(model), "-p", "16", "-n", "4", "-r", "1", "-o", "json", "--ctx", "256"])
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert [r["test"] for r in rows] == ["pp16", "tg4"]
    assert all(r["avg_ts"] > 0 and r["arch"] == "llama" for r in rows)


def test_run_context_overflow_is_one_line(model: Path) -> None:
    proc = _run(["run", str(model), "-p", "hello " * 300, "-n", "4", "--ctx", "256"])
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "context" in proc.stderr


def test_python_api_generate(model: Path) -> None:
    import hybridllm
    runner = hybridllm.load(model, n_ctx=256)
    text = runner.generate("hello world", n_predict=6)
    ids = runner.tokenizer.tokenize("hello world", add_special=True, parse_special=True)
    runner.reset()
    out = [int(np.argmax(runner.decode(ids)[0]))]
    while len(out) < 6 and not runner.tokenizer.is_eog(out[-1]):
        out.append(int(np.argmax(runner.decode([out[-1]])[0])))
    out = [t for t in out if not runner.tokenizer.is_eog(t)]
    assert text == runner.tokenizer.detokenize(out).decode("utf-8", "replace")
    assert runner.generate("hello world", n_predict=6) == text  # reset=True starts over
