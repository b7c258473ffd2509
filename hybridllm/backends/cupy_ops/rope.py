"""ROPE on the GPU (kernels/rope.cu): NORMAL, NEOX, MROPE, IMROPE and VISION, frequency factors, YaRN."""
from __future__ import annotations

import math

import numpy as np

from ...ggml.tensor import Tensor
from ...ggml.types import GGMLOp, GGMLType, RopeMode
from . import register
from .common import F32, I32, I64, BuildCtx, elem_threads, launch, require, row_grid, src

_MODES = {RopeMode.NORMAL, RopeMode.NEOX, RopeMode.MROPE, RopeMode.IMROPE, RopeMode.VISION}


def yarn_corr_dims(n_dims: int, n_ctx_orig: int, freq_base: float, beta_fast: float,
                   beta_slow: float) -> tuple[float, float]:
    """ggml_rope_yarn_corr_dims, evaluated in f32 like the reference."""
    f = np.float32

    def corr_dim(n_rot: float) -> np.float32:
        return f(n_dims) * f(math.log(f(n_ctx_orig) / (f(n_rot) * f(2) * f(math.pi)))) / (
            f(2) * f(math.log(f(freq_base))))

    start = math.floor(corr_dim(beta_fast))
    end = math.ceil(corr_dim(beta_slow))
    return float(max(0, start)), float(min(n_dims - 1, end))


@register(GGMLOp.ROPE)
def build_rope(node: Tensor, ctx: BuildCtx):
    x, pos, ff = src(node, 0), src(node, 1), node.src_at(2)
    require(x.type in (GGMLType.F32, GGMLType.F16) and node.type == x.type, node, "rope needs f32/f16")
    es = 4 if x.type == GGMLType.F32 else 2
    require(x.nb[0] == es and node.nb[0] == es and x.ne == node.ne, node, "rows must be dense, shapes equal")
    require(pos.type == GGMLType.I32, node, "positions must be i32")
    n_dims, mode, n_ctx_orig = node.param_i32(1), node.param_i32(2), node.param_i32(4)
    freq_base, freq_scale, ext_factor, attn_factor, beta_fast, beta_slow = (
        node.param_f32(i) for i in range(5, 11))
    sections = [node.param_i32(i) for i in range(11, 15)]
    n_offs = node.param_i32(15)
    require(mode in _MODES, node, f"rope mode {mode} not supported")
    ne0, ne1, ne2, ne3 = x.ne
    require(n_dims % 2 == 0 and ne0 % 2 == 0 and n_offs % 2 == 0 and 0 <= n_offs
            and n_offs + n_dims <= ne0, node, "bad n_dims/n_offs")
    if mode == RopeMode.VISION:
        require(n_dims == ne0 // 2 and n_offs == 0, node, "vision rope needs n_dims = ne0/2")
    if mode & RopeMode.MROPE:
        require(sum(sections) > 0 and pos.ne[0] >= 4 * ne2, node, "multi-section rope needs 4 positions")
    else:
        require(pos.ne[0] >= ne2, node, "one position per token required")
    if ff is not None:
        require(ff.type == GGMLType.F32 and ff.ne[0] >= (ne0 // 2 if mode == RopeMode.VISION else n_dims // 2),
                node, "frequency factors must be f32, one per pair")
    theta_scale = float(np.float32(freq_base) ** np.float32(-2.0 / n_dims))
    corr0, corr1 = yarn_corr_dims(n_dims, n_ctx_orig, freq_base, beta_fast, beta_slow)
    threads = elem_threads(ne0 // 2, ctx.warp, cap=128)
    gy, gz = row_grid(ne1 * ne2 * ne3)
    args = (ctx.ptr(x), ctx.ptr(pos), ctx.ptr(ff), ctx.ptr(node), I32(x.type), I32(mode), I32(n_dims),
            I32(n_offs), I32(ne0), I32(ne1), I32(ne2), I32(ne3), I64(x.nb[1]), I64(x.nb[2]), I64(x.nb[3]),
            I64(node.nb[1]), I64(node.nb[2]), I64(node.nb[3]), F32(theta_scale), F32(freq_scale),
            F32(ext_factor), F32(attn_factor), F32(corr0), F32(corr1), *(I32(s) for s in sections))
    grid = ((ne0 // 2 + threads - 1) // threads, gy, gz)
    return [launch(ctx.fn("rope", "k_rope"), grid, (threads,), args)]
