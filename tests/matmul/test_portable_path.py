"""The portable int16 kernels (used where vpmaddubsw is missing) give the same results as the reference:
run in a subprocess with HYBRIDLLM_NO_MADDUBS=1 and a numba cache of its own (in pytest's cache dir)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

_SCRIPT = r"""
import numpy as np, sys
sys.path.insert(0, sys.argv[1])
from matmul_blocks import random_rows
from hybridllm.backends.cpu_kernels import get_matmul
from hybridllm.backends.cpu_kernels.simd import HAS_MADDUBS
from hybridllm.backends.numpy_ops.matmul import mul_mat_ref
from hybridllm.ggml.types import GGMLType as T
assert not HAS_MADDUBS
rng = np.random.default_rng(5)
for atype in (T.Q5_0, T.Q8_0, T.Q4_K, T.Q6_K):
    M, K, N = 37, 768, 6
    A = random_rows(rng, atype, (M,), K)
    B = rng.standard_normal((N, K)).astype(np.float32)
    out = np.zeros((N, M), np.float32)
    get_matmul(atype, T.F32)(A.reshape(-1), A.shape[-1], M, K, np.zeros(1, np.int64), np.array([0, N]),
                             np.arange(N), np.arange(N) * M, B.view(np.uint8).reshape(-1), np.arange(N) * K * 4,
                             out.reshape(-1))()
    ref = mul_mat_ref(A[None, None], atype, B[None, None])[0, 0]
    err = np.abs(out - ref).max() / np.abs(ref).max()
    assert err < 1e-6, (T(atype).name, err)
print("ok")
"""


def test_int16_kernels_without_maddubs(request: Any) -> None:
    cache = request.config.cache.mkdir("hybridllm-numba-int16")  # kept between runs: compiled once
    env = dict(os.environ, HYBRIDLLM_NO_MADDUBS="1", NUMBA_CACHE_DIR=str(cache))
    here = Path(__file__).resolve().parent
    res = subprocess.run([sys.executable, "-c", _SCRIPT, str(here)], env=env, capture_output=True, text=True,
                         timeout=300, cwd=here.parents[1], check=False)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stdout + res.stderr
