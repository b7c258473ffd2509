"""`hybridllm serve model.gguf`: an OpenAI / llama-server compatible HTTP server."""
from __future__ import annotations

import argparse
import asyncio
import os
from pathlib import Path
from typing import Any

__all__ = ["add_parser", "run"]


def _split_list(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _tensor_split(value: str) -> list[float]:
    try:
        out = [float(v) for v in _split_list(value)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {value!r}") from None
    if not out or any(v < 0 for v in out) or sum(out) <= 0:
        raise argparse.ArgumentTypeError(f"expected non-negative proportions with a positive sum, got {value!r}")
    return out


def _port(value: str) -> int:
    try:
        port = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {value!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port out of range: {port}")
    return port


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("serve", help="serve a GGUF model over HTTP (OpenAI / llama-server API)",
                              description=__doc__)
    p.add_argument("model", help="path of the GGUF model")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=_port, default=8080, help="port to listen on (default 8080)")
    p.add_argument("-c", "--ctx", type=int, default=4096,
                   help="KV cache size in tokens, shared by all slots: each slot may use all of it while the "
                        "others leave room (KV memory is taken as used); 0 = the model's training context "
                        "(default 4096)")
    p.add_argument("-np", "--parallel", type=int, default=1,
                   help="slots: concurrent generations, batched together into shared ubatches (continuous "
                        "batching); more requests wait in a FIFO queue (default 1)")
    p.add_argument("--device", default="cpu", help="device that runs the model (default cpu)")
    p.add_argument("--rpc", type=_split_list, default=[], metavar="HOST:PORT[,..]",
                   help="RPC workers (hybridllm worker or llama.cpp rpc-server) whose devices hold layers")
    p.add_argument("--tensor-split", type=_tensor_split, default=[], metavar="A,B[,..]",
                   help="proportions of the layers per device: each worker's devices in --rpc order, then "
                        "--device (default: by free memory)")
    p.add_argument("--token", default=os.environ.get("HYBRIDLLM_API_KEY"),
                   help="API key clients must send (Authorization: Bearer T); env HYBRIDLLM_API_KEY")
    p.add_argument("--rpc-token", default=os.environ.get("HYBRIDLLM_RPC_TOKEN"),
                   help="shared secret of the workers (`hybridllm worker --token`); env HYBRIDLLM_RPC_TOKEN, "
                        "which other users cannot see in the process list")
    p.add_argument("-n", "--n-predict", type=int, default=-1,
                   help="default tokens to generate per request, -1 = until EOS or the context is full")
    p.add_argument("--alias", default=None, help="model name reported by the API (default: the file name)")
    p.set_defaults(func=run)
    return p


def _check(args: argparse.Namespace) -> None:
    from ..cli import CliError
    from .local_engine import EngineUnsupported, check_placement
    if not Path(args.model).is_file():
        raise CliError(f"model file not found: {args.model}")
    if args.parallel < 1:
        raise CliError(f"--parallel must be at least 1 (got {args.parallel})")
    if args.ctx < 0:
        raise CliError(f"--ctx must be 0 or positive (got {args.ctx})")
    if args.ctx and args.ctx < 8:
        raise CliError(f"--ctx {args.ctx} is too small")
    if args.n_predict < -1:
        raise CliError(f"--n-predict must be -1 or more (got {args.n_predict})")
    if args.rpc_token is not None and not args.rpc_token:
        raise CliError("--rpc-token must not be empty")
    try:
        check_placement(args.device, args.rpc, args.tensor_split)
    except EngineUnsupported as exc:
        raise CliError(str(exc)) from None


def run(args: argparse.Namespace) -> int:
    from ..cli import CliError
    from .app import serve
    from .local_engine import LocalEngine
    from .state import ServerConfig, ServerState
    _check(args)
    config = ServerConfig(model_path=args.model, n_parallel=args.parallel, n_ctx=args.ctx,
                          n_predict=args.n_predict, api_key=args.token or None)

    def load() -> LocalEngine:
        return LocalEngine.load(args.model, n_ctx=args.ctx, n_parallel=args.parallel, device=args.device,
                                name=args.alias, rpc=args.rpc, tensor_split=args.tensor_split or None,
                                rpc_token=args.rpc_token if args.rpc else None)
    try:
        return _run_loop(serve(ServerState(config), args.host, args.port, load))
    except OSError as exc:  # the address is taken or not ours
        raise CliError(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}") from None


def _run_loop(coro: Any) -> int:
    try:
        import uvloop
        factory = uvloop.new_event_loop
    except ImportError:  # uvloop is optional (not on Windows)
        factory = None
    if not hasattr(asyncio, "Runner"):  # Python 3.10
        return int(asyncio.run(coro))
    with asyncio.Runner(loop_factory=factory) as runner:
        return int(runner.run(coro))
