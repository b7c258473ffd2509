"""The numba activation converters produce exactly the bytes of ggml's CPU `from_float` (the peer's
libggml-cpu, x86 AVX2 build) and of hybridllm.quants."""
from __future__ import annotations

import ctypes

import numpy as np
import pytest

from hybridllm.backends.cpu_kernels.actquant import (
    convert_float,
    quantize_q8_0,
    quantize_q8_k,
)
from hybridllm.ggml.types import GGMLType as T
from hybridllm.ggml.types import row_size
from hybridllm.quants import quantize
from hybridllm.testing.ggml_ref import ggml_libs


class _TraitsCpu(ctypes.Structure):
    _fields_ = [("from_float", ctypes.c_void_p), ("vec_dot", ctypes.c_void_p), ("vec_dot_type", ctypes.c_int),
                ("nrows", ctypes.c_int64)]


_FROM_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


def ggml_from_float(x: np.ndarray, vtype: int) -> np.ndarray:
    """Rows of x converted by ggml's CPU type traits `from_float` of `vtype`."""
    _, cpu = ggml_libs()
    cpu.ggml_cpu_init()
    cpu.ggml_get_type_traits_cpu.restype = ctypes.POINTER(_TraitsCpu)
    fn = _FROM_FLOAT(cpu.ggml_get_type_traits_cpu(int(vtype)).contents.from_float)
    x = np.ascontiguousarray(x, np.float32)
    out = np.zeros((x.shape[0], row_size(vtype, x.shape[1])), np.uint8)
    for i in range(x.shape[0]):
        fn(x[i].ctypes.data, out[i].ctypes.data, x.shape[1])
    return out


def activation_rows(rng: np.random.Generator, K: int) -> np.ndarray:
    """Random rows plus the edge cases: zeros, round-half ties, one non-zero, huge and tiny scales."""
    rows = [rng.standard_normal(K) * 10.0 ** rng.uniform(-3, 3) for _ in range(6)]
    rows.append(np.zeros(K))
    ties = np.resize(np.array([127.0, 2.5, -3.5, 0.5, -0.5, 1.5, 126.5, -126.5]), K)
    rows.append(ties)                            # Q8_0: id = 1, x*id exact .5 ties
    rows.append(-ties)                           # Q8_K: max = -127 -> iscale = 1
    one = np.zeros(K)
    one[K // 3] = -1e-3
    rows.append(one)
    rows.append(rng.standard_normal(K) * 1e-30)  # F16 scale underflows to 0
    rows.append(rng.standard_normal(K) * 1e6)    # F16 scale overflows to inf
    return np.array(rows, np.float32)


def _run_q8(x: np.ndarray, k_family: bool) -> tuple[np.ndarray, ...]:
    C, K = x.shape
    boff = np.arange(C, dtype=np.int64) * K * 4
    bq = np.zeros(C * K, np.int8)
    if k_family:
        bd, extra = np.zeros((C, K // 256), np.float32), np.zeros(C * K // 16, np.int16)
        quantize_q8_k(x.view(np.uint8).reshape(-1), boff, K, bq, bd, extra)
        extra = extra.reshape(C, K // 16)
    else:
        nblk = K // 32
        bd, extra = np.zeros((C, nblk), np.float32), np.zeros((C, nblk), np.float32)
        ycorr, dyv = np.zeros(C * nblk * 8, np.int32), np.zeros(C * nblk * 8, np.float32)
        quantize_q8_0(x.view(np.uint8).reshape(-1), boff, K, 16, bq, bd, extra, ycorr, dyv)
        # what the byte kernels read besides q: -16 * sums of 4 q, and d repeated per lane
        np.testing.assert_array_equal(ycorr, -16 * bq.astype(np.int32).reshape(-1, 4).sum(-1))
        np.testing.assert_array_equal(dyv.reshape(C, nblk, 8), np.repeat(bd[..., None], 8, axis=-1))
    return bq.reshape(C, K), bd, extra


def _pack_q8_0(q: np.ndarray, d: np.ndarray, s: np.ndarray | None) -> np.ndarray:
    C, K = q.shape
    parts = [d.astype(np.float16)[..., None].view(np.uint8)]
    if s is not None:
        parts.append(s.astype(np.float16)[..., None].view(np.uint8))
    parts.append(q.astype(np.int8).reshape(C, K // 32, 32).view(np.uint8))
    return np.concatenate(parts, axis=-1).reshape(C, -1)


def _pack_q8_k(q: np.ndarray, d: np.ndarray, bsum: np.ndarray) -> np.ndarray:
    C, K = q.shape
    nsb = K // 256
    return np.concatenate([d[..., None].view(np.uint8), q.astype(np.int8).reshape(C, nsb, 256).view(np.uint8),
                           bsum.astype(np.int16).reshape(C, nsb, 16).view(np.uint8)], axis=-1).reshape(C, -1)


@pytest.mark.parametrize("vtype", [T.Q8_0, T.Q8_1])
def test_q8_0_and_q8_1_bytes_match_ggml(vtype: int) -> None:
    x = activation_rows(np.random.default_rng(1), 256)
    q, d, s = _run_q8(x, k_family=False)
    ours = _pack_q8_0(q, d, s if vtype == T.Q8_1 else None)
    np.testing.assert_array_equal(ours, ggml_from_float(x, vtype))
    np.testing.assert_array_equal(ours, quantize(x, vtype))


def test_q8_k_bytes_match_ggml() -> None:
    x = activation_rows(np.random.default_rng(2), 512)
    ours = _pack_q8_k(*_run_q8(x, k_family=True))
    # (ggml leaves the bsums of an all-zero super-block unwritten: zeros here, as the output starts zeroed)
    np.testing.assert_array_equal(ours, ggml_from_float(x, T.Q8_K))
    np.testing.assert_array_equal(ours, quantize(x, T.Q8_K))


@pytest.mark.parametrize("atype,vtype", [(T.F16, T.F16), (T.BF16, T.BF16)])
def test_float_rounding_matches_ggml(atype: int, vtype: int) -> None:
    rng = np.random.default_rng(3)
    x = np.concatenate([activation_rows(rng, 64).reshape(-1),
                        np.array([np.nan, np.inf, -np.inf, 65520.0, 6e-8, 1 + 2 ** -11, 1 + 3 * 2 ** -11],
                                 np.float32)]).astype(np.float32)[None]
    bf = np.zeros(x.size, np.float32)
    convert_float(int(atype), int(T.F32), x.view(np.uint8).reshape(-1), np.zeros(1, np.int64), x.size, bf)
    ours = bf.astype(np.float16) if vtype == T.F16 else (bf.view(np.uint32) >> 16).astype(np.uint16)
    np.testing.assert_array_equal(ours.view(np.uint8)[None], ggml_from_float(x, vtype))
