"""Run the real llama.cpp master (the peer's `Llama`) on a GGUF and record tokens, logits and timings.

The peer's native RPC client aborts its whole process on any protocol error, so the master always runs in
a subprocess: `python -m hybridllm.testing.peer_master MODEL --out DIR ...` evaluates a prompt, then N
greedy steps (optionally teacher-forced), and writes `DIR/result.json` and `DIR/logits.npy` (one row of
n_vocab float32 logits per step). `run_master()` is the in-process wrapper tests and benchmarks call.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

FLASH_ATTN = {"off": 0, "on": 1, "auto": -1}


class MasterFailed(RuntimeError):
    """The master subprocess failed (crash, abort, timeout); the message carries its log tail."""


@dataclass
class MasterResult:
    """What one master run produced."""
    prompt_tokens: list[int]
    tokens: list[int]          # greedy argmax after the prompt and after each fed token
    fed: list[int]             # tokens fed after the prompt (== tokens[:-1] unless teacher-forced)
    logits: np.ndarray         # (n_steps, n_vocab) float32
    timings: dict[str, float]
    info: dict[str, Any]
    log: str


# ---------------------------------------------------------------------------------------------------
# subprocess side

class _LibProxy:
    """Forwards to the peer's cffi lib, adjusting two settings `Llama()` has no argument for:
    `use_extra_bufts` (False = llama.cpp's "plain-buffer" CPU configuration, no weight repacking) and
    the context's `embeddings` flag, which the wrapper forces on; it makes every prompt token an output
    row (logits for all of them) and adds a pooled-embedding read per step, unlike a normal server."""

    def __init__(self, lib: Any, use_extra_bufts: bool, embeddings: bool) -> None:
        self._lib = lib
        self._use_extra_bufts = use_extra_bufts
        self._embeddings = embeddings

    def __getattr__(self, name: str) -> Any:
        return getattr(self._lib, name)

    def llama_model_default_params(self) -> Any:
        params = self._lib.llama_model_default_params()
        params.use_extra_bufts = self._use_extra_bufts
        return params

    def llama_init_from_model(self, model: Any, params: Any) -> Any:
        params.embeddings = self._embeddings
        return self._lib.llama_init_from_model(model, params)


def _open_llama(args: argparse.Namespace) -> Any:
    from hybridllm.testing.peer import load_peer

    lcp = load_peer()
    llama_mod = sys.modules["llama_cpp_py_sync.llama"]
    real_get_lib = llama_mod.get_lib
    llama_mod.get_lib = lambda: _LibProxy(real_get_lib(), args.extra_bufts, args.embeddings)
    kwargs: dict[str, Any] = dict(n_ctx=args.n_ctx, n_batch=args.n_batch, n_threads=args.threads,
                                  n_threads_batch=args.threads, n_gpu_layers=args.n_gpu_layers,
                                  flash_attn_type=FLASH_ATTN[args.flash_attn], seed=0, verbose=False)
    if args.rpc:
        kwargs["rpc_servers"] = args.rpc
    if args.tensor_split:
        kwargs["tensor_split"] = [float(x) for x in args.tensor_split.split(",")]
    return lcp.Llama(str(args.model), **kwargs)


def _logits(llm: Any, n_vocab: int) -> np.ndarray:
    ptr = llm._lib.llama_get_logits_ith(llm._ctx, -1)
    if ptr == llm._ffi.NULL:
        raise RuntimeError("llama_get_logits_ith returned NULL")
    return np.frombuffer(llm._ffi.buffer(ptr, 4 * n_vocab), dtype=np.float32).copy()


def _generate(llm: Any, prompt: list[int], n_predict: int, force: list[int]) -> dict[str, Any]:
    """Prompt, then greedy steps; step i feeds force[i] when given, else its own argmax."""
    n_vocab = llm.n_vocab
    t0 = time.perf_counter()
    n_past = llm._eval_tokens(prompt, 0)
    rows = [_logits(llm, n_vocab)]
    t1 = time.perf_counter()
    tokens, fed = [int(np.argmax(rows[0]))], []
    for i in range(n_predict - 1):
        nxt = force[i] if i < len(force) else tokens[-1]
        n_past = llm._eval_tokens([nxt], n_past)
        rows.append(_logits(llm, n_vocab))
        fed.append(nxt)
        tokens.append(int(np.argmax(rows[-1])))
    t2 = time.perf_counter()
    n_dec = len(fed)
    return {"tokens": tokens, "fed": fed, "logits": np.stack(rows),
            "timings": {"n_prompt": len(prompt), "prompt_s": t1 - t0, "prompt_tok_s": len(prompt) / (t1 - t0),
                        "n_decode": n_dec, "decode_s": t2 - t1,
                        "decode_tok_s": n_dec / (t2 - t1) if n_dec else 0.0}}


def _ids(text: str | None) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()] if text else []


def _subprocess_main(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    llm = _open_llama(args)
    load_s = time.perf_counter() - t0
    prompt = _ids(args.prompt_ids) if args.prompt_ids else llm.tokenize(args.prompt or "Hello world")
    if not prompt:
        raise SystemExit("empty prompt")
    if args.warmup:  # one untimed pass (graph allocation, first-touch of weights), then a clean cache
        _generate(llm, prompt, min(2, args.n_predict), [])
        llm._clear_context_state()
    res = _generate(llm, prompt, args.n_predict, _ids(args.force_tokens))
    res["timings"]["load_s"] = load_s
    np.save(out / "logits.npy", res.pop("logits"))
    info = {"model": str(args.model), "n_vocab": llm.n_vocab, "n_ctx": args.n_ctx, "rpc": args.rpc,
            "n_gpu_layers": args.n_gpu_layers, "flash_attn": args.flash_attn, "extra_bufts": args.extra_bufts,
            "embeddings": args.embeddings,
            "threads": args.threads}
    (out / "result.json").write_text(json.dumps({"prompt_tokens": prompt, **res, "info": info}))
    llm.close()
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--out", required=True, help="directory for result.json and logits.npy")
    ap.add_argument("--rpc", action="append", default=[], help="host:port of an RPC server (repeatable)")
    ap.add_argument("--n-gpu-layers", type=int, default=99, help="layers offloaded to the RPC devices")
    ap.add_argument("--tensor-split", default="", help="relative layer shares of the RPC devices, e.g. 1,1")
    ap.add_argument("--flash-attn", choices=sorted(FLASH_ATTN), default="off")
    ap.add_argument("--n-ctx", type=int, default=512)
    ap.add_argument("--n-batch", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--extra-bufts", action="store_true", help="let llama.cpp repack CPU weights")
    ap.add_argument("--embeddings", action="store_true",
                    help="keep the wrapper's embeddings mode (logits for every prompt token)")
    ap.add_argument("--prompt", help="prompt text (tokenized by the model's vocabulary)")
    ap.add_argument("--prompt-ids", help="comma-separated prompt token ids (instead of --prompt)")
    ap.add_argument("--n-predict", type=int, default=8, help="greedy steps (logit rows) to record")
    ap.add_argument("--force-tokens", default="", help="comma-separated tokens to feed instead of argmax")
    ap.add_argument("--warmup", action="store_true", help="one untimed pass before the measured one")
    return ap


# ---------------------------------------------------------------------------------------------------
# caller side

def run_master(model: str | Path, out_dir: str | Path, *, rpc: Sequence[str] = (), n_gpu_layers: int = 99,
               flash_attn: str = "off", prompt_ids: Sequence[int] | None = None, prompt: str | None = None,
               n_predict: int = 8, force_tokens: Sequence[int] = (), n_ctx: int = 512, threads: int = 2,
               tensor_split: Sequence[float] = (), extra_bufts: bool = False, warmup: bool = False,
               timeout: float = 300.0) -> MasterResult:
    """Run the peer master in a subprocess and load what it wrote; raise MasterFailed with its log."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "hybridllm.testing.peer_master", str(model), "--out", str(out),
           "--n-gpu-layers", str(n_gpu_layers), "--flash-attn", flash_attn, "--n-ctx", str(n_ctx),
           "--threads", str(threads), "--n-predict", str(n_predict)]
    for endpoint in rpc:
        cmd += ["--rpc", endpoint]
    if prompt_ids is not None:
        cmd += ["--prompt-ids", ",".join(map(str, prompt_ids))]
    elif prompt is not None:
        cmd += ["--prompt", prompt]
    if force_tokens:
        cmd += ["--force-tokens", ",".join(map(str, force_tokens))]
    if tensor_split:
        cmd += ["--tensor-split", ",".join(map(str, tensor_split))]
    if extra_bufts:
        cmd.append("--extra-bufts")
    if warmup:
        cmd.append("--warmup")
    log_path = out / "master.log"
    with open(log_path, "wb") as log:
        try:
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=timeout,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1", "GGML_NO_BACKTRACE": "1"})
            rc: int | str = proc.returncode
        except subprocess.TimeoutExpired:
            rc = f"timeout after {timeout:.0f}s"
    text = log_path.read_text(errors="replace")
    if rc != 0 or not (out / "result.json").exists():
        tail = "\n".join(text.splitlines()[-12:])  # ggml's abort message is last (no gdb backtrace)
        raise MasterFailed(f"peer master failed ({rc}) for {Path(model).name} rpc={list(rpc)}:\n{tail}")
    data = json.loads((out / "result.json").read_text())
    return MasterResult(prompt_tokens=data["prompt_tokens"], tokens=data["tokens"], fed=data["fed"],
                        logits=np.load(out / "logits.npy"), timings=data["timings"], info=data["info"],
                        log=text)


