"""Layout and generator ops: REPEAT, CONCAT, PAD, FILL, ARANGE, TRI, and the vision-tower IM2COL, UPSCALE
(ggml-rpc.md §12.19-23)."""
from __future__ import annotations

import numpy as np

from ...ggml.tensor import Tensor
from ...ggml.types import GGMLOp, GGMLType, type_name
from . import Kernel, register
from .common import require, view
from .elementwise import can_repeat, f32_source, f32_store, fma32, split_broadcast

F32 = np.float32


def _src(node: Tensor, i: int = 0) -> Tensor:
    src = node.src_at(i)
    require(src is not None, node, f"needs source {i}")
    assert src is not None
    return src


@register(GGMLOp.REPEAT)
def build_repeat(node: Tensor) -> Kernel:
    src = _src(node)
    require(src.type == node.type and not src.is_quantized, node, "repeat keeps a plain type")
    can_repeat(node, src, node.ne)
    (d,), s = split_broadcast([view(node)], view(src))
    return lambda: np.copyto(d, s)


@register(GGMLOp.CONCAT)
def build_concat(node: Tensor) -> Kernel:
    a, b = _src(node, 0), _src(node, 1)
    dim = node.param_i32(0)
    require(0 <= dim < 4, node, f"bad dim {dim}")
    require(a.type == b.type == node.type and not a.is_quantized, node, "operands need the result's plain type")
    ne = list(a.ne)
    ne[dim] += b.ne[dim]
    require(tuple(ne) == node.ne and all(a.ne[i] == b.ne[i] for i in range(4) if i != dim), node,
            f"cannot concat {a.ne} and {b.ne} along {dim} into {node.ne}")
    ax = 3 - dim
    d = view(node)
    da = d[(slice(None),) * ax + (slice(0, a.ne[dim]),)]
    db = d[(slice(None),) * ax + (slice(a.ne[dim], None),)]
    va, vb = view(a), view(b)

    def kernel() -> None:
        np.copyto(da, va)
        np.copyto(db, vb)
    return kernel


@register(GGMLOp.PAD)
def build_pad(node: Tensor) -> Kernel:
    src = _src(node)
    require(src.type == node.type and src.type in (GGMLType.F32, GGMLType.F16), node, "only f32/f16")
    lp = [node.param_i32(2 * i) for i in range(4)]
    rp = [node.param_i32(2 * i + 1) for i in range(4)]
    circular = node.param_i32(8) != 0
    require(all(src.ne[i] + lp[i] + rp[i] == node.ne[i] for i in range(4)), node,
            f"padding {lp}/{rp} of {src.ne} does not give {node.ne}")
    s, d = view(src), view(node)
    if circular:
        ix = np.ix_(*[(np.arange(node.ne[i]) - lp[i]) % src.ne[i] for i in (3, 2, 1, 0)])
        return lambda: np.copyto(d, s[ix])
    inner = tuple(slice(lp[i], lp[i] + src.ne[i]) for i in (3, 2, 1, 0))

    def kernel() -> None:
        d.fill(0)
        d[inner] = s
    return kernel


@register(GGMLOp.FILL)
def build_fill(node: Tensor) -> Kernel:
    require(node.type in (GGMLType.F32, GGMLType.F16), node, "only f32/f16")
    d, c = view(node), F32(node.param_f32(0))
    return lambda: d.fill(c)


@register(GGMLOp.ARANGE)
def build_arange(node: Tensor) -> Kernel:
    require(node.type == GGMLType.F32, node, "only f32")
    start, stop, step = (F32(node.param_f32(i)) for i in range(3))
    n = int(np.ceil(F32((stop - start) / step)))
    require(n == node.nelements, node, f"{n} steps do not fill {node.nelements} elements")
    values = fma32(np.arange(n, dtype=F32), step, start)    # start + step*i, contracted in ggml's build
    d = view(node).reshape(-1)
    return lambda: np.copyto(d, values)


@register(GGMLOp.TRI)
def build_tri(node: Tensor) -> Kernel:
    src = _src(node)
    require(src.type == node.type == GGMLType.F32 and src.ne == node.ne, node, "f32, same shape")
    kind = node.param_i32(0)
    i0 = np.arange(node.ne[0])[None, :]
    r = np.arange(node.ne[1])[:, None]
    preds = {0: i0 >= r, 1: i0 > r, 2: i0 <= r, 3: i0 < r}
    require(kind in preds, node, f"bad tri type {kind}")
    keep = preds[kind]
    s, d = view(src), view(node)
    zero = F32(0)
    return lambda: np.copyto(d, np.where(keep, s, zero))


