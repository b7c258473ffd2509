"""Entry point of the numba matmul for the op builders.

    bind = get_matmul(GGMLType.Q8_0, GGMLType.F32)   # None if no fast kernel for the pair
    run = bind(abuf, nb01, M, K, goff, gcols, colb, colo, bbuf, boff, out)
    run()

abuf/bbuf are uint8 buffers; goff (per group), boff (per activation row) byte offsets; out a float32
buffer view with colo element offsets (kernels.py describes the work layout). get_matmul returns a binder:
binding precomputes the work split, and the bound call only converts the activations and runs.

Each weight type has one small cached jitted entry (`_q4_0`, ...) that binds the literal format, so a
type costs one specialization (~1-3 s to compile once, then loaded from numba's cache). threads.py runs
those entries on several threads.
"""
from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np
from numba import njit

from ...ggml.types import GGMLType
from .actquant import convert_float, quantize_q8_0, quantize_q8_k
from .decode import OFFSET
from .kernels import f_drain, k_drain, q32_drain
from .threads import get_num_threads, run_items

# Arguments of every entry: post, counter, nitems, nch, rows, abuf, nb01, M, K, goff, gcols, gmode, colb, colo,
# <activation arrays>, out. The literal first argument of a drain selects the decoder at compile time.


@njit(cache=True, nogil=True)
def _q4_0(p, c, n, nch, rows, a, nb01, M, K, go, gc, gm, cb, co, b8, bd, bx, yc, dy, out):
    q32_drain(2, p, c, n, nch, rows, a, nb01, M, K, go, gc, gm, cb, co, b8, bd, bx, yc, dy, out)


@njit(cache=True, nogil=True)
def _q4_1(p, c, n, nch, rows, a, nb01, M, K, go, gc, gm, cb, co, b8, bd, bx, yc, dy, out):
    q32_drain(3, p, c, n, nch, rows, a, nb01, M, K, go, gc, gm, cb, co, b8, bd, bx, yc, dy, out)


@njit(cache=True, nogil=True)
def _q5_0(p, c, n, nch, rows, a, nb01, M, K, go, gc, gm, cb, co, b8, bd, bx, yc, dy, out):
    q32_drain(6, p, c, n, nch, rows, a, nb01, M, K, go, gc, gm, cb, co, b8, bd, bx, yc, dy, out)


@njit(cache=True, nogil=True)
def _q5_1(p, c, n, nch, rows, a, nb01, M, K, go, gc, gm, cb, co, b8, bd, bx, yc, dy, out):
    q32_drain(7, p, c, n, nch, rows, a, nb01, M, K, go, gc, gm, cb, co, b8, bd, bx, yc, dy, out)


@njit(cache=True, nogil=True)
def _q8_0(p, c, n, nch, rows, a, nb01, M, K, go, gc, gm, cb, co, b8, bd, bx, yc, dy, out):
    q32_drain(8, p, c, n, nch, rows, a, nb01, M, K, go, gc, gm, cb, co, b8, bd, bx, yc, dy, out)


@njit(cache=True, nogil=True)
def _iq4_nl(p, c, n, nch, rows, a, nb01, M, K, go, gc, gm, cb, co, b8, bd, bx, yc, dy, out):
    q32_drain(20, p, c, n, nch, rows, a, nb01, M, K, go, gc, gm, cb, co, b8, bd, bx, yc, dy, out)


@njit(cache=True, nogil=True)
def _mxfp4(p, c, n, nch, rows, a, nb01, M, K, go, gc, gm, cb, co, b8, bd, bx, yc, dy, out):
    q32_drain(39, p, c, n, nch, rows, a, nb01, M, K, go, gc, gm, cb, co, b8, bd, bx, yc, dy, out)


@njit(cache=True, nogil=True)
def _q2_k(p, c, n, nch, rows, a, nb01, M, K, go, gc, gm, cb, co, b8, bd, bx, out):
    k_drain(10, p, c, n, nch, rows, a, nb01, M, K, go, gc, gm, cb, co, b8, bd, bx, out)


@njit(cache=True, nogil=True)
def _q3_k(p, c, n, nch, rows, a, nb01, M, K, go, gc, gm, cb, co, b8, bd, bx, out):
    k_drain(11, p, c, n, nch, rows, a, nb01, M, K, go, gc, gm, cb, co, b8, bd, bx, out)


