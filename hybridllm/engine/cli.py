"""`hybridllm run | info | bench`: generate text, describe a model, measure prompt/generation speed.

    hybridllm run model.gguf -p "The capital of France is" -n 64 --temp 0
    hybridllm run model.gguf --chat
    hybridllm run model.gguf --rpc 10.0.0.2:50052,10.0.0.3:50052 --tensor-split 2,1,1 -p "Hi"
    hybridllm info model.gguf
    hybridllm bench model.gguf -p 128 -n 128 [-o json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from ..backends.base import ComputeError
from ..cli import CliError
from ..rpc.transport import RpcError
from .alloc import AllocError
from .gguf_file import GGUFError, GGUFFile
from .kv_cache import ContextOverflow, pad
from .placement import parse_tensor_split
from .runner import EngineError, ModelRunner, load

_USER_ERRORS = (GGUFError, EngineError, ContextOverflow, MemoryError, ValueError, RpcError, AllocError)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    run = subparsers.add_parser("run", help="generate text with a GGUF model")
    _model_args(run)
    run.add_argument("-p", "--prompt", default="", help="prompt text")
    run.add_argument("-f", "--file", help="read the prompt from a file")
    run.add_argument("-n", "--n-predict", type=int, default=64, help="tokens to generate (-1: until end)")
    run.add_argument("--chat", action="store_true", help="interactive chat with the model's template")
    run.add_argument("--system", default="", help="system message for --chat")
    run.add_argument("--temp", type=float, default=0.8, help="temperature (0 = greedy)")
    run.add_argument("--top-k", type=int, default=40)
    run.add_argument("--top-p", type=float, default=0.95)
    run.add_argument("--min-p", type=float, default=0.05)
    run.add_argument("--repeat-penalty", type=float, default=1.0)
    run.add_argument("--seed", type=int, default=-1, help="RNG seed (-1: random)")
    run.add_argument("--no-special", action="store_true", help="do not render special tokens")
    run.set_defaults(func=cmd_run)

    info = subparsers.add_parser("info", help="architecture, hyper-parameters, tensors and memory of a GGUF")
    info.add_argument("model", help="path to a .gguf file")
    info.add_argument("--ctx", type=int, default=4096, help="context size for the KV-cache estimate")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.set_defaults(func=cmd_info)

    bench = subparsers.add_parser("bench", help="prompt processing and generation speed, like llama-bench")
    _model_args(bench)
    bench.add_argument("-p", "--n-prompt", type=int, default=128, help="prompt tokens (0: skip)")
    bench.add_argument("-n", "--n-gen", type=int, default=128, help="generated tokens (0: skip)")
    bench.add_argument("-r", "--repetitions", type=int, default=3)
    bench.add_argument("-o", "--output", choices=("md", "json"), default="md")
    bench.set_defaults(func=cmd_bench)


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="path to a .gguf file")
    p.add_argument("-c", "--ctx", type=int, default=4096, help="context size (tokens)")
    p.add_argument("-ub", "--ubatch", type=int, default=512, help="prompt tokens per graph evaluation")
    p.add_argument("--device", default="cpu", help="compute device (cpu)")
    p.add_argument("--no-flash-attn", action="store_true", help="KQ/softmax attention instead of flash attention")
    p.add_argument("--rpc", default="", metavar="HOST:PORT[,..]",
                   help="RPC workers (hybridllm worker or llama.cpp rpc-server) whose devices hold layers")
    p.add_argument("-ts", "--tensor-split", default="", metavar="A,B[,..]",
                   help="layer proportions per device: each worker's devices in --rpc order, then the local "
                        "device (default: by the free memory each reports)")


def placement_options(rpc: str, tensor_split: str) -> tuple[list[str], list[float] | None]:
    """--rpc and --tensor-split as load() takes them; CliError on a malformed value."""
    endpoints = [e.strip() for e in rpc.split(",") if e.strip()]
    try:
        return endpoints, parse_tensor_split(tensor_split) if tensor_split.strip() else None
    except ValueError as exc:
        raise CliError(str(exc)) from None


def _load(args: argparse.Namespace) -> ModelRunner:
    if args.ctx <= 0 or args.ubatch <= 0:
        raise CliError("--ctx and --ubatch must be positive")
    rpc, split = placement_options(args.rpc, args.tensor_split)
    try:
        return load(args.model, device=args.device, n_ctx=args.ctx, n_ubatch=args.ubatch,
                    flash_attn=not args.no_flash_attn, rpc=rpc, tensor_split=split,
                    progress=bool(rpc) or sys.stderr.isatty(), log=lambda text: print(text, file=sys.stderr))
    except _USER_ERRORS as exc:
        raise CliError(str(exc)) from None


# ------------------------------------------------------------------------------------------------
# run

def _tokenizer(runner: ModelRunner) -> Any:
    from .tokenizer import Tokenizer, VocabError
    try:
        return Tokenizer.from_gguf(runner.metadata)
    except (VocabError, ValueError, KeyError, TypeError) as exc:  # a bad vocab is a user error, not a crash
        raise CliError(f"{runner.model.path}: cannot load the tokenizer: {exc}") from None


def _sampler(args: argparse.Namespace, n_vocab: int) -> Any:
    from .sampler import DEFAULT_SEED, Sampler, SamplerParams
    params = SamplerParams(temperature=args.temp, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                           repeat_penalty=args.repeat_penalty,
                           seed=DEFAULT_SEED if args.seed < 0 else args.seed)
    try:
        return Sampler(params, n_vocab)
    except ValueError as exc:
        raise CliError(str(exc)) from None


def generate(runner: ModelRunner, tokenizer: Any, sampler: Any, prompt_ids: list[int], n_predict: int,
             emit: Callable[[str], None], special: bool = True) -> dict[str, Any]:
    """Evaluate the prompt (appended to what the cache holds), then sample until n_predict or EOG."""
    from .tokenizer import StreamDecoder
    sampler.accept_many(prompt_ids)
    t0 = time.perf_counter()
    logits = runner.decode(prompt_ids)[0]
    t1 = time.perf_counter()
    dec = StreamDecoder(tokenizer, special=special)
    n_gen, out = 0, []
    while n_predict < 0 or n_gen < n_predict:
        tok = sampler.sample(logits)
        n_gen += 1
        if tokenizer.is_eog(tok):
            break
        out.append(tok)
        emit(dec.feed([tok]))
        if runner.n_past >= runner.n_ctx:
            break
        logits = runner.decode([tok])[0]
    emit(dec.flush())
    t2 = time.perf_counter()
    return {"n_prompt": len(prompt_ids), "prompt_s": t1 - t0, "n_gen": n_gen, "gen_s": t2 - t1,
            "tokens": out}


def _print_timings(t: dict[str, Any], err: TextIO) -> None:
    pp = t["n_prompt"] / t["prompt_s"] if t["prompt_s"] > 0 else 0.0
    tg = t["n_gen"] / t["gen_s"] if t["gen_s"] > 0 else 0.0
    print(f"\nprompt: {t['n_prompt']} tokens in {t['prompt_s']:.2f} s ({pp:.2f} tok/s); "
          f"generation: {t['n_gen']} tokens in {t['gen_s']:.2f} s ({tg:.2f} tok/s)", file=err)


def cmd_run(args: argparse.Namespace) -> int:
    prompt = args.prompt
    if args.file:
        try:
            prompt = Path(args.file).read_text()
        except OSError as exc:
            raise CliError(f"cannot read {args.file}: {exc.strerror}") from None
    runner = _load(args)
    tokenizer = _tokenizer(runner)
    sampler = _sampler(args, runner.n_vocab)

    def emit(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    try:
        if args.chat:
            return _chat(args, runner, tokenizer, sampler, emit)
        ids = tokenizer.tokenize(prompt, add_special=True, parse_special=True)
        if not ids:
            raise CliError("the prompt is empty (give -p TEXT)")
        emit(prompt)
        t = generate(runner, tokenizer, sampler, ids, args.n_predict, emit, special=not args.no_special)
        _print_timings(t, sys.stderr)
    except (*_USER_ERRORS, ComputeError) as exc:  # e.g. an op the device lacks, found at the first graph
        raise CliError(str(exc)) from None
    return 0


def _chat(args: argparse.Namespace, runner: ModelRunner, tokenizer: Any, sampler: Any,
          emit: Callable[[str], None]) -> int:
    from .chat_template import ChatTemplate
    template = ChatTemplate.for_model(runner.metadata, tokenizer)
    messages: list[dict[str, str]] = [{"role": "system", "content": args.system}] if args.system else []
    cached: list[int] = []   # tokens whose K/V the cache holds
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            sys.stderr.write("> ")
            sys.stderr.flush()
        line = sys.stdin.readline()
        if not line:
            return 0
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.rstrip("\n")})
        ids = tokenizer.tokenize(template.render(messages, add_generation_prompt=True),
                                 add_special=True, parse_special=True)
        keep = 0  # reuse the cached prefix; re-evaluate from the first difference
        while keep < min(len(cached), len(ids) - 1) and cached[keep] == ids[keep]:
            keep += 1
        if not runner.rewind(keep):
            keep = 0
        t = generate(runner, tokenizer, sampler, ids[keep:], args.n_predict, emit, special=False)
        emit("\n")
        _print_timings(t, sys.stderr)
        reply = tokenizer.decode(t["tokens"]) if hasattr(tokenizer, "decode") else ""
        messages.append({"role": "assistant", "content": reply})
        cached = ids + list(t["tokens"])
        cached = cached[:runner.n_past]


# ------------------------------------------------------------------------------------------------
# info

def describe(path: str, n_ctx: int = 4096, n_ubatch: int = 512) -> dict[str, Any]:
    """Architecture, hyper-parameters, tensor types and memory needs, from the file alone."""
    from ..ggml.types import type_name
    from ..models import model_class
    with GGUFFile(path) as f:
        cls = model_class(f.arch, f.path)
        hp = cls.hparams_cls.from_gguf(f)
        types: dict[str, list[int]] = {}
        n_params = 0
        for t in f.tensors.values():
            e = types.setdefault(type_name(t.type), [0, 0])
            e[0] += 1
            e[1] += t.nbytes
            n_params += t.ne[0] * t.ne[1] * t.ne[2] * t.ne[3]
        weights = sum(t.nbytes for t in f.tensors.values())
        name = f.get("general.name", Path(path).stem)
    size = pad(n_ctx)
    n_swa = getattr(hp, "n_swa", 0)
    swa_size = pad(min(size, n_swa + n_ubatch)) if n_swa else 0
    kv = 0
    for il in range(hp.n_layer):
        cells = swa_size if hp.is_swa(il) else size
        kv += cells * (hp.n_embd_k_gqa + hp.n_embd_v_gqa) * 2  # F16 K and V
    return {"path": path, "name": name, "arch": hp.arch, "n_params": n_params,
            "hparams": {k: (list(v) if isinstance(v, tuple) else v) for k, v in hp.summary().items()},
            "tensor_types": {k: {"count": v[0], "bytes": v[1]} for k, v in sorted(types.items())},
            "memory": {"weights": weights, "kv_cache": kv, "n_ctx": size, "n_ctx_swa": swa_size}}


def cmd_info(args: argparse.Namespace) -> int:
    try:
        d = describe(args.model, args.ctx)
    except _USER_ERRORS as exc:
        raise CliError(str(exc)) from None
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    hp = d["hparams"]
    print(f"{d['name']} ({d['arch']}, {d['n_params'] / 1e6:.1f} M parameters)")
    for k, v in hp.items():
        if k == "swa_layers":
            v = "".join("S" if x else "G" for x in v)
        print(f"  {k:22s} {v}")
    print("tensor types:")
    for t, e in d["tensor_types"].items():
        print(f"  {t:8s} {e['count']:5d} tensors  {e['bytes'] / 2**20:10.2f} MiB")
    m = d["memory"]
    swa = f", SWA layers {m['n_ctx_swa']} cells" if m["n_ctx_swa"] else ""
    print(f"memory: weights {m['weights'] / 2**20:.1f} MiB, KV cache {m['kv_cache'] / 2**20:.1f} MiB "
          f"(F16, {m['n_ctx']} cells{swa})")
    return 0


# ------------------------------------------------------------------------------------------------
# bench

def bench(runner: ModelRunner, n_prompt: int, n_gen: int, reps: int, seed: int = 0) -> list[dict[str, Any]]:
    """llama-bench's pp<n> (one prompt of n tokens) and tg<n> (n single-token steps), empty cache each."""
    rng = np.random.default_rng(seed)
    results = []
    tests = [("pp", n_prompt), ("tg", n_gen)]
    runner.decode(rng.integers(0, runner.n_vocab, 2).tolist())  # warm-up: graphs, first touch
    runner.reset()
    for kind, n in tests:
        if n <= 0:
            continue
        samples = []
        for _ in range(reps):
            runner.reset()
            toks = rng.integers(0, runner.n_vocab, n).tolist()
            t0 = time.perf_counter()
            if kind == "pp":
                runner.decode(toks)
            else:
                for tok in toks:
                    runner.decode([tok])
            samples.append(n / (time.perf_counter() - t0))
        results.append({"test": f"{kind}{n}", "n_tokens": n, "avg_ts": float(np.mean(samples)),
                        "stddev_ts": float(np.std(samples)), "samples_ts": samples})
    return results


