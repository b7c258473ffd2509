"""ROPE: rotary position embeddings, modes NORMAL, NEOX, MROPE, IMROPE and VISION (ggml-rpc.md §12.16).

Numerics follow ggml's CPU kernel: the angle of pair k is built by repeated float32 multiplication
(p, p*s, (p*s)*s, ...) exactly as its cache loop does, YaRN ramps and magnitudes are float32, cos/sin are
glibc's cosf/sinf (not correctly rounded: ~1% of angles differ by an ulp from the exact value) and the rotation uses fused multiply-adds like ggml's build. All positions and heads are
rotated in a handful of numpy calls.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple

import numpy as np

from ...ggml.tensor import Tensor
from ...ggml.types import GGMLOp, GGMLType, RopeMode
from . import Kernel, register
from .common import require, view
from .elementwise import f32_source, f32_store, libm, njit_in_place

F32 = np.float32
F64 = np.float64


class RopeParams(NamedTuple):
    n_dims: int
    mode: int
    n_ctx_orig: int
    freq_base: np.float32
    freq_scale: np.float32
    ext_factor: np.float32
    attn_factor: np.float32
    beta_fast: np.float32
    beta_slow: np.float32
    sections: tuple[int, int, int, int]
    n_offs: int

    @classmethod
    def of(cls, node: Tensor) -> RopeParams:
        f = [F32(node.param_f32(i)) for i in range(5, 11)]
        return cls(node.param_i32(1), node.param_i32(2), node.param_i32(4), *f,
                   tuple(node.param_i32(i) for i in range(11, 15)), node.param_i32(15))  # type: ignore[arg-type]


def yarn_corr_dims(n_dims: int, n_ctx_orig: int, base: np.float32, beta_fast: np.float32,
                   beta_slow: np.float32) -> tuple[np.float32, np.float32]:
    """ggml_rope_yarn_corr_dims in float32: the pair range over which YaRN blends."""
    def corr_dim(n_rot: np.float32) -> np.float32:
        ratio = F32(n_ctx_orig) / (n_rot * F32(2) * F32(math.pi))
        return F32(n_dims) * F32(math.log(ratio)) / (F32(2) * F32(math.log(base)))
    start = F32(math.floor(corr_dim(beta_fast)))
    end = F32(math.ceil(corr_dim(beta_slow)))
    return max(F32(0), start), min(F32(n_dims - 1), end)


def pair_plan(p: RopeParams, n_pairs: int) -> tuple[np.ndarray, np.ndarray]:
    """Per pair k: (which position stream t/h/w/e feeds it, how many times its angle was multiplied)."""
    k = np.arange(n_pairs)
    if not p.mode & RopeMode.MROPE:
        return np.zeros(n_pairs, np.intp), k
    s0, s1, s2, s3 = p.sections
    sect = s0 + s1 + s2 + s3
    sector = k % sect
    if p.mode == RopeMode.IMROPE:
        stream = np.where((sector % 3 == 1) & (sector < 3 * s1), 1,
                          np.where((sector % 3 == 2) & (sector < 3 * s2), 2,
                                   np.where((sector % 3 == 0) & (sector < 3 * s0), 0, 3)))
    else:
        stream = np.where(sector < s0, 0, np.where(sector < s0 + s1, 1, np.where(sector < s0 + s1 + s2, 2, 3)))
    if p.mode != RopeMode.VISION:
        return stream, k
    # vision: each section restarts its stream's angle at its first pair
    starts = np.array([0, s0, s0 + s1, s0 + s1 + s2])
    return stream, sector - starts[stream]


def yarn_blend(p: RopeParams, n_pairs: int) -> tuple[np.ndarray | None, np.float32]:
    """(ramp_mix per pair or None without YaRN extrapolation, magnitude scale)."""
    if p.ext_factor == 0:
        return None, p.attn_factor
    lo, hi = yarn_corr_dims(p.n_dims, p.n_ctx_orig, p.freq_base, p.beta_fast, p.beta_slow)
    y = (np.arange(n_pairs, dtype=F32) - lo) / max(F32(0.001), hi - lo)
    ramp = F32(1) - np.minimum(F32(1), np.maximum(F32(0), y))
    mscale = p.attn_factor * (F32(1) + F32(0.1) * F32(math.log(F32(1) / p.freq_scale)))
    return (ramp * p.ext_factor).astype(F32), F32(mscale)


def fma(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    return (a.astype(F64) * b + c).astype(F32)


class _Rope:
    """Precomputed state of one ROPE node."""

    def __init__(self, node: Tensor) -> None:
        src, pos, ff = node.src[0], node.src[1], node.src_at(2)
        assert src is not None and pos is not None
        p = self.p = RopeParams.of(node)
        ne0, _, ne2, _ = src.ne
        vision = p.mode == RopeMode.VISION
        self.n_pairs = p.n_dims if vision else p.n_dims // 2
        self.theta_scale = F32(math.pow(p.freq_base, F32(-2.0) / F32(p.n_dims)))
        self.stream, self.expo = pair_plan(p, self.n_pairs)
        self.n_streams = 4 if p.mode & RopeMode.MROPE else 1
        self.max_expo = int(self.expo.max()) + 1 if self.n_pairs else 1
        self.ramp_mix, self.mscale = yarn_blend(p, self.n_pairs)
        self.pos = view(pos)[0, 0, 0]
        self.ne2 = ne2
        self.ff = view(ff)[0, 0, 0, :self.n_pairs] if ff is not None else None
        self.key = (p, self.n_pairs, ne2)
        # element index ranges of the two halves of every pair (last axis of the (ne3, ne2, ne1, ne0) view)
        o, nd = p.n_offs, p.n_dims
        if p.mode == RopeMode.NORMAL:
            self.i0, self.i1 = slice(o, o + nd, 2), slice(o + 1, o + nd, 2)
        elif vision:
            self.i0, self.i1 = slice(0, nd), slice(nd, 2 * nd)
        else:
            self.i0, self.i1 = slice(o, o + nd // 2), slice(o + nd // 2, o + nd)
        self.keep = [] if vision else [s for s in (slice(0, o), slice(o + nd, ne0)) if s.start < s.stop]

    def cos_sin(self) -> tuple[np.ndarray, np.ndarray]:
        """cos/sin tables (ne2, n_pairs) for the current positions, shared by the nodes of a graph that
        rotate with the same parameters and positions (every layer's Q and K)."""
        key = (self.key, self.pos.tobytes(), None if self.ff is None else self.ff.tobytes())
        hit = _TABLES.get(key)
        if hit is None:
            hit = self._cos_sin()
            if len(_TABLES) >= 64 or sum(c.nbytes * 2 for c, _ in _TABLES.values()) > _TABLES_BYTES:
                _TABLES.clear()
            _TABLES[key] = hit
        return hit

    def _cos_sin(self) -> tuple[np.ndarray, np.ndarray]:
        ne2 = self.ne2
        steps = np.empty((self.n_streams, ne2, self.max_expo), F32)
        steps[..., 1:] = self.theta_scale
        steps[..., 0] = self.pos[:self.n_streams * ne2].reshape(self.n_streams, ne2).astype(F32)
        np.multiply.accumulate(steps, axis=-1, out=steps)    # the same float32 products as ggml's loop
        theta = steps[self.stream, :, self.expo].T if self.n_streams > 1 else steps[0][:, self.expo]
        if self.ff is not None:
            theta = theta / self.ff
        interp = self.p.freq_scale * theta
        if self.ramp_mix is not None:
            theta = fma(interp, F32(1) - self.ramp_mix, theta * self.ramp_mix)   # contracted as in ggml
        else:
            theta = interp
        theta = np.ascontiguousarray(theta, dtype=F32)
        return (np.ascontiguousarray(cos32(theta) * self.mscale),
                np.ascontiguousarray(sin32(theta) * self.mscale))


cos32, sin32 = libm(np.cos), libm(np.sin)   # glibc's cosf/sinf, as ggml's rope_yarn calls them
_TABLES: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
_TABLES_BYTES = 64 << 20   # long prompts make big tables: keep the shared cache bounded


def _rotate(x, y, cos, sin, first, step, partner):  # numba
    """y[.., j] / y[.., j + partner] for j = first + k*step: the pair rotated by angle k of row i2, as
    fma(x0, cos, -(x1*sin)) and fma(x0, sin, x1*cos) (ggml's build contracts these)."""
    n3, n2, n1, _ = x.shape
    n_pairs = cos.shape[1]
    for a in range(n3):
        for b in range(n2):
            for c in range(n1):
                for k in range(n_pairs):
                    j0 = first + k * step
                    x0 = x[a, b, c, j0]
                    x1 = x[a, b, c, j0 + partner]
                    cs, sn = cos[b, k], sin[b, k]
                    y[a, b, c, j0] = np.float32(np.float64(x0) * cs - np.float64(np.float32(x1 * sn)))
                    y[a, b, c, j0 + partner] = np.float32(np.float64(x0) * sn + np.float64(np.float32(x1 * cs)))


@functools.cache
def _rotator() -> Callable[..., None]:
    njit_in_place(globals(), "_rotate")
    return globals()["_rotate"]


@register(GGMLOp.ROPE)
def build_rope(node: Tensor) -> Kernel:
    src, pos, ff = node.src[0], node.src_at(1), node.src_at(2)
    require(src is not None and pos is not None, node, "needs x and positions")
    assert src is not None and pos is not None
    require(src.type in (GGMLType.F32, GGMLType.F16) and node.type == src.type, node, "x must be f32 or f16")
    require(pos.type == GGMLType.I32, node, "positions must be i32")
    require(src.ne == node.ne, node, f"source shape {src.ne} differs from result shape {node.ne}")
    p = RopeParams.of(node)
    require(p.mode in (RopeMode.NORMAL, RopeMode.NEOX, RopeMode.MROPE, RopeMode.IMROPE, RopeMode.VISION),
            node, f"rope mode {p.mode} is not supported")
    ne0, ne2 = src.ne[0], src.ne[2]
    require(p.n_dims > 0 and p.n_dims % 2 == 0 and p.n_offs >= 0 and p.n_offs % 2 == 0
            and p.n_offs + p.n_dims <= ne0, node, f"bad n_dims {p.n_dims} / n_offs {p.n_offs} for ne0 {ne0}")
    n_streams = 4 if p.mode & RopeMode.MROPE else 1
    require(pos.nelements >= n_streams * ne2, node, f"needs {n_streams * ne2} positions, has {pos.nelements}")
    if p.mode & RopeMode.MROPE:
        require(sum(p.sections) > 0, node, "multi-section rope needs sections")
    if p.mode == RopeMode.VISION:
        require(p.n_dims * 2 == ne0 and p.n_offs == 0, node, "vision rope needs n_dims = ne0/2")
    r = _Rope(node)
    if ff is not None:
        require(ff.type == GGMLType.F32 and ff.nelements >= r.n_pairs, node, "bad frequency factors")
    dst, xv = view(node), view(src)
    first, step, partner = r.i0.start, r.i0.step or 1, r.i1.start - r.i0.start
    keep = [s for s in r.keep] if not np.may_share_memory(dst, xv) else []
    rotate = _rotator()
    if node.type == GGMLType.F32:
        def kernel() -> None:
            for s in keep:
                dst[..., s] = xv[..., s]
            cos, sin = r.cos_sin()
            rotate(xv, dst, cos, sin, first, step, partner)
        return kernel
    read, store = f32_source(src), f32_store(node)

    def kernel16() -> None:          # F16: rotate in float32, round once
        x = read()
        cos, sin = r.cos_sin()
        rotate(x, x, cos, sin, first, step, partner)
        with np.errstate(over="ignore"):
            store(x)
    return kernel16
