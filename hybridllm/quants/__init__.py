"""ggml tensor formats in numpy: dequantize rows of blocks to float32, quantize float32 rows to blocks.

    from hybridllm.quants import dequantize, quantize, QUANTIZE_TYPES, DEQUANTIZE_TYPES, vec_dot_type
    w = dequantize(raw, GGMLType.Q4_K, n)     # uint8 [..., row_bytes] -> float32 [..., n]
    q = quantize(x, GGMLType.Q8_0)            # float32 [..., n]      -> uint8 [..., row_bytes]

Everything is bit-exact with the peer's ggml (llama.cpp b11739, x86-64 AVX2 build of ggml-cpu):
* `dequantize` = ggml-base `dequantize_row_*` (the `to_float` GET_ROWS and CPY use), for F32, F16, BF16,
  Q4_0..Q8_1, Q2_K..Q8_K, IQ4_NL, IQ4_XS, MXFP4, NVFP4, Q1_0, Q2_0, TQ1_0, TQ2_0 and the codebook
  I-quants IQ1_S/M, IQ2_XXS/XS/S, IQ3_XXS/S.
* `quantize` = ggml-cpu's `from_float` of the type (what MUL_MAT runs on activations, and what CPY /
  SET_ROWS run into quantized caches): the AVX2 Q8_0/Q8_1 quantizers (round half to even, id =
  127/amax), the reference quantizers of Q8_K, Q4_0, Q4_1, Q5_0, Q5_1, IQ4_NL, MXFP4, NVFP4, Q1_0,
  Q2_0, TQ1_0, TQ2_0, F16 round-to-nearest-even and ggml's BF16. Not available: the search-based
  K-quant, IQ4_XS and codebook quantizers (no inference graph produces them; `blocks.encode` has
  simple encoders for tests). `legacy.quantize_q8_0_ref` is the portable Q8_0 reference (roundf)
  that model files are written with.
Work is chunked so that temporaries stay cache-sized and peak memory stays near the output's size.
"""
from __future__ import annotations

import numpy as np

from ..ggml.types import GGMLType, TRAITS, row_size, type_name
from ._common import DequantFn, QuantFn
from .iqgrid import IQGRID_DEQUANT
from .iquants import IQUANT_DEQUANT, IQUANT_QUANT
from .kquants import KQUANT_DEQUANT, KQUANT_QUANT
from .legacy import LEGACY_DEQUANT, LEGACY_QUANT
from .lowbit import LOWBIT_DEQUANT, LOWBIT_QUANT
from .plain import PLAIN_DEQUANT, PLAIN_QUANT

__all__ = ["dequantize", "quantize", "QUANTIZE_TYPES", "DEQUANTIZE_TYPES", "vec_dot_type"]

_BLOCK_DEQUANT: dict[int, DequantFn] = {**LEGACY_DEQUANT, **KQUANT_DEQUANT, **IQUANT_DEQUANT, **LOWBIT_DEQUANT,
                                        **IQGRID_DEQUANT}
_BLOCK_QUANT: dict[int, QuantFn] = {**LEGACY_QUANT, **KQUANT_QUANT, **IQUANT_QUANT, **LOWBIT_QUANT}

DEQUANTIZE_TYPES: frozenset[int] = frozenset(int(t) for t in {**PLAIN_DEQUANT, **_BLOCK_DEQUANT})
QUANTIZE_TYPES: frozenset[int] = frozenset(int(t) for t in {**PLAIN_QUANT, **_BLOCK_QUANT})

_CHUNK_ELEMS = 1 << 16   # elements per chunk: float32 temporaries of 256 KiB stay in L2

_VEC_DOT_Q8_0 = {GGMLType.Q4_0, GGMLType.Q5_0, GGMLType.Q8_0, GGMLType.IQ4_NL, GGMLType.MXFP4,
                 GGMLType.NVFP4, GGMLType.Q1_0, GGMLType.Q2_0}
_VEC_DOT_Q8_1 = {GGMLType.Q4_1, GGMLType.Q5_1, GGMLType.Q8_1}
_VEC_DOT_Q8_K = {GGMLType.Q2_K, GGMLType.Q3_K, GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K,
                 GGMLType.IQ2_XXS, GGMLType.IQ2_XS, GGMLType.IQ2_S, GGMLType.IQ3_XXS, GGMLType.IQ3_S,
                 GGMLType.IQ1_S, GGMLType.IQ1_M, GGMLType.IQ4_XS, GGMLType.TQ1_0, GGMLType.TQ2_0}


