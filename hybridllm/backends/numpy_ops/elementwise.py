"""Elementwise ops: ADD SUB MUL DIV ADD1 SCALE CLAMP SQR SQRT LOG SIN COS LEAKY_RELU UNARY GLU.

Also the float I/O and broadcast helpers the other op modules share. Numerics follow ggml's CPU backend:
every value is converted to f32, the op runs in f32 and the result is rounded to the destination type
(F16 round-to-nearest-even, BF16 as common.f32_to_bf16). GELU and GELU_QUICK go through ggml's 65536-entry
F16 tables (input rounded to F16, F16 result).
"""
from __future__ import annotations

import functools
import math
from typing import Callable

import numpy as np
from numpy.lib.stride_tricks import as_strided

from ...ggml.tensor import Tensor
from ...ggml.types import GGMLOp, GGMLType, GluOp, UnaryOp, type_name
from ..base import Unsupported
from . import Kernel, register
from .common import bf16_to_f32, f32_to_bf16, require, view

FLOAT_TYPES = (GGMLType.F32, GGMLType.F16, GGMLType.BF16)
F32 = np.float32


# --- float I/O -------------------------------------------------------------------------------------

def njit_in_place(namespace: dict, *names: str) -> None:
    """numba-compile module-level functions, replacing them in their module, in order (a kernel may call
    the ones named before it). cache=True keeps the machine code on disk, so later processes only load it.
    Compiling lazily keeps numba's import and compile time out of processes that never run these ops."""
    import numba
    from numba.core.registry import CPUDispatcher
    for name in names:
        if not isinstance(namespace[name], CPUDispatcher):
            namespace[name] = numba.njit(cache=True)(namespace[name])


def _f16_convert(bits: np.ndarray, lut: np.ndarray, out: np.ndarray) -> None:  # numba
    n3, n2, n1, n0 = bits.shape
    for i3 in range(n3):
        for i2 in range(n2):
            for i1 in range(n1):
                for i0 in range(n0):
                    out[i3, i2, i1, i0] = lut[bits[i3, i2, i1, i0]]


@functools.cache
def _f16_converter() -> Callable[[np.ndarray, np.ndarray, np.ndarray], None]:
    njit_in_place(globals(), "_f16_convert")
    return globals()["_f16_convert"]


@functools.cache
def f16_table() -> np.ndarray:
    """The float32 value of every F16 bit pattern."""
    return np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(F32)


def f16_to_f32(v: np.ndarray) -> np.ndarray:
    """A 4-D (possibly strided) float16 view as a new C-contiguous float32 array, ~5x faster than astype
    (a numba loop over a 256 KiB table); small arrays use astype."""
    if v.size < 4096 or v.ndim != 4:
        return v.astype(F32)
    out = np.empty(v.shape, F32)
    _f16_converter()(v.view(np.uint16), f16_table(), out)
    return out


def f32_source(t: Tensor) -> Callable[[], np.ndarray]:
    """A zero-arg reader of t's values as float32 (ne3, ne2, ne1, ne0): the view itself for F32."""
    v = view(t)
    if t.type == GGMLType.F32:
        return lambda: v
    if t.type == GGMLType.F16:
        return lambda: f16_to_f32(v)
    if t.type == GGMLType.BF16:
        return lambda: bf16_to_f32(v)
    raise Unsupported(f"tensor {t.name!r}: type {type_name(t.type)} is not a float type")


def f32_store(t: Tensor) -> Callable[[np.ndarray], None]:
    """A writer of float32 values (broadcastable to t's shape) into t with ggml's rounding."""
    v = view(t)
    if t.type == GGMLType.F32:
        return lambda x: np.copyto(v, x, casting="same_kind")
    if t.type == GGMLType.F16:
        def store16(x: np.ndarray) -> None:
            with np.errstate(over="ignore"):   # out of range becomes inf, as in ggml
                np.copyto(v, x, casting="same_kind")
        return store16
    if t.type == GGMLType.BF16:
        return lambda x: np.copyto(v, f32_to_bf16(np.broadcast_to(x, v.shape)))
    raise Unsupported(f"tensor {t.name!r}: type {type_name(t.type)} is not a float type")


def require_float(node: Tensor, *ts: Tensor | None) -> None:
    for t in ts:
        if t is not None and t.type not in FLOAT_TYPES:
            raise Unsupported(f"{node.op.name} {node.name!r}: {type_name(t.type)} operand {t.name!r} "
                              f"(only f32/f16/bf16)")


