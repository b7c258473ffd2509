"""`hybridllm` command line: each subcommand lives in its own module and registers itself here."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

# subcommand name -> module exposing `add_parser(subparsers)`; the parser's `func(args) -> int` runs it
SUBCOMMANDS = {
    "worker": "hybridllm.rpc.cli",
    "run": "hybridllm.engine.cli",
    "info": "hybridllm.engine.cli",
    "bench": "hybridllm.engine.cli",
    "serve": "hybridllm.server.cli",
    "demo": "hybridllm.demo",
}


class CliError(Exception):
    """A user error: printed as one line, exit code 2, no traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hybridllm", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    seen: set[str] = set()
    for module_name in dict.fromkeys(SUBCOMMANDS.values()):
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue  # subcommand not built yet
        module.add_parser(sub)
        seen.add(module_name)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return int(args.func(args) or 0)
    except CliError as exc:
        print(f"hybridllm {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    # `python -m hybridllm.cli`: run the importable module's main, so the CliError that subcommands import
    # from hybridllm.cli is the class main() catches (this __main__ copy has its own)
    from hybridllm.cli import main as _main
    sys.exit(_main())
