"""Layers on RPC workers (our `hybridllm worker` and llama.cpp's own rpc-server, as subprocesses) give the
greedy output of the all-local run; a decode step costs one round trip and the logits never cross the
wire; a worker that dies fails the step at once with a clear error, and recover() brings its layers back
(from the worker's --cache, without re-sending the weights)."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from hybridllm.engine.runner import DeviceLost, ModelRunner, load
from hybridllm.rpc import protocol as P
from hybridllm.rpc.client_backend import RpcBackend, RpcError
from hybridllm.testing.procs import (
    HOST,
    ServerProc,
    free_port,
    start_peer_server,
    start_worker,
)
from hybridllm.testing.synth import model_path

PROMPT = [1, 5, 9, 33, 100, 7, 200, 301, 44]
FED = [17, 3, 250, 41]
GEMMA_PROMPT = [2, 818, 5279, 529, 7001, 563]


@pytest.fixture(scope="module")
def ours(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    with start_worker(log_dir=tmp_path_factory.mktemp("ours"), extra_args=["--device", "cpu"]) \
            as srv:
        yield srv


@pytest.fixture(scope="module")
def llama_server(peer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:  # type: ignore[no-untyped-def]
    with start_peer_server(threads=2, log_dir=tmp_path_factory.mktemp("peer")) as srv:
        yield srv


@pytest.fixture(params=["ours", "peer"])
def server(request: pytest.FixtureRequest) -> ServerProc:
    return request.getfixturevalue("ours" if request.param == "ours" else "llama_server")


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("synth")


def rows(r: ModelRunner) -> np.ndarray:
    out = [r.decode(PROMPT)[0]] + [r.decode([t])[0] for t in FED]
    r.close()
    return np.stack(out)


def rpc_devices(r: ModelRunner) -> list[RpcBackend]:
    return [b for b in r.model.placement.devices if isinstance(b, RpcBackend)]


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def peer_spread(path: Path, peer: ServerProc, want: np.ndarray) -> float:
    """How far llama.cpp's kernels are from ours on this model: every node of the graph on its worker."""
    with RpcBackend(peer.endpoint) as be:
        return rel_err(rows(load(path, device=be, n_ctx=256, flash_attn=False)), want)


def check(got: np.ndarray, want: np.ndarray, spread: float) -> None:
    """Our worker runs our kernels: bit-identical. With llama.cpp's kernels on some layers the error may
    be what llama.cpp's kernels give on their own (ggml's F16 GELU table alone is ~1e-2 on gemma3), no more;
    a mis-wired input or transfer would be far off."""
    if spread == 0.0:
        np.testing.assert_array_equal(got, want)
    else:
        assert rel_err(got, want) <= 1.5 * spread + 1e-5
    assert (got.argmax(1) == want.argmax(1)).all()


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_split_with_a_worker(root: Path, server: ServerProc, arch: str) -> None:
    path = model_path(root, arch, "q8_0", n_layer=4)
    want = rows(load(path, n_ctx=256, flash_attn=False))
    spread = 0.0 if server.kind == "ours" else peer_spread(path, server, want)
    r = load(path, rpc=[server.endpoint], tensor_split=[1] * (3 if server.kind == "ours" else 2),
             n_ctx=256, flash_attn=False)
    devs = rpc_devices(r)
    assert [len(r.model.placement.layers_of(d)) > 0 for d in devs] == [True] * len(devs)
    check(rows(r), want, spread)


def test_two_workers_and_the_master(root: Path, ours: ServerProc, llama_server: ServerProc) -> None:
    """Layers on our worker, then llama.cpp's, then the master: activations go worker -> master -> worker."""
    path = model_path(root, "gemma3", "q8_0", n_layer=6)
    want = rows(load(path, n_ctx=256, flash_attn=False))
    spread = peer_spread(path, llama_server, want)
    r = load(path, rpc=[ours.endpoint, llama_server.endpoint], tensor_split=[1, 0, 1, 1], n_ctx=256,
             flash_attn=False)
    names = [b.name for b in r.model.placement.layer_backends]
    assert names == [f"RPC0[{ours.endpoint}]"] * 2 + [f"RPC0[{llama_server.endpoint}]"] * 2 + ["CPU"] * 2
    check(rows(r), want, spread)


