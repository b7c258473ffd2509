"""`hybridllm worker`: a drop-in for llama.cpp's `rpc-server` (RPC protocol 8.0.0)."""
from __future__ import annotations

import argparse
import os
import re
from typing import Any

from ..cli import CliError

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1000, "kib": 1 << 10, "m": 1 << 20, "mb": 1000 ** 2,
          "mib": 1 << 20, "g": 1 << 30, "gb": 1000 ** 3, "gib": 1 << 30, "t": 1 << 40, "tb": 1000 ** 4,
          "tib": 1 << 40}


def parse_size(text: str) -> int:
    """'8GiB', '512M', '1.5g', '4096' -> bytes (binary for K/M/G/T, decimal for KB/MB/GB/TB)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise CliError(f"invalid size {text!r} (examples: 8GiB, 512M, 4096)")
    value = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if value <= 0:
        raise CliError(f"size {text!r} must be positive")
    return value


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("worker", help="serve devices to llama.cpp masters over RPC",
                              description=__doc__)
    p.add_argument("--device", action="append", default=None, metavar="DEV",
                   help="device to serve: cpu, cuda:N or rocm:N (repeatable; each one is a wire device index)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=50052, help="port (default 50052)")
    p.add_argument("--mem", default=None, help="memory reported and usable per device, e.g. 8GiB")
    p.add_argument("--cache", default=None, metavar="DIR",
                   help="tensor cache directory (compatible with rpc-server -c)")
    p.add_argument("--threads", type=int, default=None, help="compute threads (default: all cores)")
    p.add_argument("--token", default=None,
                   help="require hybridllm masters to prove this shared secret (never sent in clear; "
                        "llama.cpp masters cannot connect then). Default: $HYBRIDLLM_RPC_TOKEN if set")
    p.set_defaults(func=run)


def _make_devices(names: list[str], mem: int | None) -> list:
    from ..backends import DeviceError, make_backend
    try:
        return [make_backend(name, mem_limit=mem) for name in names]
    except DeviceError as exc:
        raise CliError(str(exc)) from None


def _set_threads(n: int) -> None:
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)   # effective for BLAS libraries not loaded yet
    try:
        import numba
        numba.set_num_threads(min(n, int(getattr(numba.config, "NUMBA_NUM_THREADS", n))))
        from ..backends.cpu_kernels import set_num_threads
        set_num_threads(n)  # the matmul kernels' own thread pool
        from ..backends.numpy_ops import attention
        attention.GGML_THREADS = n  # ggml splits a decode FA over its threads; the replay must split alike
    except ImportError:  # pragma: no cover
        pass


def run(args: argparse.Namespace) -> int:
    if not 0 <= args.port <= 65535:
        raise CliError(f"--port {args.port} is out of range 0-65535")
    if args.threads is not None:
        if args.threads < 1:
            raise CliError("--threads must be at least 1")
        _set_threads(args.threads)
    mem = parse_size(args.mem) if args.mem is not None else None
    devices = _make_devices(args.device or ["cpu"], mem)
    cache = None
    if args.cache is not None:
        from .cache import TensorCache
        try:
            cache = TensorCache(os.path.expanduser(args.cache))
        except OSError as exc:
            raise CliError(f"--cache {args.cache}: {exc.strerror or exc}") from exc
    token = args.token if args.token is not None else os.environ.get("HYBRIDLLM_RPC_TOKEN")
    if token is not None and not token:
        raise CliError("--token must not be empty")
    from .server import WorkerServer, serve
    server = WorkerServer(devices, args.host, args.port, cache,
                          token=token.encode("utf-8") if token is not None else None)
    try:
        serve(server)
    except OSError as exc:
        raise CliError(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}") from exc
    return 0