def same_shape(node: Tensor, a: Tensor) -> None:
    require(a.ne == node.ne, node, f"source shape {a.ne} differs from result shape {node.ne}")


def split_broadcast(bigs: list[np.ndarray], small: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """Views implementing ggml's modulo broadcast of `small` over `bigs` (all (ne3, ne2, ne1, ne0)).

    Where small's dim m divides big's dim n with 1 < m < n, the big axis becomes (n/m, m) and small
    gets a stride-0 axis in front, so plain numpy broadcasting does the tiling. No data moves.
    """
    shape_b: list[int] = []
    strides_b: list[list[int]] = [[] for _ in bigs]
    shape_s: list[int] = []
    strides_s: list[int] = []
    for ax in range(small.ndim):
        n, m = bigs[0].shape[ax], small.shape[ax]
        if m == n or m == 1:
            shape_b.append(n)
            shape_s.append(m)
            strides_s.append(small.strides[ax])
            for j, b in enumerate(bigs):
                strides_b[j].append(b.strides[ax])
        else:
            shape_b += [n // m, m]
            shape_s += [1, m]
            strides_s += [0, small.strides[ax]]
            for j, b in enumerate(bigs):
                strides_b[j] += [m * b.strides[ax], b.strides[ax]]
    return ([as_strided(b, shape_b, tuple(s)) for b, s in zip(bigs, strides_b)],
            as_strided(small, shape_s, tuple(strides_s)))


def can_repeat(node: Tensor, small: Tensor, big_ne: tuple[int, ...]) -> None:
    ok = all(m > 0 and n % m == 0 for n, m in zip(big_ne, small.ne))
    require(ok, node, f"{small.ne} cannot be broadcast to {tuple(big_ne)}")


# --- binary ops ------------------------------------------------------------------------------------

_BINARY = {GGMLOp.ADD: np.add, GGMLOp.SUB: np.subtract, GGMLOp.MUL: np.multiply, GGMLOp.DIV: np.divide}


@register(GGMLOp.ADD, GGMLOp.SUB, GGMLOp.MUL, GGMLOp.DIV)
def build_binary(node: Tensor) -> Kernel:
    a, b = node.src[0], node.src_at(1)
    require(a is not None and b is not None, node, "needs two sources")
    assert a is not None and b is not None
    require_float(node, a, b, node)
    same_shape(node, a)
    can_repeat(node, b, node.ne)
    ufunc = _BINARY[node.op]
    (d, x), y = split_broadcast([view(node), view(a)], view(b))
    if all(t.type == GGMLType.F32 for t in (node, a, b)):
        return lambda: ufunc(x, y, out=d)
    if GGMLType.BF16 not in (node.type, a.type, b.type):
        # numpy evaluates in f32 and rounds once into the f16 destination, as ggml does
        return lambda: ufunc(x, y, out=d, dtype=F32, casting="same_kind")
    cx = (lambda: bf16_to_f32(x)) if a.type == GGMLType.BF16 else (lambda: x)
    cy = (lambda: bf16_to_f32(y)) if b.type == GGMLType.BF16 else (lambda: y)
    if node.type == GGMLType.BF16:
        return lambda: np.copyto(d, f32_to_bf16(ufunc(cx(), cy(), dtype=F32)))
    return lambda: ufunc(cx(), cy(), out=d, dtype=F32, casting="same_kind")


@register(GGMLOp.ADD_ID)
def build_add_id(node: Tensor) -> Kernel:
    """dst[:, i1, i2] = a[:, i1, i2] + b[:, ids[i1, i2]] (per-expert biases, gpt-oss)."""
    from .rows import check_indices
    a, b, ids = node.src_at(0), node.src_at(1), node.src_at(2)
    require(a is not None and b is not None and ids is not None, node, "needs a, b and ids")
    assert a is not None and b is not None and ids is not None
    require(a.type == b.type == node.type == GGMLType.F32 and ids.type == GGMLType.I32, node,
            "f32 operands and i32 ids only")
    same_shape(node, a)
    require(b.ne[0] == a.ne[0] and ids.ne[0] == a.ne[1] and ids.ne[1] == a.ne[2], node,
            f"b {b.ne} / ids {ids.ne} do not fit {a.ne}")
    x, bv, iv, d = view(a), view(b)[:, 0], view(ids)[:, 0], view(node)   # bv (ne13, ne11, n), iv (1, i2, i1)
    n_rows = b.ne[1]

    def kernel() -> None:
        check_indices(iv, n_rows, node)
        np.add(x, bv[0][iv[0]][None], out=d)
    return kernel


@register(GGMLOp.ADD1)
def build_add1(node: Tensor) -> Kernel:
    a, b = node.src[0], node.src_at(1)
    require(a is not None and b is not None and b.nelements == 1, node, "needs a tensor and a scalar")
    assert a is not None and b is not None
    require_float(node, a, b, node)
    same_shape(node, a)
    rd, rs, store = f32_source(a), f32_source(b), f32_store(node)
    return lambda: store(rd() + rs().reshape(()))


# --- scale / clamp / simple math ----------------------------------------------------------------------

def _unary_kernel(node: Tensor, fn: Callable[[np.ndarray], np.ndarray]) -> Kernel:
    src = node.src[0]
    require(src is not None, node, "needs a source")
    assert src is not None
    require_float(node, src, node)
    same_shape(node, src)
    rd, store = f32_source(src), f32_store(node)
    return lambda: store(fn(rd()))


@register(GGMLOp.SCALE)
def build_scale(node: Tensor) -> Kernel:
    s, b = F32(node.param_f32(0)), F32(node.param_f32(1))
    if b == 0:
        return _unary_kernel(node, lambda x: x * s)
    # ggml fuses x*s + b (FMA); a double product rounded once reproduces it
    s64, b64 = np.float64(s), np.float64(b)
    return _unary_kernel(node, lambda x: (x.astype(np.float64) * s64 + b64).astype(F32))


@register(GGMLOp.CLAMP)
def build_clamp(node: Tensor) -> Kernel:
    lo, hi = F32(node.param_f32(0)), F32(node.param_f32(1))
    # ggml: MAX(MIN(x, hi), lo) with C comparisons; fmin/fmax give the same result for NaN x
    return _unary_kernel(node, lambda x: np.fmax(np.fmin(x, hi), lo))


@register(GGMLOp.LEAKY_RELU)
def build_leaky_relu(node: Tensor) -> Kernel:
    ns = F32(node.param_f32(0))
    return _unary_kernel(node, lambda x: np.where(x > 0, x, F32(0)) + ns * np.where(x < 0, x, F32(0)))


@register(GGMLOp.SQR, GGMLOp.SQRT, GGMLOp.LOG, GGMLOp.SIN, GGMLOp.COS)
def build_math(node: Tensor) -> Kernel:
    fn = {GGMLOp.SQR: np.square, GGMLOp.SQRT: np.sqrt, GGMLOp.LOG: libm(np.log), GGMLOp.SIN: libm(np.sin),
          GGMLOp.COS: libm(np.cos)}[node.op]

    def guarded(x: np.ndarray) -> np.ndarray:
        with np.errstate(all="ignore"):
            return fn(x)
    return _unary_kernel(node, guarded)


# --- GELU tables and unary functions -----------------------------------------------------------------

_GELU_COEF_A = F32(0.044715)
_GELU_QUICK_COEF = F32(-1.702)
_SQRT_2_OVER_PI = F32(0.79788456080286535587989211986876)
_SQRT_2_INV = F32(0.70710678118654752440084436210484)


def libm(fn: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
    """A float32 libm function (expf, tanhf, ...) exactly as glibc computes it, which is what ggml's scalar
    code calls: numba's float32 math functions call glibc (numpy's float32 SIMD versions differ, and so
    does rounding the double result: tanhf in ~5% of cases)."""
    code = _GLIBC[fn.__name__]

    def call(x: np.ndarray) -> np.ndarray:
        a = np.ascontiguousarray(x, dtype=F32)
        out = np.empty(a.shape, F32)
        _glibc_kernel()(a.reshape(-1), out.reshape(-1), code)
        return out
    return call


_GLIBC = {"exp": 0, "log": 1, "tanh": 2, "sin": 3, "cos": 4, "expm1": 5}


def _glibc_map(x: np.ndarray, y: np.ndarray, code: int) -> None:  # numba
    """y = f(x) for float32 x with glibc's f (numba lowers float32 math.* to expf, logf, ...)."""
    for i in range(x.size):
        v = x[i]
        if code == 0:
            y[i] = math.exp(v)
        elif code == 1:
            y[i] = math.log(v) if v >= 0 else np.float32(np.nan)
        elif code == 2:
            y[i] = math.tanh(v)
        elif code == 3:
            y[i] = math.sin(v)
        elif code == 4:
            y[i] = math.cos(v)
        else:
            y[i] = math.expm1(v)


@functools.cache
def _glibc_kernel() -> Callable[[np.ndarray, np.ndarray, int], None]:
    njit_in_place(globals(), "_glibc_map")
    return globals()["_glibc_map"]


exp32, log32, tanh32 = libm(np.exp), libm(np.log), libm(np.tanh)


def fma32(a: np.ndarray, b: np.ndarray | np.floating, c: np.ndarray | np.floating) -> np.ndarray:
    """Fused a*b + c rounded once to float32 (the C compiler contracts such expressions in ggml)."""
    return (np.asarray(a, np.float64) * np.float64(b) + np.asarray(c, np.float64)).astype(F32)


def gelu_f32(x: np.ndarray) -> np.ndarray:
    """ggml_gelu_f32 in float32 (tanh approximation), with the FMA contraction ggml's build applies."""
    x = x.astype(F32, copy=False)
    inner = _SQRT_2_OVER_PI * x * fma32(_GELU_COEF_A * x, x, F32(1))
    return F32(0.5) * x * (F32(1) + tanh32(inner))


def gelu_quick_f32(x: np.ndarray) -> np.ndarray:
    x = x.astype(F32, copy=False)
    return x * (F32(1) / (F32(1) + exp32(_GELU_QUICK_COEF * x)))


@functools.cache
def gelu_table() -> np.ndarray:
    """ggml_table_gelu_f16 as float32 values: gelu of every F16 bit pattern, rounded to F16."""
    x = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(F32)
    with np.errstate(all="ignore"):
        return gelu_f32(x).astype(np.float16).astype(F32)


@functools.cache
def gelu_quick_table() -> np.ndarray:
    x = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(F32)
    with np.errstate(all="ignore"):
        return gelu_quick_f32(x).astype(np.float16).astype(F32)


def f16_bits(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).view(np.uint16)


def gelu_via_table(x: np.ndarray, clamp: bool) -> np.ndarray:
    """ggml's table GELU: F32 inputs are clamped (<= -10 -> 0, >= 10 -> x), F16 inputs are not."""
    y = gelu_table().take(f16_bits(x))
    if clamp:
        y = np.where(x >= 10, x, np.where(x <= -10, F32(0), y))
    return y


def _erf_scalar(x: float) -> float:  # numba
    return math.erf(x)


@functools.cache
def _erf_ufunc() -> Callable[[np.ndarray], np.ndarray]:
    import numba
    return numba.vectorize(["float32(float32)"], cache=True)(_erf_scalar)


def gelu_erf(x: np.ndarray) -> np.ndarray:
    return F32(0.5) * x * (F32(1) + _erf_ufunc()(x * _SQRT_2_INV))


def silu(x: np.ndarray) -> np.ndarray:
    """ggml_vec_silu_f32 row by row: its AVX2 expf in blocks of 8 lanes, glibc's expf for a row's tail."""
    out = np.empty(x.shape, F32)
    _silu_rows()(np.asarray(x, F32), out)
    return out


def swiglu(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """ggml_vec_swiglu_f32 row by row (silu as above, times the gate)."""
    out = np.empty(np.broadcast_shapes(a.shape, b.shape), F32)
    _swiglu_rows()(np.asarray(a, F32), np.asarray(b, F32), out)
    return out


silu_row = swiglu_row = None   # ggml_math's jitted row kernels, bound before the callers compile


def _silu_rows_impl(x: np.ndarray, y: np.ndarray) -> None:  # numba
    n3, n2, n1, _ = x.shape
    for i3 in range(n3):
        for i2 in range(n2):
            for i1 in range(n1):
                silu_row(x[i3, i2, i1], y[i3, i2, i1])


def _swiglu_rows_impl(a: np.ndarray, b: np.ndarray, y: np.ndarray) -> None:  # numba
    n3, n2, n1, _ = a.shape
    for i3 in range(n3):
        for i2 in range(n2):
            for i1 in range(n1):
                swiglu_row(a[i3, i2, i1], b[i3, i2, i1], y[i3, i2, i1])


@functools.cache
def _silu_rows() -> Callable[[np.ndarray, np.ndarray], None]:
    from . import ggml_math
    globals()["silu_row"] = ggml_math.compiled()["silu_row"]
    return ggml_math.jit(_silu_rows_impl)


@functools.cache
def _swiglu_rows() -> Callable[[np.ndarray, np.ndarray, np.ndarray], None]:
    from . import ggml_math
    globals()["swiglu_row"] = ggml_math.compiled()["swiglu_row"]
    return ggml_math.jit(_swiglu_rows_impl)


def silu_libm(x: np.ndarray) -> np.ndarray:
    """The scalar form ggml uses for F16/BF16 rows (glibc expf)."""
    return x / (F32(1) + exp32(-x))


def _round_half_away(x: np.ndarray) -> np.ndarray:
    t = np.trunc(x)
    return np.where(np.abs(x - t) >= F32(0.5), t + np.sign(x), t)


def _softplus(x: np.ndarray) -> np.ndarray:
    return np.where(x > 20, x, log32(F32(1) + exp32(x)))


def _xielu(node: Tensor) -> Callable[[np.ndarray], np.ndarray]:
    an, ap, beta, eps = (F32(node.param_f32(i)) for i in (1, 2, 3, 4))

    def fn(x: np.ndarray) -> np.ndarray:   # both branches are contracted to FMAs in ggml's build
        neg = fma32(libm(np.expm1)(np.minimum(x, eps)) - x, an, beta * x)
        return np.where(x > 0, fma32(ap * x, x, beta * x), neg)
    return fn


def _unary_fn(node: Tensor, op: int, kind: GGMLType) -> Callable[[np.ndarray], np.ndarray]:
    zero, one = F32(0), F32(1)
    fns: dict[int, Callable[[np.ndarray], np.ndarray]] = {
        UnaryOp.ABS: np.abs,
        UnaryOp.SGN: lambda x: np.where(x > 0, one, np.where(x < 0, -one, zero)),
        UnaryOp.NEG: np.negative,
        UnaryOp.STEP: lambda x: np.where(x > 0, one, zero),
        UnaryOp.TANH: tanh32,
        UnaryOp.ELU: lambda x: np.where(x > 0, x, libm(np.expm1)(x)),
        UnaryOp.RELU: lambda x: np.where(x > 0, x, zero),
        UnaryOp.SIGMOID: lambda x: one / (one + exp32(-x)),
        UnaryOp.SILU: silu if kind == GGMLType.F32 else silu_libm,
        UnaryOp.HARDSWISH: lambda x: x * np.fmin(one, np.fmax(zero, (x + F32(3)) / F32(6))),
        UnaryOp.HARDSIGMOID: lambda x: np.fmin(one, np.fmax(zero, (x + F32(3)) / F32(6))),
        UnaryOp.EXP: exp32,
        UnaryOp.EXPM1: lambda x: exp32(x) - one,   # ggml: expf(x) - 1, not expm1
        UnaryOp.SOFTPLUS: _softplus,
        UnaryOp.GELU_ERF: gelu_erf,
        UnaryOp.FLOOR: np.floor, UnaryOp.CEIL: np.ceil, UnaryOp.ROUND: _round_half_away,
        UnaryOp.TRUNC: np.trunc,
    }
    if op == UnaryOp.GELU:
        if kind == GGMLType.BF16:
            return gelu_f32
        return lambda x: gelu_via_table(x, clamp=kind == GGMLType.F32)
    if op == UnaryOp.GELU_QUICK:
        if kind == GGMLType.BF16:
            return gelu_quick_f32
        return lambda x: gelu_quick_table().take(f16_bits(x))
    if op == UnaryOp.XIELU:
        return _xielu(node)
    fn = fns.get(op)
    if fn is None:
        raise Unsupported(f"UNARY {node.name!r}: unary op {op} is not implemented")
    return fn


@register(GGMLOp.UNARY)
def build_unary(node: Tensor) -> Kernel:
    src = node.src[0]
    require(src is not None, node, "needs a source")
    assert src is not None
    fn = _unary_fn(node, node.param_i32(0), src.type)

    def guarded(x: np.ndarray) -> np.ndarray:
        with np.errstate(all="ignore"):
            return fn(x)
    return _unary_kernel(node, guarded)


# --- GLU ---------------------------------------------------------------------------------------------

def _glu_fn(node: Tensor, op: int, kind: GGMLType) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    alpha, limit = F32(node.param_f32(2)), F32(node.param_f32(3))
    zero, one = F32(0), F32(1)

    def geglu(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        if kind == GGMLType.BF16:
            return gelu_f32(a) * b
        y = gelu_table().take(f16_bits(a)) * b
        if kind == GGMLType.F32:   # the F32 kernel clamps; its >= 10 branch is a*b
            y = np.where(a >= 10, a * b, np.where(a <= -10, zero, y))
        return y

    def geglu_quick(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        if kind == GGMLType.BF16:
            return gelu_quick_f32(a) * b
        return gelu_quick_table().take(f16_bits(a)) * b

    def swiglu_oai(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        x = np.minimum(a, limit)
        y = np.clip(b, -limit, limit)
        return x / (one + np.exp(alpha * -x)) * (y + one)

    def swiglu_clamp(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        g = np.minimum(a, limit)
        return g / (one + np.exp(-g)) * np.clip(b, -limit, limit)

    fns: dict[int, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
        GluOp.REGLU: lambda a, b: np.where(a > 0, a * b, zero),
        GluOp.GEGLU: geglu,
        GluOp.SWIGLU: swiglu if kind == GGMLType.F32 else (lambda a, b: silu_libm(a) * b),
        GluOp.SWIGLU_OAI: swiglu_oai,
        GluOp.GEGLU_ERF: lambda a, b: gelu_erf(a) * b,
        GluOp.GEGLU_QUICK: geglu_quick,
        GluOp.SWIGLU_CLAMP: swiglu_clamp,
    }
    fn = fns.get(op)
    if fn is None:
        raise Unsupported(f"GLU {node.name!r}: glu op {op} is not implemented")
    return fn


def _geglu_rows(a: np.ndarray, b: np.ndarray, out: np.ndarray, tab: np.ndarray) -> None:  # numba
    """F32 GEGLU in one pass (gemma's FFN activation): table GELU by the input's F16 bits, ggml's clamps."""
    cell = np.empty(1, np.float32)
    bits = cell.view(np.uint32)
    n3, n2, n1, n0 = a.shape
    for i3 in range(n3):
        for i2 in range(n2):
            for i1 in range(n1):
                for i0 in range(n0):
                    x = a[i3, i2, i1, i0]
                    g = b[i3, i2, i1, i0]
                    if x <= -10.0:
                        out[i3, i2, i1, i0] = 0.0
                    elif x >= 10.0:
                        out[i3, i2, i1, i0] = x * g
                    else:            # F16 bits of x, round to nearest even (|x| < 10: no overflow)
                        cell[0] = x
                        u = bits[0]
                        sign = (u >> np.uint32(16)) & np.uint32(0x8000)
                        m = u & np.uint32(0x7FFFFFFF)
                        if m > np.uint32(0x7F800000):
                            h = sign | np.uint32(0x7E00) | ((m >> np.uint32(13)) & np.uint32(0x3FF))
                        elif m >= np.uint32(0x38800000):
                            r = m - np.uint32(0x38000000)
                            h = sign | ((r + np.uint32(0xFFF) + ((r >> np.uint32(13)) & np.uint32(1))) >> np.uint32(13))
                        else:
                            q = abs(np.float64(x)) * 16777216.0
                            f = np.floor(q)
                            if q - f > 0.5 or (q - f == 0.5 and f % 2.0 == 1.0):
                                f += 1.0
                            h = sign | np.uint32(f)
                        out[i3, i2, i1, i0] = tab[h] * g


@functools.cache
def _geglu_f32() -> Callable[..., None]:
    njit_in_place(globals(), "_geglu_rows")
    return globals()["_geglu_rows"]


@register(GGMLOp.GLU)
def build_glu(node: Tensor) -> Kernel:
    a, b = node.src[0], node.src_at(1)
    require(a is not None, node, "needs a source")
    assert a is not None
    require_float(node, a, b, node)
    nc = node.ne[0]
    if b is not None:
        require(b.ne == a.ne and b.type == a.type, node, "both halves need the same shape and type")
        require(a.ne == node.ne, node, f"source shape {a.ne} differs from result shape {node.ne}")
        ra, rb = f32_source(a), f32_source(b)
    else:
        require(a.ne[0] == 2 * nc and a.ne[1:] == node.ne[1:], node, f"source {a.ne} is not 2x {node.ne}")
        whole = f32_source(a)
        first, second = (slice(nc, 2 * nc), slice(0, nc)) if node.param_i32(1) else (slice(0, nc),
                                                                                        slice(nc, 2 * nc))
        ra, rb = (lambda: whole()[..., first]), (lambda: whole()[..., second])
    fn = _glu_fn(node, node.param_i32(0), a.type)
    store = f32_store(node)
    if node.param_i32(0) == GluOp.GEGLU and a.type == node.type == GGMLType.F32:
        geglu, tab, out = _geglu_f32(), gelu_table(), view(node)
        return lambda: geglu(ra(), rb(), out, tab)

    def kernel() -> None:
        with np.errstate(all="ignore"):
            store(fn(ra(), rb()))
    return kernel
