"""The kernel variants this host would not pick give the same results as the reference: the portable int16
kernels (no vpmaddubsw) and the AVX2 byte kernels (no VNNI). Each runs in a subprocess with its
HYBRIDLLM_NO_* switch and a numba cache of its own (in pytest's cache dir)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

_SCRIPT = r"""
import numpy as np, sys
sys.path.insert(0, sys.argv[1])
from matmul_blocks import random_rows
from hybridllm.backends.cpu_kernels import get_matmul, mul_mat_mode
from hybridllm.backends.cpu_kernels.simd import HAS_MADDUBS, HAS_VNNI
from hybridllm.backends.numpy_ops.matmul import mul_mat_ref
from hybridllm.ggml.types import GGMLType as T
assert not HAS_VNNI and HAS_MADDUBS == (sys.argv[2] == "HYBRIDLLM_NO_VNNI")
rng = np.random.default_rng(5)
for atype in (T.Q5_0, T.Q8_0, T.Q4_K, T.Q6_K):
    M, K, N = 37, 768, 6
    A = random_rows(rng, atype, (M,), K)
    B = rng.standard_normal((N, K)).astype(np.float32)
    out = np.zeros((N, M), np.float32)
    mode = np.array([mul_mat_mode(atype, T.F32, N, M, True)], np.int64)
    get_matmul(atype, T.F32)(A.reshape(-1), A.shape[-1], M, K, np.zeros(1, np.int64), np.array([0, N]), mode,
                             np.arange(N), np.arange(N) * M, B.view(np.uint8).reshape(-1), np.arange(N) * K * 4,
                             out.reshape(-1))()
    ref = mul_mat_ref(A[None, None], atype, B[None, None])[0, 0]
    err = np.abs(out - ref).max() / np.abs(ref).max()
    assert err < 1e-6, (T(atype).name, err)
print("ok")
"""


@pytest.mark.parametrize("switch", ["HYBRIDLLM_NO_MADDUBS", "HYBRIDLLM_NO_VNNI"])
def test_other_kernel_variants(request: Any, tmp_path: Path, switch: str) -> None:
    store = getattr(request.config, "cache", None)  # pytest's cache dir: compiled once, kept between runs
    cache = store.mkdir(f"hybridllm-numba-{switch.lower()}") if store is not None else tmp_path
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache))
    env[switch] = "1"
    here = Path(__file__).resolve().parent
    res = subprocess.run([sys.executable, "-c", _SCRIPT, str(here), switch], env=env, capture_output=True,
                         text=True, timeout=300, cwd=here.parents[1], check=False)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stdout + res.stderr