def vec_dot_type(qtype: int) -> int:
    """The type ggml's CPU backend converts MUL_MAT's src1 to for weight type `qtype` (ggml-rpc.md §12.7)."""
    if qtype in (GGMLType.F32, GGMLType.F16, GGMLType.BF16):
        return int(qtype)
    if qtype in _VEC_DOT_Q8_0:
        return int(GGMLType.Q8_0)
    if qtype in _VEC_DOT_Q8_1:
        return int(GGMLType.Q8_1)
    if qtype in _VEC_DOT_Q8_K:
        return int(GGMLType.Q8_K)
    raise ValueError(f"type {type_name(qtype)} has no CPU vec_dot type")


def _rows(a: np.ndarray, width: int) -> np.ndarray:
    """`a` as a C-contiguous 2-D (rows, width) array (a copy only if `a` is not contiguous)."""
    return np.ascontiguousarray(a).reshape(-1, width)


def dequantize(raw: np.ndarray, qtype: int, n: int) -> np.ndarray:
    """Decode uint8 rows [..., row_bytes] of type `qtype` holding n elements each -> float32 [..., n].

    Always returns a new array.
    """
    if qtype not in DEQUANTIZE_TYPES:
        raise ValueError(f"dequantize: type {type_name(qtype)} is not supported")
    raw = np.asarray(raw)
    if raw.dtype != np.uint8:
        raise TypeError(f"dequantize: raw must be uint8, got {raw.dtype}")
    tr = TRAITS[qtype]
    if n % tr.blck_size or raw.ndim == 0 or raw.shape[-1] != row_size(qtype, n):
        raise ValueError(f"dequantize: {type_name(qtype)} rows of {n} elements need "
                         f"{row_size(qtype, n) if n % tr.blck_size == 0 else '?'} bytes, got shape {raw.shape}")
    lead = raw.shape[:-1]
    if raw.size == 0:
        return np.zeros((*lead, n), np.float32)
    if qtype in PLAIN_DEQUANT:
        with np.errstate(all="ignore"):
            return PLAIN_DEQUANT[qtype](_rows(raw, raw.shape[-1])).reshape(*lead, n)
    blocks = _rows(raw, tr.type_size)
    out = np.empty((blocks.shape[0], tr.blck_size), np.float32)
    fn = _BLOCK_DEQUANT[qtype]
    step = max(1, _CHUNK_ELEMS // tr.blck_size)
    with np.errstate(all="ignore"):  # garbage scales (inf/NaN) decode to inf/NaN as in C, silently
        for s in range(0, blocks.shape[0], step):
            out[s:s + step] = fn(blocks[s:s + step])
    return out.reshape(*lead, n)


def quantize(x: np.ndarray, qtype: int) -> np.ndarray:
    """Encode float32 rows [..., n] (n a multiple of the block size) -> uint8 [..., row_bytes]."""
    if qtype not in QUANTIZE_TYPES:
        raise ValueError(f"quantize: type {type_name(qtype)} is not supported")
    x = np.asarray(x, dtype=np.float32)
    tr = TRAITS[qtype]
    if x.ndim == 0 or x.shape[-1] % tr.blck_size:
        raise ValueError(f"quantize: {type_name(qtype)} needs rows that are a multiple of {tr.blck_size} "
                         f"elements, got shape {x.shape}")
    lead, n = x.shape[:-1], x.shape[-1]
    rb = row_size(qtype, n)
    if x.size == 0:
        return np.zeros((*lead, rb), np.uint8)
    if qtype in PLAIN_QUANT:
        with np.errstate(all="ignore"):
            return PLAIN_QUANT[qtype](_rows(x, n)).reshape(*lead, rb)
    blocks = _rows(x, tr.blck_size)
    out = np.empty((blocks.shape[0], tr.type_size), np.uint8)
    fn = _BLOCK_QUANT[qtype]
    step = max(1, _CHUNK_ELEMS // tr.blck_size)
    with np.errstate(all="ignore"):
        for s in range(0, blocks.shape[0], step):
            out[s:s + step] = fn(blocks[s:s + step])
    return out.reshape(*lead, rb)