def test_gemma_all_layers_on_a_worker(gemma_path: Path, server: ServerProc) -> None:
    """gemma-3-270m with its 18 layers on the worker, embedding and output on the master: the greedy
    tokens of the reference (all local for our worker; for llama.cpp's, the whole graph on its worker, so
    that both runs use llama.cpp's kernels for every layer); each decode step is one round trip that
    brings back one row of hidden state, not logits."""
    n = 12
    if server.kind == "ours":
        ref = load(gemma_path, n_ctx=512)
    else:
        ref_dev = RpcBackend(server.endpoint)
        ref = load(gemma_path, device=ref_dev, n_ctx=512)
    want = [int(np.argmax(ref.decode(GEMMA_PROMPT)[0]))]
    want_logits = []
    while len(want) < n:
        want_logits.append(ref.decode([want[-1]])[0])
        want.append(int(np.argmax(want_logits[-1])))
    ref.close()
    if server.kind == "peer":
        ref_dev.close()   # llama.cpp's rpc-server serves one client at a time
    split = [1, 0, 0] if server.kind == "ours" else [1, 0]   # ours serves two devices: the first takes all
    r = load(gemma_path, rpc=[server.endpoint], tensor_split=split, n_ctx=512)
    dev = rpc_devices(r)[0]
    assert r.model.placement.layers_of(dev) == list(range(18))
    got = [int(np.argmax(r.decode(GEMMA_PROMPT)[0]))]
    steps = []
    while len(got) < n:
        before = dev.traffic.copy()
        logits = r.decode([got[-1]])[0]
        steps.append(dev.traffic - before)
        ref_row = want_logits[len(got) - 1]
        if server.kind == "ours":
            np.testing.assert_array_equal(logits, ref_row)
        else:   # only the output matmul ran on other kernels
            assert rel_err(logits, ref_row) < 1e-4
        got.append(int(np.argmax(logits)))
    r.close()
    assert got == want
    for st in steps[1:]:
        assert st.round_trips == 1 and st.commands["GRAPH_RECOMPUTE"] == 1 and st.commands["GRAPH_COMPUTE"] == 0
        assert st.bytes_received == 8 + 4 * 640    # GET_TENSOR of the last layer's output row
        assert st.bytes_sent < 8 * 1024            # embedding row, positions, KV indices, masks, headers


def _spawn_worker(port: int, cache: Path, log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "hybridllm.cli", "worker", "--host", HOST, "--port",
                                 str(port), "--threads", "1", "--cache", str(cache)],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            RpcBackend(f"{HOST}:{port}", connect_timeout=1).close()
            return proc
        except RpcError:
            assert proc.poll() is None, log.read_text()
            time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"worker did not start:\n{log.read_text()}")


