"""The real Gemma 3 270M (Q4_K_M) with all layers on the candidate: 32 greedy tokens identical to
llama.cpp with its own rpc-server, logits within 1e-3 relative error (max|a-b| / max|ref| per step)."""
from __future__ import annotations

from pathlib import Path

from conformance_harness import GEMMA_TIMEOUT, check, run_pair

PROMPT = "Once upon a time, in a small village by the sea,"


def test_gemma3_270m_greedy(gemma_path: Path, reference, candidate, tmp_path: Path):
    ref, cand = run_pair(gemma_path, tmp_path, reference, candidate, prompt=PROMPT, n_predict=32,
                         timeout=GEMMA_TIMEOUT)
    assert len(ref.tokens) == 32
    check("gemma3-270m q4_k_m (32 greedy tokens)", ref, cand, strict_tokens=True)
