"""MUL_MAT on the real Gemma 3 270M Q4_K_M weights (every weight type the model uses: Q8_0, Q5_0, Q4_K,
Q6_K) against real ggml."""
from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest

from hybridllm.ggml.types import GGMLType as T
from hybridllm.testing.ggml_ref import GT, GGMLGraph

TENSORS = [("token_embd.weight", 4096), ("blk.0.attn_q.weight", None), ("blk.0.attn_v.weight", None),
           ("blk.0.attn_output.weight", None), ("blk.0.ffn_down.weight", None), ("blk.2.ffn_down.weight", None),
           ("blk.0.ffn_up.weight", None)]


@pytest.fixture(scope="module")
def weights(gemma_path: Path) -> dict[str, tuple[int, np.ndarray]]:
    from hybridllm.engine.gguf_file import GGUFFile
    f = GGUFFile(gemma_path)
    out = {}
    for name, rows in TENSORS:
        info = f.tensors[name]
        raw = np.asarray(f.tensor_data(name)).reshape(info.ne[1], -1)[:rows]
        out[name] = (int(info.type), np.ascontiguousarray(raw))
    return out


@pytest.mark.parametrize("name", [n for n, _ in TENSORS])
def test_real_weight_matmul_matches_ggml(weights: dict[str, tuple[int, np.ndarray]], name: str) -> None:
    atype, rows = weights[name]
    from hybridllm.ggml.types import TRAITS
    K = rows.shape[1] // TRAITS[atype].type_size * TRAITS[atype].blck_size
    rng = np.random.default_rng(7)
    for N in (1, 5):
        with GGMLGraph(rows.nbytes + (8 << 20)) as g:
            a = g.new(atype, (K, rows.shape[0]))
            g.mem[a.offset:a.offset + rows.size] = rows.reshape(-1)
            acts = (rng.standard_normal((N, K)) * 3).astype(np.float32)
            fn = g.base_lib.ggml_mul_mat
            fn.argtypes, fn.restype = [ctypes.c_void_p] * 3, ctypes.c_void_p
            out = GT(fn(g.ctx, a.ptr, g.new(T.F32, (K, N), acts).ptr), g)
            res = g.run(out)
            ggml, ours = res.ref(out), res.ours(out)
            np.testing.assert_array_equal(ours, ggml, err_msg=f"{name} N={N}")