def cmd_bench(args: argparse.Namespace) -> int:
    if args.repetitions <= 0 or args.n_prompt < 0 or args.n_gen < 0:
        raise CliError("-r must be positive and -p/-n non-negative")
    runner = _load(args)
    try:
        if args.n_prompt + 2 > runner.n_ctx or args.n_gen + 2 > runner.n_ctx:
            raise CliError(f"-p/-n do not fit the context of {runner.n_ctx}")
        results = bench(runner, args.n_prompt, args.n_gen, args.repetitions)
    except (*_USER_ERRORS, ComputeError) as exc:
        raise CliError(str(exc)) from None
    st = runner.stats
    model = {"model": Path(args.model).name, "arch": runner.hp.arch, "size": runner.model.weights.nbytes,
             "backend": "+".join(b.name for b in runner.model.placement.devices), "threads": os.cpu_count(),
             "flash_attn": not args.no_flash_attn, "n_ubatch": args.ubatch}
    if args.output == "json":
        print(json.dumps([{**model, **r} for r in results], indent=2))
        return 0
    print("| model | size | backend | fa | test | t/s |")
    print("| --- | ---: | --- | -: | ---: | ---: |")
    for r in results:
        print(f"| {model['model']} | {model['size'] / 2**20:.1f} MiB | {model['backend']} | "
              f"{int(model['flash_attn'])} | {r['test']} | {r['avg_ts']:.2f} ± {r['stddev_ts']:.2f} |")
    total = st.build_s + st.inputs_s + st.compute_s + st.read_s
    if total > 0:
        print(f"\ntime: compute {100 * st.compute_s / total:.1f}%, graph build/alloc {100 * st.build_s / total:.1f}%, "
              f"inputs {100 * st.inputs_s / total:.1f}%, logits read {100 * st.read_s / total:.1f}% "
              f"({st.graphs_built} graphs built for {st.ubatches} ubatches)", file=sys.stderr)
    return 0
