"""The worker's tensor cache directory (`--cache DIR`), file-compatible with llama.cpp's `rpc-server -c`.

Files are named by the FNV-1a 64-bit hash of their bytes, as 16 lowercase hex digits with no extension
(ggml-rpc.md §8), so a directory filled by the reference server is used as-is and vice versa.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np

FNV_OFFSET = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3
_MASK = (1 << 64) - 1


def _fnv1a_py(data: bytes | bytearray | memoryview) -> int:
    h = FNV_OFFSET
    for b in bytes(data):
        h = ((h ^ b) * FNV_PRIME) & _MASK
    return h


try:  # the hash is a strict byte-serial loop: only a JIT makes 100 MB weights hashable in time
    import numba

    @numba.njit(cache=True, nogil=True)
    def _fnv1a_jit(a: np.ndarray) -> np.uint64:  # pragma: no cover - compiled
        h = np.uint64(FNV_OFFSET)
        p = np.uint64(FNV_PRIME)
        for i in range(a.size):
            h = (h ^ np.uint64(a[i])) * p
        return h
except ImportError:  # pragma: no cover
    _fnv1a_jit = None  # type: ignore[assignment]


def fnv1a_64(data: bytes | bytearray | memoryview) -> int:
    """FNV-1a 64 of `data`, as ggml-rpc's `fnv_hash` computes it."""
    if _fnv1a_jit is None or len(data) < 4096:
        return _fnv1a_py(data)
    return int(_fnv1a_jit(np.frombuffer(data, dtype=np.uint8)))


def cache_name(h: int) -> str:
    return f"{h:016x}"


class TensorCache:
    """Read and write hash-named blobs; writes are atomic (temp file + rename) so readers never see halves."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, h: int) -> Path:
        return self.root / cache_name(h)

    def store(self, data: bytes | bytearray | memoryview) -> int:
        h = fnv1a_64(data)
        final = self.path(h)
        tmp = self.root / f".{final.name}.{os.getpid()}.{threading.get_ident()}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                tmp.unlink()
        return h

    def load(self, h: int) -> bytes | None:
        try:
            return self.path(h).read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            return None