def test_worker_dies_and_comes_back(root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # weights are uploaded in runs; runs above the hash threshold go through SET_TENSOR_HASH. The synthetic
    # layers are ~1 MiB, so the 10 MiB threshold is lowered to let them take that path.
    monkeypatch.setattr(P, "HASH_THRESHOLD", 64 * 1024)
    path = model_path(root, "llama", "q8_0", n_layer=4)
    want = rows(load(path, n_ctx=256))
    port, cache, log = free_port(), tmp_path / "cache", tmp_path / "worker.log"
    proc = _spawn_worker(port, cache, log)
    try:
        r = load(path, rpc=[f"{HOST}:{port}"], tensor_split=[1, 1], n_ctx=256)
        (dev,) = rpc_devices(r)
        r.decode(PROMPT)
        r.decode([FED[0]])
        proc.kill()
        proc.wait(10)
        t0 = time.monotonic()
        with pytest.raises(DeviceLost, match=rf"RPC0\[{HOST}:{port}\] \(holding layers 0-1\) failed: RPC worker"):
            r.decode([FED[1]])
        assert time.monotonic() - t0 < 5
        state, why = r.health()
        assert state == "degraded" and f"{HOST}:{port}" in why
        with pytest.raises(DeviceLost, match="recover"):   # fails at once while degraded
            r.decode([FED[1]])
        with pytest.raises(RpcError):                       # the worker is still down
            r.recover()
        assert r.health()[0] == "degraded"
        proc = _spawn_worker(port, cache, log)
        before = dev.traffic.copy()
        r.recover()
        moved = dev.traffic - before
        assert r.health() == ("ok", "")
        on_worker = r.model.weights.bytes_on(dev)
        assert moved.hash_hits >= 1 and moved.hash_bytes_saved >= 0.9 * on_worker   # taken from --cache
        assert moved.bytes_sent < 0.1 * on_worker
        assert r.n_past == 0
        np.testing.assert_array_equal(rows(r), want)
    finally:
        proc.kill()
        proc.wait(10)


def test_hung_worker_fails_the_step_after_the_timeout(root: Path, tmp_path: Path) -> None:
    path = model_path(root, "llama", "q8_0", n_layer=4)
    want = rows(load(path, n_ctx=256))
    port = free_port()
    proc = _spawn_worker(port, tmp_path / "cache", tmp_path / "worker.log")
    try:
        r = load(path, rpc=[f"{HOST}:{port}"], tensor_split=[1, 1], n_ctx=256, rpc_timeout=2.0)
        r.decode(PROMPT)
        proc.send_signal(signal.SIGSTOP)
        t0 = time.monotonic()
        with pytest.raises(DeviceLost, match="timed out"):
            r.decode([FED[0]])
        assert time.monotonic() - t0 < 10
        proc.send_signal(signal.SIGCONT)
        r.recover()
        np.testing.assert_array_equal(rows(r), want)
    finally:
        proc.kill()
        proc.wait(10)


def test_health_probe_notices_a_worker_that_died_while_idle(root: Path, tmp_path: Path) -> None:
    port = free_port()
    proc = _spawn_worker(port, tmp_path / "cache", tmp_path / "worker.log")
    try:
        r = load(model_path(root, "llama", "q8_0", n_layer=4), rpc=[f"{HOST}:{port}"], tensor_split=[1, 1],
                 n_ctx=256)
        r.decode(PROMPT)
        assert r.health(probe=True) == ("ok", "")
        proc.kill()
        proc.wait(10)
        assert r.health() == ("ok", "")       # nothing was sent since: not known yet
        state, why = r.health(probe=True)
        assert state == "degraded" and f"RPC0[{HOST}:{port}] (holding layers 0-1) failed" in why
        r.close()
    finally:
        proc.kill()
        proc.wait(10)


CLI = [sys.executable, "-m", "hybridllm.cli"]


def _cli(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(CLI + args, capture_output=True, text=True, check=False, timeout=120)


def test_cli_run_with_rpc(root: Path, ours: ServerProc) -> None:
    path = str(model_path(root, "llama", "q8_0", n_layer=4))
    args = ["run", path, "-p", "hello world", "-n", "8", "--temp", "0", "--ctx", "256"]
    local = _cli(args)
    split = _cli(args + ["--rpc", ours.endpoint, "--tensor-split", "1,1,1"])
    assert local.returncode == 0 and split.returncode == 0, split.stderr
    assert split.stdout == local.stdout
    assert "placement (--tensor-split 1,1,1)" in split.stderr and f"RPC1[{ours.endpoint}]" in split.stderr
    assert f"weights -> RPC0[{ours.endpoint}]" in split.stderr   # the upload progress bar


@pytest.mark.parametrize("extra, message", [
    (["--tensor-split", "1,x"], "--tensor-split '1,x': expected comma-separated numbers"),
    (["--tensor-split", "1,1"], "--tensor-split has 2 values for 3 devices"),
])
def test_cli_placement_errors_are_one_line(root: Path, ours: ServerProc, extra: list[str], message: str) -> None:
    path = str(model_path(root, "llama", "q8_0", n_layer=4))
    proc = _cli(["run", path, "-p", "hi", "--ctx", "256", "--rpc", ours.endpoint, *extra])
    assert proc.returncode != 0 and message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_cli_unreachable_worker_is_one_line(root: Path) -> None:
    port = free_port()
    proc = _cli(["run", str(model_path(root, "llama", "q8_0", n_layer=4)), "-p", "hi", "--rpc", f"{HOST}:{port}"])
    assert proc.returncode != 0
    assert proc.stderr.strip() == f"hybridllm run: error: RPC worker {HOST}:{port}: cannot connect: Connection refused"
