"""Each synthetic architecture, in weight types covering all 16 supported ones, all layers on the
candidate server: logits match llama.cpp's rpc-server step by step (teacher-forced decode)."""
from __future__ import annotations

from pathlib import Path

import pytest

from conformance_harness import check, model, prompt_ids, run_pair

BOS = {"llama": 1, "gemma3": 2}   # SPM vocabularies start with BOS; the qwen BPE ones do not

CASES = [
    ("llama", "f32"), ("llama", "q8_0"), ("llama", "q4_0"), ("llama", "q4_k"), ("llama", "iq4_xs"),
    ("qwen2", "f16"), ("qwen2", "q5_0"), ("qwen2", "q5_k"), ("qwen2", "q2_k"),
    ("qwen3", "bf16"), ("qwen3", "q4_1"), ("qwen3", "q6_k"), ("qwen3", "q3_k"), ("qwen3", "iq4_nl"),
    ("qwen3moe", "q8_0"), ("qwen3moe", "q4_k"), ("qwen3moe", "mxfp4"), ("qwen3moe", "q5_1"),
    ("gemma3", "q8_0"), ("gemma3", "q6_k"), ("gemma3", "q4_0"), ("gemma3", "bf16"),
]


def test_cases_cover_every_weight_type():
    from hybridllm.testing.synth import ARCHS, WEIGHT_TYPES
    assert {t for _, t in CASES} == set(WEIGHT_TYPES)
    assert {a for a, _ in CASES} == set(ARCHS)


@pytest.mark.parametrize("arch,wtype", CASES, ids=[f"{a}-{t}" for a, t in CASES])
def test_synthetic_model_logits(arch: str, wtype: str, synth_root: Path, reference, candidate,
                                tmp_path: Path):
    path = model(synth_root, arch, wtype)
    ref, cand = run_pair(path, tmp_path, reference, candidate, prompt_ids=prompt_ids(12, first=BOS.get(arch)),
                         n_predict=7, force_tokens=prompt_ids(6, seed=2))
    check(f"{arch}/{wtype}", ref, cand)
