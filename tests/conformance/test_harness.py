"""Self-checks of the conformance harness: synthetic weights decode as intended, the files have the
shapes llama.cpp expects, and the logit comparison catches a different model."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf.quants import dequantize

from conformance_harness import REL_TOL, model, prompt_ids
from hybridllm.testing.peer_master import compare_runs, run_master
from hybridllm.testing.synth import ARCHS, WEIGHT_TYPES, random_weight, write_model


@pytest.mark.parametrize("wtype", list(WEIGHT_TYPES))
def test_random_weights_are_zero_mean_with_the_target_spread(wtype: str):
    qtype = WEIGHT_TYPES[wtype]
    raw = random_weight(np.random.default_rng(7), (64, 512), qtype, std=0.02)
    x = dequantize(raw, qtype) if raw.dtype == np.uint8 else raw.astype(np.float32)
    assert x.shape == (64, 512)
    assert np.all(np.isfinite(x))
    assert 0.015 < x.std() < 0.03
    assert abs(x.mean()) < 0.002
    assert np.abs(x.reshape(-1, 256).mean(axis=1)).max() < 0.01   # no block drifts off zero


def _tensors(path: Path) -> dict[str, tuple[str, list[int]]]:
    reader = gguf.GGUFReader(path)
    return {t.name: (t.tensor_type.name, [int(n) for n in t.shape]) for t in reader.tensors}


def test_synthetic_files_have_llama_cpp_shapes(tmp_path: Path):
    moe = _tensors(write_model(tmp_path / "moe.gguf", "qwen3moe", "q4_k"))
    assert moe["blk.0.ffn_gate_exps.weight"] == ("Q4_K", [256, 256, 8])
    assert moe["blk.0.ffn_down_exps.weight"] == ("Q4_K", [256, 256, 8])
    assert moe["blk.1.ffn_gate_inp.weight"] == ("F32", [256, 8])
    assert moe["blk.0.attn_q_norm.weight"] == ("F32", [64])
    qwen2 = _tensors(write_model(tmp_path / "q2.gguf", "qwen2", "q8_0"))
    assert qwen2["blk.0.attn_k.bias"] == ("F32", [128]) and "output.weight" not in qwen2
    gemma = _tensors(write_model(tmp_path / "g.gguf", "gemma3", "bf16"))
    assert gemma["blk.0.attn_q.weight"] == ("BF16", [256, 512])
    assert {"blk.1.post_attention_norm.weight", "blk.1.post_ffw_norm.weight"} <= gemma.keys()
    meta = gguf.GGUFReader(tmp_path / "g.gguf").fields
    assert meta["gemma3.attention.sliding_window"].contents() == 8
    assert meta["tokenizer.ggml.model"].contents() == "llama"


def test_comparison_catches_a_different_model(peer, synth_root: Path, tmp_path: Path):
    """Same model twice on llama.cpp's CPU: error exactly 0; a model with other weights: far above tol."""
    a = model(synth_root, "llama", "q8_0")
    b = write_model(tmp_path / "other.gguf", "llama", "q8_0", seed=1)
    kw = dict(n_gpu_layers=0, prompt_ids=prompt_ids(8, first=1), n_predict=4, force_tokens=prompt_ids(3, seed=2))
    ra = run_master(a, tmp_path / "a", **kw)
    ra2 = run_master(a, tmp_path / "a2", **kw)
    rb = run_master(b, tmp_path / "b", **kw)
    assert compare_runs(ra, ra2).worst == 0.0
    assert compare_runs(ra, rb).worst > 100 * REL_TOL
    assert ra.logits.shape == (4, 512) and ra.fed == prompt_ids(3, seed=2)


_LOAD_ALL = """
import sys
import numpy as np
from hybridllm.testing.peer import load_peer
lcp = load_peer()
for path in sys.argv[1:]:
    llm = lcp.Llama(path, n_ctx=64, n_threads=1, n_gpu_layers=0, verbose=False)
    llm._eval_tokens([2, 300, 301, 302], 0)
    x = np.frombuffer(llm._ffi.buffer(llm._lib.llama_get_logits_ith(llm._ctx, -1), 4 * llm.n_vocab), np.float32)
    assert llm.n_vocab == 512 and np.isfinite(x).all() and x.std() > 0.05, (path, x.std())
    llm.close()
    print("ok", path, flush=True)
"""


def test_llama_cpp_loads_and_runs_every_synthetic_file(peer, synth_root: Path):
    """Every architecture in every weight type: llama.cpp accepts the file and computes finite logits."""
    paths = [str(model(synth_root, a, t)) for a in ARCHS for t in WEIGHT_TYPES]
    proc = subprocess.run([sys.executable, "-c", _LOAD_ALL, *paths], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "GGML_NO_BACKTRACE": "1"})
    done = [ln for ln in proc.stdout.splitlines() if ln.startswith("ok ")]
    assert proc.returncode == 0 and len(done) == len(paths), \
        f"{len(done)}/{len(paths)} ran; next failed:\n{proc.stderr[-2000:]}"
