"""ggml's graph-construction API in Python: each function returns a `Tensor` node with exactly the type,
ne, nb, op, op_params, src, view_src and view_offs that the same ggml.h call would produce.

That fidelity is the point: a graph built here can be serialized to a llama.cpp RPC worker unchanged.
Shapes follow ggml (ne[0] fastest); strides are in bytes. Functions raise `GraphError` where ggml would
GGML_ASSERT. There is no ggml_context: tensors are plain Python objects, and `Graph` collects the
execution order the way ggml_build_forward_expand does.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np

from .tensor import Tensor
from .types import (
    GGMLOp,
    GGMLType,
    GluOp,
    TensorFlag,
    UnaryOp,
)

from ._core import (  # noqa: F401 - re-exported: ops.<name> is the whole API
    GraphError,
    _check,
    _fmt_name,
    _is_contiguous_mn,
    _new,
    _params,
    _reshape,
    _set_op,
    _set_param_f32,
    _set_param_i32,
    _view,
    are_same_shape,
    blck_size,
    can_mul_mat,
    can_repeat,
    can_repeat_rows,
    cast,
    cont,
    cont_1d,
    cont_2d,
    cont_3d,
    cont_4d,
    cpy,
    dup,
    dup_tensor,
    is_contiguous,
    is_contiguous_1,
    is_contiguous_2,
    is_contiguous_rows,
    is_empty,
    is_matrix,
    is_padded_1d,
    is_scalar,
    is_transposed,
    is_vector,
    nelements,
    new_tensor,
    new_tensor_1d,
    new_tensor_2d,
    new_tensor_3d,
    new_tensor_4d,
    permute,
    reshape,
    reshape_1d,
    reshape_2d,
    reshape_3d,
    reshape_4d,
    set_input,
    set_name,
    set_output,
    transpose,
    type_size,
    view_1d,
    view_2d,
    view_3d,
    view_4d,
    view_tensor,
)

__all__ = ["Graph", "GraphError"]  # the op functions are used as ops.<name>

# ------------------------------------------------------------------------------------------------
# elementwise

def _binary(op: GGMLOp, a: Tensor, b: Tensor, inplace: bool) -> Tensor:
    _check(can_repeat(b, a), f"{op.name}: {b.ne} does not broadcast to {a.ne}")
    return _set_op(view_tensor(a) if inplace else dup_tensor(a), op, a, b)


def add(a: Tensor, b: Tensor, inplace: bool = False) -> Tensor:
    return _binary(GGMLOp.ADD, a, b, inplace)


def sub(a: Tensor, b: Tensor, inplace: bool = False) -> Tensor:
    return _binary(GGMLOp.SUB, a, b, inplace)


def mul(a: Tensor, b: Tensor, inplace: bool = False) -> Tensor:
    return _binary(GGMLOp.MUL, a, b, inplace)


def div(a: Tensor, b: Tensor, inplace: bool = False) -> Tensor:
    return _binary(GGMLOp.DIV, a, b, inplace)


def add_cast(a: Tensor, b: Tensor, type: int) -> Tensor:
    _check(can_repeat_rows(b, a), "add_cast: rows do not broadcast")
    return _set_op(_new(type, a.ne), GGMLOp.ADD, a, b)


def add_id(a: Tensor, b: Tensor, ids: Tensor) -> Tensor:
    _check(a.ne[0] == b.ne[0] and a.ne[1] == ids.ne[0] and a.ne[2] == ids.ne[1], "add_id shapes")
    _check(ids.type == GGMLType.I32, "add_id ids must be I32")
    return _set_op(dup_tensor(a), GGMLOp.ADD_ID, a, b, ids)


def add1(a: Tensor, b: Tensor, inplace: bool = False) -> Tensor:
    _check(is_scalar(b) and is_padded_1d(a), "add1 needs a scalar b and padded a")
    return _set_op(view_tensor(a) if inplace else dup_tensor(a), GGMLOp.ADD1, a, b)


def _simple(op: GGMLOp, a: Tensor, inplace: bool = False) -> Tensor:
    return _set_op(view_tensor(a) if inplace else dup_tensor(a), op, a)


def sqr(a: Tensor, inplace: bool = False) -> Tensor:
    return _simple(GGMLOp.SQR, a, inplace)


def sqrt(a: Tensor, inplace: bool = False) -> Tensor:
    return _simple(GGMLOp.SQRT, a, inplace)


def log(a: Tensor, inplace: bool = False) -> Tensor:
    return _simple(GGMLOp.LOG, a, inplace)


def sin(a: Tensor, inplace: bool = False) -> Tensor:
    return _simple(GGMLOp.SIN, a, inplace)


def cos(a: Tensor, inplace: bool = False) -> Tensor:
    return _simple(GGMLOp.COS, a, inplace)


def scale_bias(a: Tensor, s: float, b: float, inplace: bool = False) -> Tensor:
    _check(is_padded_1d(a), f"scale of non-padded {a.name!r}")
    t = view_tensor(a) if inplace else dup_tensor(a)
    return _set_op(t, GGMLOp.SCALE, a, params=_params(float(s), float(b)))


def scale(a: Tensor, s: float, inplace: bool = False) -> Tensor:
    return scale_bias(a, s, 0.0, inplace)


def clamp(a: Tensor, min: float, max: float, inplace: bool = False) -> Tensor:
    t = view_tensor(a) if inplace else dup_tensor(a)
    return _set_op(t, GGMLOp.CLAMP, a, params=_params(float(min), float(max)))


def leaky_relu(a: Tensor, negative_slope: float, inplace: bool = False) -> Tensor:
    t = view_tensor(a) if inplace else dup_tensor(a)
    return _set_op(t, GGMLOp.LEAKY_RELU, a, params=_params(float(negative_slope)))


def fill(a: Tensor, c: float, inplace: bool = False) -> Tensor:
    _check(a.type in (GGMLType.F32, GGMLType.F16) and is_contiguous(a), "fill needs contiguous F32/F16")
    t = view_tensor(a) if inplace else dup_tensor(a)
    return _set_op(t, GGMLOp.FILL, a, params=_params(float(c)))


def unary(a: Tensor, op: UnaryOp, inplace: bool = False) -> Tensor:
    _check(is_contiguous_rows(a), f"unary op on {a.name!r} without contiguous rows")
    t = view_tensor(a) if inplace else dup_tensor(a)
    return _set_op(t, GGMLOp.UNARY, a, params=_params(int(op)))


def _unary_fn(op: UnaryOp):
    def fn(a: Tensor, inplace: bool = False) -> Tensor:
        return unary(a, op, inplace)
    fn.__name__ = op.name.lower()
    fn.__doc__ = f"UNARY {op.name}"
    return fn


abs_ = _unary_fn(UnaryOp.ABS)
sgn = _unary_fn(UnaryOp.SGN)
neg = _unary_fn(UnaryOp.NEG)
step = _unary_fn(UnaryOp.STEP)
tanh = _unary_fn(UnaryOp.TANH)
elu = _unary_fn(UnaryOp.ELU)
relu = _unary_fn(UnaryOp.RELU)
sigmoid = _unary_fn(UnaryOp.SIGMOID)
gelu = _unary_fn(UnaryOp.GELU)
gelu_quick = _unary_fn(UnaryOp.GELU_QUICK)
gelu_erf = _unary_fn(UnaryOp.GELU_ERF)
silu = _unary_fn(UnaryOp.SILU)
hardswish = _unary_fn(UnaryOp.HARDSWISH)
hardsigmoid = _unary_fn(UnaryOp.HARDSIGMOID)
exp = _unary_fn(UnaryOp.EXP)
expm1 = _unary_fn(UnaryOp.EXPM1)
softplus = _unary_fn(UnaryOp.SOFTPLUS)
floor = _unary_fn(UnaryOp.FLOOR)
ceil = _unary_fn(UnaryOp.CEIL)
round_ = _unary_fn(UnaryOp.ROUND)
trunc = _unary_fn(UnaryOp.TRUNC)


def glu(a: Tensor, op: GluOp, swapped: bool = False, b: Tensor | None = None) -> Tensor:
    """GLU: one input (rows of 2n values -> n) or split form (gate a, up b)."""
    _check(is_contiguous_1(a), f"glu of {a.name!r} without contiguous rows")
    if b is not None:
        _check(is_contiguous_1(b) and are_same_shape(a, b) and a.type == b.type, "glu split mismatch")
        ne = a.ne
    else:
        ne = (a.ne[0] // 2, a.ne[1], a.ne[2], a.ne[3])
    return _set_op(_new(a.type, ne), GGMLOp.GLU, a, b, params=_params(int(op), int(swapped)))


def glu_split(a: Tensor, b: Tensor, op: GluOp) -> Tensor:
    return glu(a, op, False, b)


def swiglu(a: Tensor) -> Tensor:
    return glu(a, GluOp.SWIGLU)


def geglu(a: Tensor) -> Tensor:
    return glu(a, GluOp.GEGLU)


def reglu(a: Tensor) -> Tensor:
    return glu(a, GluOp.REGLU)


def swiglu_split(a: Tensor, b: Tensor) -> Tensor:
    return glu(a, GluOp.SWIGLU, False, b)


def geglu_split(a: Tensor, b: Tensor) -> Tensor:
    return glu(a, GluOp.GEGLU, False, b)


def reglu_split(a: Tensor, b: Tensor) -> Tensor:
    return glu(a, GluOp.REGLU, False, b)


def geglu_erf_split(a: Tensor, b: Tensor) -> Tensor:
    return glu(a, GluOp.GEGLU_ERF, False, b)


def geglu_quick_split(a: Tensor, b: Tensor) -> Tensor:
    return glu(a, GluOp.GEGLU_QUICK, False, b)


def swiglu_oai(a: Tensor, b: Tensor, alpha: float, limit: float) -> Tensor:
    t = glu(a, GluOp.SWIGLU_OAI, False, b)
    _set_param_f32(t, 2, alpha)
    _set_param_f32(t, 3, limit)
    return t


# ------------------------------------------------------------------------------------------------
# normalization, reductions

def _norm(op: GGMLOp, a: Tensor, eps: float, inplace: bool) -> Tensor:
    t = view_tensor(a) if inplace else dup_tensor(a)
    return _set_op(t, op, a, params=_params(float(eps)))


def norm(a: Tensor, eps: float, inplace: bool = False) -> Tensor:
    return _norm(GGMLOp.NORM, a, eps, inplace)


def rms_norm(a: Tensor, eps: float, inplace: bool = False) -> Tensor:
    return _norm(GGMLOp.RMS_NORM, a, eps, inplace)


def l2_norm(a: Tensor, eps: float, inplace: bool = False) -> Tensor:
    return _norm(GGMLOp.L2_NORM, a, eps, inplace)


def sum(a: Tensor) -> Tensor:
    return _set_op(_new(a.type, (1,)), GGMLOp.SUM, a)


def sum_rows(a: Tensor) -> Tensor:
    return _set_op(_new(a.type, (1, a.ne[1], a.ne[2], a.ne[3])), GGMLOp.SUM_ROWS, a)


def mean(a: Tensor) -> Tensor:
    return _set_op(_new(GGMLType.F32, (1, a.ne[1], a.ne[2], a.ne[3])), GGMLOp.MEAN, a)


def argmax(a: Tensor) -> Tensor:
    _check(is_matrix(a), "argmax needs a matrix")
    return _set_op(_new(GGMLType.I32, (a.ne[1],)), GGMLOp.ARGMAX, a)


def repeat(a: Tensor, b: Tensor) -> Tensor:
    _check(can_repeat(a, b), f"repeat: {a.ne} does not tile {b.ne}")
    return _set_op(_new(a.type, b.ne), GGMLOp.REPEAT, a)


def repeat_4d(a: Tensor, ne0: int, ne1: int, ne2: int, ne3: int) -> Tensor:
    ne = (ne0, ne1, ne2, ne3)
    _check(is_empty(a) or all(ne[i] % a.ne[i] == 0 for i in range(4)), "repeat_4d shape")
    return _set_op(_new(a.type, ne), GGMLOp.REPEAT, a)


def concat(a: Tensor, b: Tensor, dim: int) -> Tensor:
    _check(0 <= dim < 4 and a.type == b.type, "concat dim/type")
    ne = []
    for d in range(4):
        if d == dim:
            ne.append(a.ne[d] + b.ne[d])
        else:
            _check(a.ne[d] == b.ne[d], f"concat: dim {d} differs")
            ne.append(a.ne[d])
    return _set_op(_new(a.type, ne), GGMLOp.CONCAT, a, b, params=_params(dim))


def pad_ext(a: Tensor, lp0: int, rp0: int, lp1: int = 0, rp1: int = 0, lp2: int = 0, rp2: int = 0,
            lp3: int = 0, rp3: int = 0) -> Tensor:
    ne = (a.ne[0] + lp0 + rp0, a.ne[1] + lp1 + rp1, a.ne[2] + lp2 + rp2, a.ne[3] + lp3 + rp3)
    return _set_op(_new(a.type, ne), GGMLOp.PAD, a,
                   params=_params(lp0, rp0, lp1, rp1, lp2, rp2, lp3, rp3, 0))


def pad(a: Tensor, p0: int, p1: int = 0, p2: int = 0, p3: int = 0) -> Tensor:
    return pad_ext(a, 0, p0, 0, p1, 0, p2, 0, p3)


def arange(start: float, stop: float, step: float) -> Tensor:
    _check(stop > start, "arange needs stop > start")
    f32 = np.float32  # ceilf((stop - start) / step) in float arithmetic
    steps = math.ceil(float((f32(stop) - f32(start)) / f32(step)))
    return _set_op(_new(GGMLType.F32, (steps,)), GGMLOp.ARANGE,
                   params=_params(float(start), float(stop), float(step)))


def argsort(a: Tensor, order: int) -> Tensor:
    """order 0 = ascending, 1 = descending (ggml_sort_order)."""
    return _set_op(_new(GGMLType.I32, a.ne), GGMLOp.ARGSORT, a, params=_params(int(order)))


def argsort_top_k(a: Tensor, k: int) -> Tensor:
    _check(a.ne[0] >= k, "argsort_top_k: k larger than the row")
    r = argsort(a, 1)
    return view_4d(r, k, r.ne[1], r.ne[2], r.ne[3], r.nb[1], r.nb[2], r.nb[3], 0)


def top_k(a: Tensor, k: int) -> Tensor:
    _check(a.ne[0] >= k, "top_k: k larger than the row")
    return _set_op(_new(GGMLType.I32, (k, a.ne[1], a.ne[2], a.ne[3])), GGMLOp.TOP_K, a)


# ------------------------------------------------------------------------------------------------
# matrix products, rows

def mul_mat(a: Tensor, b: Tensor) -> Tensor:
    _check(can_mul_mat(a, b), f"mul_mat: {a.name!r} {a.ne} x {b.name!r} {b.ne}")
    _check(not is_transposed(a), f"mul_mat: {a.name!r} is transposed")
    return _set_op(_new(GGMLType.F32, (a.ne[1], b.ne[1], b.ne[2], b.ne[3])), GGMLOp.MUL_MAT, a, b)


def mul_mat_set_prec(a: Tensor, prec: int) -> None:
    _set_param_i32(a, 0, prec)


def mul_mat_id(as_: Tensor, b: Tensor, ids: Tensor) -> Tensor:
    _check(not is_transposed(as_) and ids.type == GGMLType.I32, "mul_mat_id: as/ids")
    _check(as_.ne[3] == 1 and b.ne[3] == 1 and ids.ne[2] == 1 and ids.ne[3] == 1, "mul_mat_id dims")
    _check(ids.ne[1] == b.ne[2] and as_.ne[0] == b.ne[0] and ids.ne[0] % b.ne[1] == 0,
           f"mul_mat_id: {as_.ne} x {b.ne} ids {ids.ne}")
    return _set_op(_new(GGMLType.F32, (as_.ne[1], ids.ne[0], b.ne[2], 1)), GGMLOp.MUL_MAT_ID,
                   as_, b, ids)


def get_rows(a: Tensor, b: Tensor) -> Tensor:
    _check(a.ne[2] == b.ne[1] and a.ne[3] == b.ne[2] and b.ne[3] == 1, f"get_rows: {a.ne} by {b.ne}")
    _check(b.type == GGMLType.I32, "get_rows indices must be I32")
    type = GGMLType.I32 if a.type == GGMLType.I32 else GGMLType.F32
    return _set_op(_new(type, (a.ne[0], b.ne[0], b.ne[1], b.ne[2])), GGMLOp.GET_ROWS, a, b)


def set_rows(a: Tensor, b: Tensor, c: Tensor) -> Tensor:
    """Write rows b into a at indices c; the result is a view of a."""
    _check(a.ne[0] == b.ne[0] and a.ne[2] == b.ne[2] and a.ne[3] == b.ne[3], f"set_rows {a.ne} {b.ne}")
    _check(b.ne[1] == c.ne[0] and b.ne[2] % c.ne[1] == 0 and b.ne[3] % c.ne[2] == 0 and c.ne[3] == 1,
           f"set_rows indices {c.ne} for rows {b.ne}")
    _check(b.type in (GGMLType.F32, GGMLType.F16), "set_rows source must be F32/F16")
    _check(c.type in (GGMLType.I64, GGMLType.I32), "set_rows indices must be I64/I32")
    _check(is_contiguous_rows(a) and is_contiguous_rows(b), "set_rows needs contiguous rows")
    return _set_op(view_tensor(a), GGMLOp.SET_ROWS, b, c, a)


# ------------------------------------------------------------------------------------------------
# attention building blocks

def soft_max_ext(a: Tensor, mask: Tensor | None, scale: float, max_bias: float,
                 inplace: bool = False) -> Tensor:
    _check(is_contiguous(a), f"soft_max of non-contiguous {a.name!r}")
    if mask is not None:
        _check(mask.type in (GGMLType.F16, GGMLType.F32) and is_contiguous(mask), "soft_max mask type")
        _check(mask.ne[0] == a.ne[0] and mask.ne[1] >= a.ne[1], f"soft_max mask {mask.ne} for {a.ne}")
        _check(a.ne[2] % mask.ne[2] == 0 and a.ne[3] % mask.ne[3] == 0, "soft_max mask broadcast")
    _check(max_bias <= 0.0 or mask is not None, "ALiBi needs a mask")
    t = view_tensor(a) if inplace else dup_tensor(a)
    return _set_op(t, GGMLOp.SOFT_MAX, a, mask, params=_params(float(scale), float(max_bias)))


def soft_max(a: Tensor, inplace: bool = False) -> Tensor:
    return soft_max_ext(a, None, 1.0, 0.0, inplace)


def soft_max_add_sinks(a: Tensor, sinks: Tensor | None) -> None:
    _attach_src(a, 2, sinks)


def _attach_src(a: Tensor, i: int, t: Tensor | None) -> None:
    srcs = list(a.src) + [None] * (i + 1 - len(a.src))
    srcs[i] = t
    while srcs and srcs[-1] is None:
        srcs.pop()
    a.src = srcs


def flash_attn_ext(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float,
                   max_bias: float, logit_softcap: float) -> Tensor:
    _check(can_mul_mat(k, q), f"flash_attn_ext: K {k.ne} vs Q {q.ne}")
    _check(q.ne[3] == k.ne[3] == v.ne[3], "flash_attn_ext dim 3")
    if mask is not None:
        _check(mask.type == GGMLType.F16 and is_contiguous(mask), "flash_attn_ext needs a contiguous F16 mask")
        _check(q.ne[2] % mask.ne[2] == 0 and q.ne[3] % mask.ne[3] == 0, "flash_attn_ext mask broadcast")
    _check(max_bias <= 0.0 or mask is not None, "ALiBi needs a mask")
    t = _new(GGMLType.F32, (v.ne[0], q.ne[2], q.ne[1], q.ne[3]))
    return _set_op(t, GGMLOp.FLASH_ATTN_EXT, q, k, v, mask,
                   params=_params(float(scale), float(max_bias), float(logit_softcap)))


def flash_attn_ext_set_prec(a: Tensor, prec: int) -> None:
    _set_param_i32(a, 3, prec)


def flash_attn_ext_set_n_kv_max(a: Tensor, n_kv_max: int) -> None:
    _set_param_i32(a, 4, n_kv_max)


def flash_attn_ext_add_sinks(a: Tensor, sinks: Tensor | None) -> None:
    _attach_src(a, 4, sinks)


def rope_multi(a: Tensor, b: Tensor, c: Tensor | None, n_dims: int, sections: Sequence[int] | None,
               mode: int, n_ctx_orig: int, freq_base: float, freq_scale: float, ext_factor: float,
               attn_factor: float, beta_fast: float, beta_slow: float, inplace: bool = False) -> Tensor:
    _check(mode & 1 == 0, "rope mode & 1 is no longer supported")
    _check(is_vector(b) and b.type == GGMLType.I32, "rope positions must be an I32 vector")
    mrope = bool(mode & 8)
    _check(b.ne[0] == a.ne[2] * (4 if mrope else 1), f"rope: {b.ne[0]} positions for {a.ne[2]} tokens")
    if c is not None:
        _check(c.type == GGMLType.F32 and c.ne[0] >= n_dims // 2, "rope freq factors")
    secs = list(sections) if (mrope and sections) else [0, 0, 0, 0]
    params = _params(0, n_dims, mode, 0, n_ctx_orig, float(freq_base), float(freq_scale),
                     float(ext_factor), float(attn_factor), float(beta_fast), float(beta_slow),
                     *[int(s) for s in secs], 0)
    t = view_tensor(a) if inplace else dup_tensor(a)
    return _set_op(t, GGMLOp.ROPE, a, b, c, params=params)


def rope_ext(a: Tensor, b: Tensor, c: Tensor | None, n_dims: int, mode: int, n_ctx_orig: int,
             freq_base: float, freq_scale: float, ext_factor: float, attn_factor: float,
             beta_fast: float, beta_slow: float, inplace: bool = False) -> Tensor:
    return rope_multi(a, b, c, n_dims, None, mode, n_ctx_orig, freq_base, freq_scale, ext_factor,
                      attn_factor, beta_fast, beta_slow, inplace)


def rope(a: Tensor, b: Tensor, n_dims: int, mode: int) -> Tensor:
    return rope_ext(a, b, None, n_dims, mode, 0, 10000.0, 1.0, 0.0, 1.0, 0.0, 0.0)


# ------------------------------------------------------------------------------------------------
# vision-tower building blocks (qwen3vl mmproj)

def _conv_out(ins: int, ks: int, s: int, p: int, d: int) -> int:
    return (ins + 2 * p - d * (ks - 1) - 1) // s + 1


def im2col(a: Tensor, b: Tensor, s0: int, s1: int, p0: int, p1: int, d0: int, d1: int, is_2d: bool,
           dst_type: int) -> Tensor:
    """Kernel a (KW, KH, IC, OC) only gives the shape; b is the image (IW, IH, IC, N)."""
    if is_2d:
        _check(a.ne[2] == b.ne[2], "im2col: channel mismatch")
    else:
        _check(b.ne[1] == a.ne[1] and b.ne[3] == 1, "im2col 1d shapes")
    oh = _conv_out(b.ne[1], a.ne[1], s1, p1, d1) if is_2d else 0
    ow = _conv_out(b.ne[0], a.ne[0], s0, p0, d0)
    _check((not is_2d or oh > 0) and ow > 0, "im2col: image smaller than the kernel")
    ne = (a.ne[2] * a.ne[1] * a.ne[0] if is_2d else a.ne[1] * a.ne[0], ow, oh if is_2d else b.ne[2],
          b.ne[3] if is_2d else 1)
    return _set_op(_new(dst_type, ne), GGMLOp.IM2COL, a, b,
                   params=_params(s0, s1, p0, p1, d0, d1, 1 if is_2d else 0))


def conv_2d(a: Tensor, b: Tensor, s0: int, s1: int, p0: int, p1: int, d0: int, d1: int) -> Tensor:
    """ggml_conv_2d: IM2COL -> MUL_MAT -> reshape -> permute -> cont."""
    col = im2col(a, b, s0, s1, p0, p1, d0, d1, True,
                 GGMLType.F32 if a.type == GGMLType.BF16 else GGMLType.F16)
    r = mul_mat(reshape_2d(col, col.ne[0], col.ne[3] * col.ne[2] * col.ne[1]),
                reshape_2d(a, a.ne[0] * a.ne[1] * a.ne[2], a.ne[3]))
    r = reshape_4d(r, col.ne[1], col.ne[2], col.ne[3], a.ne[3])
    return cont(permute(r, 0, 1, 3, 2))


def interpolate(a: Tensor, ne0: int, ne1: int, ne2: int, ne3: int, mode: int) -> Tensor:
    """UPSCALE to an explicit shape; mode = ggml_scale_mode | flags (0 nearest, 1 bilinear, ...)."""
    _check(a.type == GGMLType.F32, "interpolate needs F32")
    return _set_op(_new(a.type, (ne0, ne1, ne2, ne3)), GGMLOp.UPSCALE, a, params=_params(int(mode)))


def upscale(a: Tensor, scale_factor: int, mode: int) -> Tensor:
    _check(scale_factor > 1, "upscale factor must be > 1")
    return interpolate(a, a.ne[0] * scale_factor, a.ne[1] * scale_factor, a.ne[2], a.ne[3], mode)


# ------------------------------------------------------------------------------------------------
# graphs

class Graph:
    """A ggml_cgraph: nodes in execution order and leafs, built by depth-first visits of sources.

    Mirrors ggml_visit_parents_graph, including the COMPUTE flag that ggml_build_forward_select leaves
    off the branches that were not selected (their nodes stay in the graph but are not run).
    """

    def __init__(self) -> None:
        self.nodes: list[Tensor] = []
        self.leafs: list[Tensor] = []
        self._seen: set[int] = set()

    def _visit(self, root: Tensor, compute: bool) -> None:
        # iterative DFS (deep graphs would exceed Python's recursion limit)
        stack: list[tuple[Tensor, int]] = [(root, 0)]
        while stack:
            node, i = stack.pop()
            if i == 0:
                if node.op != GGMLOp.NONE and compute:
                    node.flags |= TensorFlag.COMPUTE
                if id(node) in self._seen:
                    if compute:  # make sure sources of an already visited node are flagged too
                        stack.extend((s, 0) for s in node.src
                                     if s is not None and not s.flags & TensorFlag.COMPUTE)
                    continue
                self._seen.add(id(node))
            srcs = node.src
            while i < len(srcs) and srcs[i] is None:
                i += 1
            if i < len(srcs):
                src = srcs[i]
                assert src is not None
                stack.append((node, i + 1))
                stack.append((src, 0))
                continue
            if node.op == GGMLOp.NONE and not node.flags & TensorFlag.PARAM:
                if not node.name:
                    node.name = f"leaf_{len(self.leafs)}"
                self.leafs.append(node)
            else:
                if not node.name:
                    node.name = f"node_{len(self.nodes)}"
                self.nodes.append(node)

    def expand(self, t: Tensor) -> Tensor:
        """ggml_build_forward_expand."""
        self._visit(t, True)
        return t

    def select(self, tensors: Sequence[Tensor], idx: int) -> Tensor:
        """ggml_build_forward_select: all branches are visited, only `idx` is flagged COMPUTE."""
        for i, t in enumerate(tensors):
            self._visit(t, i == idx)
        return tensors[idx]

    def tensors(self) -> Iterable[Tensor]:
        yield from self.leafs
        yield from self.nodes

    def __len__(self) -> int:
        return len(self.nodes)
