"""Flash attention on and off (FLASH_ATTN_EXT with an F16 mask vs MUL_MAT + SOFT_MAX with an F32 mask),
on a GQA model and on gemma3's alternating sliding-window/global layers, with a prompt longer than the
sliding window (8)."""
from __future__ import annotations

from pathlib import Path

import pytest

from conformance_harness import check, model, prompt_ids, run_pair

CASES = [("qwen3", "q8_0"), ("gemma3", "q4_k")]


@pytest.mark.parametrize("flash_attn", ["on", "off"])
@pytest.mark.parametrize("arch,wtype", CASES, ids=[f"{a}-{t}" for a, t in CASES])
def test_flash_attention(arch: str, wtype: str, flash_attn: str, synth_root: Path, reference, candidate,
                         tmp_path: Path):
    path = model(synth_root, arch, wtype, n_layer=4)
    first = 2 if arch == "gemma3" else None
    ref, cand = run_pair(path, tmp_path, reference, candidate, prompt_ids=prompt_ids(40, seed=3, first=first),
                         n_predict=6, force_tokens=prompt_ids(5, seed=4), flash_attn=flash_attn)
    check(f"{arch}/{wtype} flash_attn={flash_attn}", ref, cand)
