"""numba CPU kernels (matmul): weights stay in their ggml block format, activations are converted to
the weight's vec_dot type exactly as ggml's CPU backend does, and dot products use integer SIMD.

Importing this package compiles nothing; kernels compile on first use (cached on disk by numba).
"""
from __future__ import annotations

from .cache import invalidate_stale_cache

invalidate_stale_cache()

from .api import FAST_TYPES, get_matmul, mul_mat_id_mode, mul_mat_mode
from .threads import get_num_threads, set_num_threads

__all__ = ["FAST_TYPES", "get_matmul", "get_num_threads", "mul_mat_id_mode", "mul_mat_mode", "set_num_threads"]
