"""The peer's own ggml quantization routines over ctypes: the ground truth our numpy code must match.

`to_float(qtype)` is ggml-base's `dequantize_row_*` (what GET_ROWS/CPY use) and `from_float(qtype)` is
ggml-cpu's `quantize_row_*` as exported by the peer wheel's libggml-cpu (x86 AVX2 build), i.e. what the
real CPU backend runs on MUL_MAT activations and CPY/SET_ROWS into quantized caches.
"""
from __future__ import annotations

import ctypes
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np

from hybridllm.ggml.types import GGMLType, TRAITS, row_size
from hybridllm.testing.peer import load_peer

_TO_FLOAT = {
    GGMLType.F16: "ggml_fp16_to_fp32_row", GGMLType.BF16: "ggml_bf16_to_fp32_row",
    GGMLType.Q4_0: "dequantize_row_q4_0", GGMLType.Q4_1: "dequantize_row_q4_1",
    GGMLType.Q5_0: "dequantize_row_q5_0", GGMLType.Q5_1: "dequantize_row_q5_1",
    GGMLType.Q8_0: "dequantize_row_q8_0", GGMLType.Q8_K: "dequantize_row_q8_K",
    GGMLType.Q2_K: "dequantize_row_q2_K", GGMLType.Q3_K: "dequantize_row_q3_K",
    GGMLType.Q4_K: "dequantize_row_q4_K", GGMLType.Q5_K: "dequantize_row_q5_K",
    GGMLType.Q6_K: "dequantize_row_q6_K", GGMLType.IQ4_NL: "dequantize_row_iq4_nl",
    GGMLType.IQ4_XS: "dequantize_row_iq4_xs", GGMLType.MXFP4: "dequantize_row_mxfp4",
    GGMLType.NVFP4: "dequantize_row_nvfp4", GGMLType.Q1_0: "dequantize_row_q1_0",
    GGMLType.Q2_0: "dequantize_row_q2_0", GGMLType.TQ1_0: "dequantize_row_tq1_0",
    GGMLType.TQ2_0: "dequantize_row_tq2_0", GGMLType.IQ2_XXS: "dequantize_row_iq2_xxs",
    GGMLType.IQ2_XS: "dequantize_row_iq2_xs", GGMLType.IQ2_S: "dequantize_row_iq2_s",
    GGMLType.IQ3_XXS: "dequantize_row_iq3_xxs", GGMLType.IQ3_S: "dequantize_row_iq3_s",
    GGMLType.IQ1_S: "dequantize_row_iq1_s", GGMLType.IQ1_M: "dequantize_row_iq1_m",
}
_FROM_FLOAT = {
    GGMLType.F16: "ggml_cpu_fp32_to_fp16", GGMLType.BF16: "ggml_cpu_fp32_to_bf16",
    GGMLType.Q4_0: "quantize_row_q4_0", GGMLType.Q4_1: "quantize_row_q4_1",
    GGMLType.Q5_0: "quantize_row_q5_0", GGMLType.Q5_1: "quantize_row_q5_1",
    GGMLType.Q8_0: "quantize_row_q8_0", GGMLType.Q8_1: "quantize_row_q8_1",
    GGMLType.Q8_K: "quantize_row_q8_K", GGMLType.IQ4_NL: "quantize_row_iq4_nl",
    GGMLType.IQ4_XS: "quantize_row_iq4_xs", GGMLType.MXFP4: "quantize_row_mxfp4",
    GGMLType.NVFP4: "quantize_row_nvfp4", GGMLType.Q1_0: "quantize_row_q1_0",
    GGMLType.Q2_0: "quantize_row_q2_0", GGMLType.TQ1_0: "quantize_row_tq1_0",
    GGMLType.TQ2_0: "quantize_row_tq2_0",
}
_REF_FROM_FLOAT = {GGMLType.Q8_0: "quantize_row_q8_0_ref", GGMLType.Q8_1: "quantize_row_q8_1_ref"}


@lru_cache(maxsize=None)
def _libs() -> tuple[ctypes.CDLL, ctypes.CDLL]:
    pkg_dir = Path(load_peer().__file__).parent
    base = ctypes.CDLL(str(pkg_dir / "libggml-base.so.0"))
    cpu = ctypes.CDLL(str(pkg_dir / "libggml-cpu.so.0"))
    cpu.ggml_cpu_init()  # fills the fp16 tables some CPU paths use
    return base, cpu


def _fn(lib: ctypes.CDLL, name: str) -> Callable[..., None]:
    f = getattr(lib, name)
    f.restype = None
    f.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    return f


def to_float(raw: np.ndarray, qtype: int, n: int) -> np.ndarray:
    """ggml's dequantization of uint8 rows [rows, row_bytes] -> float32 [rows, n]."""
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    out = np.empty((raw.shape[0], n), np.float32)
    f = _fn(_libs()[0], _TO_FLOAT[qtype])
    f(raw.ctypes.data, out.ctypes.data, out.size)
    return out


def from_float(x: np.ndarray, qtype: int, ref: bool = False) -> np.ndarray:
    """ggml-cpu's from_float (or, with ref, ggml-base's *_ref) on float32 rows -> uint8 rows.

    The output starts zeroed: ggml leaves Q8_K bsums of all-zero blocks unwritten.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.zeros((x.shape[0], row_size(qtype, x.shape[1])), np.uint8)
    lib, name = (_libs()[0], _REF_FROM_FLOAT[qtype]) if ref else (_libs()[1], _FROM_FLOAT[qtype])
    _fn(lib, name)(x.ctypes.data, out.ctypes.data, x.size)
    return out


class _TraitsCPU(ctypes.Structure):
    _fields_ = [("from_float", ctypes.c_void_p), ("vec_dot", ctypes.c_void_p),
                ("vec_dot_type", ctypes.c_int), ("nrows", ctypes.c_int64)]


def cpu_vec_dot(qtype: int) -> tuple[bool, int]:
    """(has a vec_dot, vec_dot_type) from ggml-cpu's `ggml_get_type_traits_cpu`."""
    f = _libs()[1].ggml_get_type_traits_cpu
    f.restype = ctypes.POINTER(_TraitsCPU)
    f.argtypes = [ctypes.c_int]
    tr = f(qtype).contents
    return bool(tr.vec_dot), int(tr.vec_dot_type)


TO_FLOAT_TYPES = frozenset(int(t) for t in _TO_FLOAT)
FROM_FLOAT_TYPES = frozenset(int(t) for t in _FROM_FLOAT)
assert all(TRAITS[t] for t in TO_FLOAT_TYPES)
