"""Tiny synthetic llama / qwen2 / qwen3 / qwen3moe / gemma3 models: our engine against the real llama.cpp.

Two independent checks per architecture:
* node by node: every node of our prompt and decode graphs, recomputed by ggml's own CPU kernel on the
  very same inputs, agrees within 1e-5 relative (the graph means what llama.cpp's graph means);
* end to end: logits of a prompt and teacher-forced decode steps against the peer master (CPU,
  plain-buffer configuration) within 1e-3 relative: activations are re-quantized to 8 bits before every
  quantized matmul, so an ulp of difference would flip roundings that these random models amplify; it
  holds because our CPU ops replay ggml's kernels bit for bit (tests/numerics).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from ggml_nodes import check_plan

from hybridllm.engine.runner import ModelRunner, load
from hybridllm.testing.peer_master import run_master
from hybridllm.testing.synth import ARCHS, model_path

REL_TOL = 1e-3
NODE_TOL = 1e-5
# ggml keeps FLASH_ATTN_EXT's V accumulator in F16 on its row-by-row path (< 64 queries); the numpy kernel
# accumulates in F32, so that op agrees to F16 precision only. Wrong scale/mask/GQA would be far above this.
NODE_TOL_OP = {"FLASH_ATTN_EXT": 5e-3}
PROMPT = [1, 5, 9, 33, 100, 7, 200, 301, 44, 45, 46, 47, 48]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("synth")


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def ours(path: Path, prompt: list[int], fed: list[int], flash_attn: bool, n_ubatch: int = 512) -> np.ndarray:
    r = load(path, n_ctx=512, n_ubatch=n_ubatch, flash_attn=flash_attn)
    rows = [r.decode(prompt)[0]] + [r.decode([t])[0] for t in fed]
    r.close()
    return np.stack(rows)


@pytest.mark.parametrize("flash_attn", [True, False], ids=["fa", "nofa"])
@pytest.mark.parametrize("arch", ARCHS)
def test_nodes_match_ggml(root: Path, arch: str, flash_attn: bool) -> None:
    """Each node of the prompt and decode graphs == ggml's kernel on the same inputs."""
    runner = load(model_path(root, arch, "q8_0"), n_ctx=512, flash_attn=flash_attn)
    reports = []

    def checked(prep):  # type: ignore[no-untyped-def]
        nodes, kernels = prep.ctx.graph.nodes, prep.plan.kernels

        class Plan:
            def run(self) -> None:
                reports.append(check_plan(nodes, kernels))
        prep.plan = Plan()
        return prep

    orig = runner._prepared
    runner._prepared = lambda key: checked(orig(key))  # type: ignore[method-assign]
    runner.decode(PROMPT)
    runner.decode([17])
    runner.close()
    assert len(reports) == 2
    for rep in reports:
        bad = [d for d in rep if d.max_rel >= NODE_TOL_OP.get(d.op, NODE_TOL)]
        assert not bad, f"{arch}: {bad[:3]}"


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_llama_cpp(root: Path, arch: str, tmp_path: Path) -> None:
    path = model_path(root, arch, "q8_0")
    ref = run_master(path, tmp_path / "off", prompt_ids=PROMPT, n_predict=5, flash_attn="off", n_ctx=512)
    ref_fa = run_master(path, tmp_path / "on", prompt_ids=PROMPT, n_predict=5, flash_attn="on", n_ctx=512,
                        force_tokens=ref.fed)
    spread = max(rel_err(a, b) for a, b in zip(ref_fa.logits, ref.logits))
    tol = REL_TOL  # ops are bit-exact with ggml's CPU kernels (tests/numerics); `spread` is for the message
    for fa, want in ((False, ref), (True, ref_fa)):
        got = ours(path, PROMPT, ref.fed, fa)
        errs = [rel_err(a, b) for a, b in zip(got, want.logits)]
        assert max(errs) <= tol, f"{arch} fa={fa}: errors {errs}, tolerance {tol:.1e} (llama.cpp spread {spread:.1e})"
        for i, (a, b) in enumerate(zip(got, want.logits)):
            if a.argmax() != b.argmax():  # only a near-tie may pick differently
                assert b[a.argmax()] >= b.max() - 2 * errs[i] * np.abs(b).max(), f"{arch} step {i}"


def test_gemma3_sliding_window_wraps(root: Path, tmp_path: Path) -> None:
    """300 tokens through a window-8 model in 64-token ubatches: the SWA ring (256 cells) wraps.

    F32 weights: no 8-bit re-quantization of activations, so no rounding flips to amplify (the error is
    ~1e-4 here; a window off by one gives ~0.3).
    """
    path = model_path(root, "gemma3", "f32")
    prompt = np.random.default_rng(1).integers(10, 500, 300).tolist()
    ref = run_master(path, tmp_path / "ref", prompt_ids=prompt, n_predict=3, flash_attn="off", n_ctx=512)
    r: ModelRunner = load(path, n_ctx=512, n_ubatch=64, flash_attn=False)
    assert r.kv.caches[1].size == 256 and r.kv.caches[1].n_swa == 8
    rows = [r.decode(prompt)[0]] + [r.decode([t])[0] for t in ref.fed]
    assert r.kv.caches[1].pos.min() >= 300 - 256 + 2   # the ring really wrapped
    errs = [rel_err(a, b) for a, b in zip(rows, ref.logits)]
    assert max(errs) <= REL_TOL, errs
    r.close()


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_decode_across_kv_growth(root: Path, tmp_path: Path, arch: str) -> None:
    """Decoding past 256 cells rebuilds the graph with n_kv = 512 (gemma3's SWA ring wraps meanwhile)."""
    path = model_path(root, arch, "f32")  # no 8-bit activation flips: plain float agreement expected
    prompt = np.random.default_rng(2).integers(10, 500, 250).tolist()
    ref = run_master(path, tmp_path / "ref", prompt_ids=prompt, n_predict=12, flash_attn="on", n_ctx=512)
    r = load(path, n_ctx=512, n_ubatch=128)
    rows = [r.decode(prompt)[0]] + [r.decode([t])[0] for t in ref.fed]
    assert r.n_past == 261 and r.kv.caches[0].n_kv() == 512
    errs = [rel_err(a, b) for a, b in zip(rows, ref.logits)]
    assert max(errs) <= REL_TOL, errs  # the F16-accumulator FA is replayed as ggml runs it
    assert [int(a.argmax()) for a in rows] == ref.tokens
    r.close()