@dataclass
class Comparison:
    """Candidate vs reference logits, step by step (steps after the first token divergence excluded)."""
    rel_err: list[float]       # per step: max|cand - ref| / max|ref|
    steps_compared: int
    first_divergence: int | None   # first step whose greedy token differs (None: all equal)
    tie_only: bool                 # every differing token was a tie within the measured error

    @property
    def worst(self) -> float:
        return max(self.rel_err) if self.rel_err else float("inf")

    def summary(self) -> str:
        div = "none" if self.first_divergence is None else f"step {self.first_divergence}"
        steps = ", ".join(f"{e:.1e}" for e in self.rel_err[:8]) + (", ..." if len(self.rel_err) > 8 else "")
        return (f"worst rel err {self.worst:.3e} over {self.steps_compared} steps "
                f"(per step: {steps}); token divergence: {div}"
                + (" (ties within error)" if self.first_divergence is not None and self.tie_only else ""))


def compare_runs(ref: MasterResult, cand: MasterResult) -> Comparison:
    """Relative logit error per step, defined as max|cand - ref| / max|ref| over the vocabulary.

    When both runs were fed the same tokens (teacher forcing) all steps are comparable; otherwise steps
    after the first greedy divergence see different inputs and are left out. A differing argmax counts
    as a tie when the candidate's pick scores, in the reference logits, within 2x the step's absolute
    error of the reference's best.
    """
    if ref.prompt_tokens != cand.prompt_tokens:
        raise ValueError("runs used different prompts")
    n = min(len(ref.logits), len(cand.logits))
    if ref.logits.shape[1:] != cand.logits.shape[1:]:
        raise ValueError(f"vocabulary sizes differ: {ref.logits.shape} vs {cand.logits.shape}")
    errs, first, tie_only = [], None, True
    for i in range(n):
        if i > 0 and ref.fed[i - 1] != cand.fed[i - 1]:
            break
        r, c = ref.logits[i].astype(np.float64), cand.logits[i].astype(np.float64)
        abs_err = float(np.max(np.abs(c - r))) if np.all(np.isfinite(c)) else float("inf")
        errs.append(abs_err / max(float(np.max(np.abs(r))), 1e-30))
        if ref.tokens[i] != cand.tokens[i]:
            first = i if first is None else first
            tie_only = tie_only and bool(r[cand.tokens[i]] >= r.max() - 2 * abs_err)
    return Comparison(errs, len(errs), first, tie_only)


if __name__ == "__main__":
    sys.exit(_subprocess_main(build_parser().parse_args()))