@register(GGMLOp.IM2COL)
def build_im2col(node: Tensor) -> Kernel:
    kern, img = _src(node, 0), _src(node, 1)
    require(img.type in (GGMLType.F32, GGMLType.F16, GGMLType.BF16), node, "image must be a float type")
    require(node.type in (GGMLType.F32, GGMLType.F16), node, f"cannot write {type_name(node.type)}")
    s0, s1, p0, p1, d0, d1, two_d = (node.param_i32(i) for i in range(7))
    if two_d:
        n, ic, ih, iw = img.ne[3], img.ne[2], img.ne[1], img.ne[0]
        kh, kw, oh, ow = kern.ne[1], kern.ne[0], node.ne[2], node.ne[1]
    else:
        n, ic, ih, iw = img.ne[2], img.ne[1], 1, img.ne[0]
        kh, kw, oh, ow = 1, kern.ne[0], 1, node.ne[1]
    require(node.ne[0] == ic * kh * kw, node, f"result rows {node.ne[0]} != IC*KH*KW {ic * kh * kw}")
    # source row/column of every (output position, kernel tap); out-of-image taps read 0
    hh = np.arange(oh)[:, None] * s1 + np.arange(kh)[None, :] * d1 - p1       # (OH, KH)
    ww = np.arange(ow)[:, None] * s0 + np.arange(kw)[None, :] * d0 - p0       # (OW, KW)
    valid = ((hh >= 0) & (hh < ih))[:, None, :, None] & ((ww >= 0) & (ww < iw))[None, :, None, :]
    hc, wc = np.clip(hh, 0, ih - 1), np.clip(ww, 0, iw - 1)
    read = f32_source(img)
    store = f32_store(node)
    shape_in = (n, ic, ih, iw)

    def kernel() -> None:
        x = read().reshape(shape_in)
        g = x[:, :, hc[:, None, :, None], wc[None, :, None, :]]              # (N, IC, OH, OW, KH, KW)
        g = np.where(valid, g, F32(0)).transpose(0, 2, 3, 1, 4, 5)             # (N, OH, OW, IC, KH, KW)
        store(g.reshape(node.ne[::-1]))
    return kernel


@register(GGMLOp.UPSCALE)
def build_upscale(node: Tensor) -> Kernel:
    src = _src(node)
    require(src.type == node.type == GGMLType.F32, node, "only f32")
    flags = node.param_i32(0)
    mode = flags & 0xFF
    require(mode in (0, 1) and not flags & 0x200, node, f"scale mode {flags:#x} is not supported")
    ne, ne0 = node.ne, src.ne
    sf = [F32(F32(ne[i]) / F32(ne0[i])) for i in range(4)]
    off = F32(0.5)
    if flags & 0x100:
        off = F32(0)
        for i in (0, 1):
            if ne[i] > 1 and ne0[i] > 1:
                sf[i] = F32(F32(ne[i] - 1) / F32(ne0[i] - 1))
    idx = [(np.arange(ne[i], dtype=F32) / sf[i]).astype(np.int64) for i in range(4)]
    s, d = view(src), view(node)
    if mode == 0:
        ix = np.ix_(idx[3], idx[2], idx[1], idx[0])
        return lambda: np.copyto(d, s[ix])

    def axis(i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        p = (np.arange(ne[i], dtype=F32) + off) / sf[i] - off
        lo = np.floor(p).astype(np.int64)
        a, b = np.clip(lo, 0, ne0[i] - 1), np.clip(lo + 1, 0, ne0[i] - 1)
        return a, b, np.clip(p - a.astype(F32), F32(0), F32(1))
    x0, x1, dx = axis(0)
    y0, y1, dy = axis(1)
    i3, i2 = idx[3][:, None, None, None], idx[2][None, :, None, None]
    dx, dy = dx[None, None, None, :], dy[None, None, :, None]
    one = F32(1)

    def kernel() -> None:
        def at(yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
            return s[i3, i2, yy[None, None, :, None], xx[None, None, None, :]]
        val = (at(y0, x0) * (one - dx) * (one - dy) + at(y0, x1) * dx * (one - dy)
               + at(y1, x0) * (one - dx) * dy + at(y1, x1) * dx * dy)
        np.copyto(d, val)
    return kernel