@njit(cache=True, nogil=True)
def _q4_k(p, c, n, nch, rows, a, nb01, M, K, go, gc, gm, cb, co, b8, bd, bx, out):
    k_drain(12, p, c, n, nch, rows, a, nb01, M, K, go, gc, gm, cb, co, b8, bd, bx, out)


@njit(cache=True, nogil=True)
def _q5_k(p, c, n, nch, rows, a, nb01, M, K, go, gc, gm, cb, co, b8, bd, bx, out):
    k_drain(13, p, c, n, nch, rows, a, nb01, M, K, go, gc, gm, cb, co, b8, bd, bx, out)


@njit(cache=True, nogil=True)
def _q6_k(p, c, n, nch, rows, a, nb01, M, K, go, gc, gm, cb, co, b8, bd, bx, out):
    k_drain(14, p, c, n, nch, rows, a, nb01, M, K, go, gc, gm, cb, co, b8, bd, bx, out)


@njit(cache=True, nogil=True)
def _iq4_xs(p, c, n, nch, rows, a, nb01, M, K, go, gc, gm, cb, co, b8, bd, bx, out):
    k_drain(23, p, c, n, nch, rows, a, nb01, M, K, go, gc, gm, cb, co, b8, bd, bx, out)


@njit(cache=True, nogil=True)
def _f32(p, c, n, nch, rows, a, nb01, M, K, go, gc, gm, cb, co, bf, out):
    f_drain(0, p, c, n, nch, rows, a, nb01, M, K, go, gc, gm, cb, co, bf, out)


@njit(cache=True, nogil=True)
def _f16(p, c, n, nch, rows, a, nb01, M, K, go, gc, gm, cb, co, bf, out):
    f_drain(1, p, c, n, nch, rows, a, nb01, M, K, go, gc, gm, cb, co, bf, out)


@njit(cache=True, nogil=True)
def _bf16(p, c, n, nch, rows, a, nb01, M, K, go, gc, gm, cb, co, bf, out):
    f_drain(30, p, c, n, nch, rows, a, nb01, M, K, go, gc, gm, cb, co, bf, out)


T = GGMLType
_Q8_0_FAMILY: dict[int, Callable[..., None]] = {
    T.Q4_0: _q4_0, T.Q4_1: _q4_1, T.Q5_0: _q5_0, T.Q5_1: _q5_1, T.Q8_0: _q8_0, T.IQ4_NL: _iq4_nl,
    T.MXFP4: _mxfp4}
_Q8_K_FAMILY: dict[int, Callable[..., None]] = {
    T.Q2_K: _q2_k, T.Q3_K: _q3_k, T.Q4_K: _q4_k, T.Q5_K: _q5_k, T.Q6_K: _q6_k, T.IQ4_XS: _iq4_xs}
_FLOAT_FAMILY: dict[int, Callable[..., None]] = {T.F32: _f32, T.F16: _f16, T.BF16: _bf16}
# activation types each float weight type accepts (ggml: its vec_dot type, or F16/BF16 widened for F32)
_FLOAT_B: dict[int, tuple[int, ...]] = {T.F32: (T.F32, T.F16, T.BF16), T.F16: (T.F32, T.F16),
                                         T.BF16: (T.F32, T.BF16)}
FAST_TYPES = frozenset(_Q8_0_FAMILY) | frozenset(_Q8_K_FAMILY) | frozenset(_FLOAT_FAMILY)


