"""Random valid ggml weight blocks and tensor placement helpers for the matmul tests."""
from __future__ import annotations

import numpy as np

from hybridllm.backends.numpy_backend import NumpyBuffer
from hybridllm.ggml.tensor import Tensor
from hybridllm.ggml.types import TRAITS, row_size
from hybridllm.ggml.types import GGMLType as T

# byte offsets of the F16 scale fields in each block (the rest of a block is any bit pattern)
F16_FIELDS: dict[int, tuple[int, ...]] = {
    T.Q4_0: (0,), T.Q4_1: (0, 2), T.Q5_0: (0,), T.Q5_1: (0, 2), T.Q8_0: (0,), T.IQ4_NL: (0,),
    T.Q2_K: (80, 82), T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,), T.IQ4_XS: (0,),
}
QUANT_TYPES = (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.IQ4_NL, T.MXFP4,
               T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.IQ4_XS)
FLOAT_TYPES = (T.F32, T.F16, T.BF16)
ALL_TYPES = QUANT_TYPES + FLOAT_TYPES


def random_rows(rng: np.random.Generator, qtype: int, shape: tuple[int, ...], K: int) -> np.ndarray:
    """uint8 rows (*shape, row_bytes) of type qtype: random bits with sane scales (|d| <= 2**-4)."""
    if qtype == T.F32:
        return rng.standard_normal((*shape, K)).astype(np.float32).view(np.uint8)
    if qtype == T.F16:
        return rng.standard_normal((*shape, K)).astype(np.float16).view(np.uint8)
    if qtype == T.BF16:
        x = rng.standard_normal((*shape, K)).astype(np.float32)
        return (x.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    tr = TRAITS[qtype]
    raw = rng.integers(0, 256, (*shape, row_size(qtype, K)), dtype=np.uint8)
    blocks = raw.reshape(*shape, K // tr.blck_size, tr.type_size)
    if qtype == T.MXFP4:
        blocks[..., 0] = rng.integers(118, 128, blocks.shape[:-1])  # 2**-10 .. 2**-1
        return raw
    if qtype == T.NVFP4:
        blocks[..., :4] = rng.integers(0x20, 0x50, (*blocks.shape[:-1], 4))  # UE4M3 2**-3 .. 2**2
        return raw
    for off in F16_FIELDS[qtype]:
        d = (rng.uniform(-1, 1, blocks.shape[:-1]) * 2.0 ** rng.integers(-12, -4, blocks.shape[:-1]))
        blocks[..., off:off + 2] = d.astype(np.float16)[..., None].view(np.uint8)
    return raw


def place(buf: NumpyBuffer, offset: int, ttype: int, ne: tuple[int, ...], data: np.ndarray | None = None,
          nb: tuple[int, ...] | None = None, name: str = "") -> Tensor:
    """A tensor at `offset` of `buf` (default strides unless nb given), optionally filled with raw bytes
    laid out densely (data: uint8 or any array viewed as bytes in ggml order)."""
    t = Tensor(ttype, ne, nb, buffer=buf, offset=offset, name=name)
    if data is not None:
        raw = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
        buf.array[offset:offset + raw.size] = raw
    return t


def new_buffer(size: int) -> NumpyBuffer:
    buf = NumpyBuffer(None, size, 1 << 32)  # type: ignore[arg-type]
    buf.array[:] = 0xA5  # garbage where nothing is written
    return buf
