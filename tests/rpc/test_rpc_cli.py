"""`hybridllm worker`: flags, one-line errors, a real subprocess with two devices, graceful SIGTERM/SIGINT."""
from __future__ import annotations

import signal
import socket

import pytest
from rpc_helpers import HOST

from hybridllm.cli import main
from hybridllm.rpc import protocol as P
from hybridllm.rpc.cli import parse_size
from hybridllm.rpc.client import RpcClient
from hybridllm.testing.procs import start_worker


@pytest.mark.parametrize("argv,message", [
    (["--device", "cuda:0"], "needs CuPy"),
    (["--device", "rocm:1"], "needs CuPy"),
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--mem", "12XB"], "invalid size '12XB'"),
    (["--mem", "0"], "must be positive"),
    (["--port", "70000"], "out of range"),
    (["--threads", "0"], "at least 1"),
])
def test_bad_flags_give_one_line_errors(argv, message, capsys):
    assert main(["worker", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hybridllm worker: error:") and message in err[0], err


def test_port_in_use_is_a_one_line_error(capsys):
    with socket.socket() as s:
        s.bind((HOST, 0))
        s.listen()
        port = s.getsockname()[1]
        assert main(["worker", "--port", str(port)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(err) == 1 and f"cannot listen on 127.0.0.1:{port}" in err[0]


def test_parse_size():
    assert parse_size("8GiB") == 8 << 30
    assert parse_size("512M") == 512 << 20
    assert parse_size("1.5g") == 3 << 29
    assert parse_size("2GB") == 2 * 10 ** 9
    assert parse_size("4096") == 4096


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_worker_subprocess_two_devices_and_graceful_stop(tmp_path, sig):
    srv = start_worker(extra_args=["--device", "cpu", "--mem", "1GiB", "--cache", str(tmp_path / "c"),
                                   "--threads", "1"], log_dir=tmp_path)
    try:
        with RpcClient(HOST, srv.port) as c:
            assert c.call(P.DeviceCountReq()) == P.DeviceCountRsp(2)
            assert c.call(P.GetDeviceMemoryReq(1)).total_mem == 1 << 30
            _, base = c.alloc_buffer(4096, device=1)
            assert base != 0
            srv.proc.send_signal(sig)
            assert srv.proc.wait(timeout=20) == 0
            assert c.is_closed()
    finally:
        srv.stop()
    log = srv.log()
    assert "listening on 127.0.0.1" in log and "worker stopped" in log, log
    assert (tmp_path / "c").is_dir()