class _Scratch(threading.local):
    """Per-thread work arrays for converted activations, reused by every node (they grow, never shrink).
    Views for a (family, C, K) are cached until an array is reallocated."""

    def __init__(self) -> None:
        self.arrays: dict[str, np.ndarray] = {}
        self.views: dict[tuple, tuple[np.ndarray, ...]] = {}
        self.counter = np.zeros(2, np.int64)

    def array(self, name: str, dtype: type, n: int) -> np.ndarray:
        arr = self.arrays.get(name)
        if arr is None or arr.size < n:
            arr = self.arrays[name] = np.empty(max(n, 1024), dtype)
            self.views.clear()
        return arr[:n]

    def activation_views(self, family: str, C: int, K: int) -> tuple[np.ndarray, ...]:
        key = (family, C, K)
        views = self.views.get(key)
        if views is None:
            views = self._make(family, C, K)
            self.views[key] = views
        return views

    def _make(self, family: str, C: int, K: int) -> tuple[np.ndarray, ...]:
        if family == "f":
            return (self.array("bf", np.float32, C * K),)
        nblk = K // (256 if family == "k" else 32)
        bq8 = self.array("bq8", np.int8, C * K)
        bd = self.array("bd", np.float32, C * nblk).reshape(C, nblk)
        if family == "k":
            return bq8, bd, self.array("bsum", np.int16, C * K // 16)
        return (bq8, bd, self.array("bs", np.float32, C * nblk).reshape(C, nblk),
                self.array("ycorr", np.int32, C * nblk * 8), self.array("dyv", np.float32, C * nblk * 8))


_scratch = _Scratch()


def _layout(M: int, groups: int) -> tuple[int, int, int]:
    """(nitems, row chunks per group, rows per chunk): chunks of >= 16 rows, ~8 items per thread."""
    per_group = max(1, (8 * get_num_threads() + groups - 1) // groups)
    rows = max(16, (M + per_group - 1) // per_group)
    nch = (M + rows - 1) // rows
    return groups * nch, nch, rows


Binder = Callable[..., Callable[[], None]]


def get_matmul(atype: int, btype: int) -> Binder | None:
    """The fast matmul for weight type `atype` and activation storage type `btype`, or None.

    The result binds a product once and returns the zero-argument call that computes it:
        run = get_matmul(a, b)(abuf, nb01, M, K, goff, gcols, gmode, colb, colo, bbuf, boff, out); run()
    gmode: per group, the code path ggml takes (`mul_mat_mode`), whose float order the kernels replay.
    """
    if atype in _Q8_0_FAMILY or atype in _Q8_K_FAMILY:
        return _binder(atype, btype, "k" if atype in _Q8_K_FAMILY else "q32") if btype == T.F32 else None
    if atype in _FLOAT_FAMILY and btype in _FLOAT_B[atype]:
        return _binder(atype, btype, "f")
    return None


def mul_mat_mode(atype: int, btype: int, n: int, M: int, src1_contiguous: bool) -> int:
    """The code path ggml's CPU backend (x86, AVX2 build) takes for a MUL_MAT with n activation rows per
    2-D slice, as the kernels' mode (kernels.py): K-quants use the tiled kernel from 8 rows, IQ4_NL
    llamafile's sgemm from 2 (else its two-accumulator vec_dot; MXFP4 always that), float weights sgemm
    from 2 rows when M % 4 == 0 and its source is contiguous (a converted one always is)."""
    if atype in _Q8_K_FAMILY:
        return int(n >= 8)
    if atype == T.MXFP4:
        return 1
    if atype == T.IQ4_NL:
        return int(n < 2)
    if atype in _Q8_0_FAMILY:
        return 0
    return int(n >= 2 and M % 4 == 0 and (src1_contiguous or btype != atype))


def mul_mat_id_mode(atype: int, rows: int) -> int:
    """As mul_mat_mode for one expert of a MUL_MAT_ID with `rows` routed activation rows (vec_dot, or the
    tiled kernel for K-quants from 8 rows)."""
    if atype in _Q8_K_FAMILY:
        return int(rows >= 8)
    return int(atype in (T.MXFP4, T.IQ4_NL))


def _binder(atype: int, btype: int, family: str) -> Binder:
    families: dict[str, dict[int, Callable[..., None]]] = {"k": _Q8_K_FAMILY, "q32": _Q8_0_FAMILY,
                                                            "f": _FLOAT_FAMILY}
    entry = families[family][atype]

    def bind(abuf: np.ndarray, nb01: int, M: int, K: int, goff: np.ndarray, gcols: np.ndarray,
             gmode: np.ndarray, colb: np.ndarray, colo: np.ndarray, bbuf: np.ndarray, boff: np.ndarray,
             out: np.ndarray) -> Callable[[], None]:
        C = boff.shape[0]
        nitems, nch, rows = _layout(M, gcols.shape[0] - 1)
        head = (nch, rows, abuf, nb01, M, K, goff, gcols, gmode, colb, colo)
        macs = M * K * colb.shape[0]
        fa, fb = int(atype), int(btype)
        offset = OFFSET.get(fa, 0)

        def run() -> None:
            ws = _scratch.activation_views(family, C, K)
            if family == "q32":
                quantize_q8_0(bbuf, boff, K, offset, *ws)
            elif family == "k":
                quantize_q8_k(bbuf, boff, K, *ws)
            else:
                convert_float(fa, fb, bbuf, boff, K, *ws)
            run_items(entry, nitems, macs, head + ws + (out,), _scratch.counter)
        return run
    return bind
