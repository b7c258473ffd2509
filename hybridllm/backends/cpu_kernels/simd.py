"""A few SIMD vector values and operations for numba kernels, written as LLVM IR intrinsics.

numba has no vector types and (with its default SLP vectorizer off) does not vectorize the short
int8 dot products of block formats. These intrinsics give kernels explicit vectors that live in
registers: I16x32 block values, their pairwise products as I32x16 (LLVM emits vpmaddwd), F32x16
accumulators (vfmadd). LLVM legalizes the 512-bit shapes to whatever the host has (2 x ymm on AVX2).

Memory operands are (uint8 array, byte offset) pairs: kernels read raw ggml blocks from a buffer.
No bounds checks: callers guarantee the offsets are in range.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import llvmlite.binding as llvm_binding  # type: ignore[import-untyped]
from llvmlite import ir  # type: ignore[import-untyped]
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, models, register_model

_I1, _I8, _I16, _I32, _I64 = ir.IntType(1), ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
_F32, _HALF = ir.FloatType(), ir.HalfType()

HOST_FEATURES = llvm_binding.get_host_cpu_features()
HAS_AVX2 = bool(HOST_FEATURES.get("avx2", False))


class Vec(types.Type):
    """A SIMD register value: `lanes` elements of `elem` ("i16", "i32" or "f32")."""

    def __init__(self, elem: str, lanes: int) -> None:
        self.elem, self.lanes = elem, lanes
        super().__init__(name=f"Vec({elem}x{lanes})")


I16x32 = Vec("i16", 32)
I32x16 = Vec("i32", 16)
F32x16 = Vec("f32", 16)
_ELEM = {"i16": _I16, "i32": _I32, "f32": _F32}


def _llvm_type(t: Vec) -> ir.VectorType:
    return ir.VectorType(_ELEM[t.elem], t.lanes)


@register_model(Vec)
class _VecModel(models.PrimitiveModel):
    def __init__(self, dmm: Any, fe_type: Vec) -> None:
        super().__init__(dmm, fe_type, _llvm_type(fe_type))


# --- IR helpers (Python functions building IR inside an intrinsic's codegen) ----------------------

def vty(elem: ir.Type, n: int) -> ir.VectorType:
    return ir.VectorType(elem, n)


def const_vec(elem: ir.Type, values: list[int] | list[float]) -> ir.Constant:
    return ir.Constant(vty(elem, len(values)), [ir.Constant(elem, v) for v in values])


def splat(builder: ir.IRBuilder, value: ir.Value, n: int) -> ir.Value:
    v = builder.insert_element(ir.Constant(vty(value.type, n), None), value, ir.Constant(_I32, 0))
    return builder.shuffle_vector(v, v, ir.Constant(vty(_I32, n), [0] * n))


def shuffle(builder: ir.IRBuilder, a: ir.Value, b: ir.Value, idx: list[int]) -> ir.Value:
    return builder.shuffle_vector(a, b, const_vec(_I32, idx))


def byte_ptr(context: Any, builder: ir.IRBuilder, aryty: types.Array, ary: ir.Value, off: ir.Value,
             pointee: ir.Type) -> ir.Value:
    """Pointer to `pointee` at byte offset `off` of a 1-D array's data."""
    data = context.make_array(aryty)(context, builder, ary).data
    raw = builder.gep(builder.bitcast(data, _I8.as_pointer()), [off])
    return builder.bitcast(raw, pointee.as_pointer())


def load_bytes(context: Any, builder: ir.IRBuilder, aryty: types.Array, ary: ir.Value, off: ir.Value,
               n: int) -> ir.Value:
    """n bytes at byte offset `off`, as <n x i8> (unaligned load)."""
    return builder.load(byte_ptr(context, builder, aryty, ary, off, vty(_I8, n)), align=1)


def load_scalar(context: Any, builder: ir.IRBuilder, aryty: types.Array, ary: ir.Value, off: ir.Value,
                ty: ir.Type) -> ir.Value:
    return builder.load(byte_ptr(context, builder, aryty, ary, off, ty), align=1)


def nibbles(builder: ir.IRBuilder, b16: ir.Value) -> ir.Value:
    """16 bytes -> <32 x i8>: the 16 low nibbles, then the 16 high nibbles (ggml's 32-block order)."""
    lo = builder.and_(b16, splat(builder, ir.Constant(_I8, 15), 16))
    hi = builder.lshr(b16, splat(builder, ir.Constant(_I8, 4), 16))
    return shuffle(builder, lo, hi, list(range(32)))


def bits_to_bytes(builder: ir.IRBuilder, word: ir.Value, value: int) -> ir.Value:
    """u32 -> <32 x i8>: lane k is `value` where bit k of `word` is set, else 0."""
    hit = builder.bitcast(word, vty(_I1, 32))  # bit k -> lane k (a mask register load on AVX-512)
    return builder.select(hit, splat(builder, ir.Constant(_I8, value), 32), ir.Constant(vty(_I8, 32), None))


def lookup16(builder: ir.IRBuilder, idx: ir.Value, table: list[int]) -> ir.Value:
    """<32 x i8> indices in 0..15 -> <32 x i8> table values (pshufb on AVX2, a select chain otherwise)."""
    if HAS_AVX2:
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vty(_I8, 32), [vty(_I8, 32)] * 2),
                                            "llvm.x86.avx2.pshuf.b")
        tbl = const_vec(_I8, [v & 0xFF for v in table] * 2)
        return builder.call(fn, [tbl, idx])
    out = ir.Constant(vty(_I8, 32), None)
    for k, v in enumerate(table):
        hit = builder.icmp_unsigned("==", idx, splat(builder, ir.Constant(_I8, k), 32))
        out = builder.select(hit, splat(builder, ir.Constant(_I8, v & 0xFF), 32), out)
    return out


def scale_halves(builder: ir.IRBuilder, q: ir.Value, s0: ir.Value, s1: ir.Value) -> ir.Value:
    """<32 x i16> q times s0 in lanes 0..15 and s1 in lanes 16..31 (i16 products, known to fit)."""
    a = splat(builder, builder.trunc(s0, _I16), 16)
    b = splat(builder, builder.trunc(s1, _I16), 16)
    return builder.mul(q, shuffle(builder, a, b, list(range(32))))


def fp16_bits_to_f32(builder: ir.IRBuilder, bits: ir.Value) -> ir.Value:
    return builder.fpext(builder.bitcast(bits, _HALF), _F32)


def _fma(builder: ir.IRBuilder, a: ir.Value, b: ir.Value, c: ir.Value) -> ir.Value:
    t = a.type
    name = f"llvm.fma.v{t.count}f32" if isinstance(t, ir.VectorType) else "llvm.fma.f32"
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(t, [t, t, t]), name)
    return builder.call(fn, [a, b, c])


def _hadd(builder: ir.IRBuilder, v: ir.Value, add: Callable[[ir.Value, ir.Value], ir.Value]) -> ir.Value:
    n = v.type.count
    while n > 1:  # pairwise halving: a fixed, deterministic summation order
        h = n // 2
        v = add(shuffle(builder, v, v, list(range(h))), shuffle(builder, v, v, list(range(h, n))))
        n = h
    return builder.extract_element(v, ir.Constant(_I32, 0))


# --- vector intrinsics usable from @njit code --------------------------------------------------------

@intrinsic
def zero_f32x16(typingctx: Any) -> Any:
    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> ir.Value:
        return ir.Constant(_llvm_type(F32x16), None)
    return F32x16(), codegen


@intrinsic
def zero_i32x16(typingctx: Any) -> Any:
    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> ir.Value:
        return ir.Constant(_llvm_type(I32x16), None)
    return I32x16(), codegen


@intrinsic
def load_i16x32(typingctx: Any, ary: Any, idx: Any) -> Any:
    """32 int16 values ary[idx:idx+32] of a 1-D int16 array."""
    if not (isinstance(ary, types.Array) and ary.dtype == types.int16 and isinstance(idx, types.Integer)):
        return None

    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> ir.Value:
        off = builder.mul(context.cast(builder, args[1], sig.args[1], types.int64), ir.Constant(_I64, 2))
        return builder.load(byte_ptr(context, builder, sig.args[0], args[0], off, _llvm_type(I16x32)), align=2)
    return I16x32(ary, idx), codegen


@intrinsic
def load_f32x16(typingctx: Any, ary: Any, idx: Any) -> Any:
    """16 float32 values ary[idx:idx+16] of a 1-D float32 array."""
    if not (isinstance(ary, types.Array) and ary.dtype == types.float32 and isinstance(idx, types.Integer)):
        return None

    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> ir.Value:
        off = builder.mul(context.cast(builder, args[1], sig.args[1], types.int64), ir.Constant(_I64, 4))
        return builder.load(byte_ptr(context, builder, sig.args[0], args[0], off, _llvm_type(F32x16)), align=4)
    return F32x16(ary, idx), codegen


@intrinsic
def madd(typingctx: Any, a: Any, b: Any) -> Any:
    """Pairwise int16 products summed in int32: lane k = a[2k]*b[2k] + a[2k+1]*b[2k+1] (vpmaddwd)."""
    if a != I16x32 or b != I16x32:
        return None

    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> ir.Value:
        wide = vty(_I32, 32)
        p = builder.mul(builder.sext(args[0], wide), builder.sext(args[1], wide))
        even = shuffle(builder, p, p, list(range(0, 32, 2)))
        odd = shuffle(builder, p, p, list(range(1, 32, 2)))
        return builder.add(even, odd)
    return I32x16(a, b), codegen


@intrinsic
def add_i32(typingctx: Any, a: Any, b: Any) -> Any:
    if a != I32x16 or b != I32x16:
        return None

    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> ir.Value:
        return builder.add(args[0], args[1])
    return I32x16(a, b), codegen


@intrinsic
def fma_i32(typingctx: Any, acc: Any, v: Any, s: Any) -> Any:
    """acc + float(v) * s for an I32x16 v and a float32 scalar s."""
    if acc != F32x16 or v != I32x16 or not isinstance(s, types.Float):
        return None

    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> ir.Value:
        f = builder.sitofp(args[1], _llvm_type(F32x16))
        sv = splat(builder, context.cast(builder, args[2], sig.args[2], types.float32), 16)
        return _fma(builder, f, sv, args[0])
    return F32x16(acc, v, s), codegen


@intrinsic
def fma_f32(typingctx: Any, acc: Any, a: Any, b: Any) -> Any:
    """acc + a * b elementwise (F32x16)."""
    if acc != F32x16 or a != F32x16 or b != F32x16:
        return None

    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> ir.Value:
        return _fma(builder, args[1], args[2], args[0])
    return F32x16(acc, a, b), codegen


@intrinsic
def hsum_f32(typingctx: Any, v: Any) -> Any:
    """Sum of the 16 lanes (pairwise)."""
    if v != F32x16:
        return None

    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> ir.Value:
        return _hadd(builder, args[0], builder.fadd)
    return types.float32(v), codegen


@intrinsic
def hsum_i32(typingctx: Any, v: Any) -> Any:
    if v != I32x16:
        return None

    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> ir.Value:
        return builder.sext(_hadd(builder, args[0], builder.add), _I64)
    return types.int64(v), codegen


@intrinsic
def f16_at(typingctx: Any, buf: Any, off: Any) -> Any:
    """The IEEE half at byte offset `off` of a uint8 array, as float32 (exact)."""
    if not isinstance(buf, types.Array) or not isinstance(off, types.Integer):
        return None

    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> ir.Value:
        o = context.cast(builder, args[1], sig.args[1], types.int64)
        return builder.fpext(load_scalar(context, builder, sig.args[0], args[0], o, _HALF), _F32)
    return types.float32(buf, off), codegen


@intrinsic
def f32_to_f16_bits(typingctx: Any, x: Any) -> Any:
    """float32 -> IEEE half bits, rounding to nearest even (what F16C's vcvtps2ph does in ggml)."""
    if not isinstance(x, types.Float):
        return None

    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> ir.Value:
        h = builder.fptrunc(context.cast(builder, args[0], sig.args[0], types.float32), _HALF)
        return builder.bitcast(h, _I16)
    return types.uint16(x), codegen


@intrinsic
def f16_bits_to_f32(typingctx: Any, bits: Any) -> Any:
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> ir.Value:
        v = args[0]
        if v.type.width != 16:
            v = builder.trunc(v, _I16) if v.type.width > 16 else builder.zext(v, _I16)
        return fp16_bits_to_f32(builder, v)
    return types.float32(bits), codegen


@intrinsic
def f32_bits(typingctx: Any, x: Any) -> Any:
    if x != types.float32:
        return None

    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> ir.Value:
        return builder.bitcast(args[0], _I32)
    return types.uint32(x), codegen


@intrinsic
def f32_from_bits(typingctx: Any, u: Any) -> Any:
    if not isinstance(u, types.Integer):
        return None

    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> ir.Value:
        v = args[0]
        if v.type.width != 32:
            v = builder.trunc(v, _I32) if v.type.width > 32 else builder.zext(v, _I32)
        return builder.bitcast(v, _F32)
    return types.float32(u), codegen


@intrinsic
def literal_value(typingctx: Any, lit: Any) -> Any:
    """The value of an integer literal as an LLVM constant, so comparisons on it fold away at compile
    time (a literal-typed argument is otherwise still compared at run time)."""
    if not isinstance(lit, types.IntegerLiteral):
        return None

    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> ir.Value:
        return ir.Constant(_I64, lit.literal_value)
    return types.int64(lit), codegen


@intrinsic
def atomic_next(typingctx: Any, counter: Any) -> Any:
    """Atomically increment counter[0] (an int64 array) and return its previous value: threads pull
    work items from a shared counter."""
    if not (isinstance(counter, types.Array) and counter.dtype == types.int64):
        return None

    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> ir.Value:
        data = context.make_array(sig.args[0])(context, builder, args[0]).data
        return builder.atomic_rmw("add", data, ir.Constant(_I64, 1), "monotonic")
    return types.int64(counter), codegen


@intrinsic
def add_f32(typingctx: Any, a: Any, b: Any) -> Any:
    if a != F32x16 or b != F32x16:
        return None

    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> ir.Value:
        return builder.fadd(args[0], args[1])
    return F32x16(a, b), codegen


HAS_AVX512BW = bool(HOST_FEATURES.get("avx512bw", False))
# the byte-product kernels need vpmaddubsw; HYBRIDLLM_NO_MADDUBS=1 forces the portable int16 kernels
HAS_MADDUBS = HAS_AVX2 and not os.environ.get("HYBRIDLLM_NO_MADDUBS")
# AVX512-VNNI vpdpbusd: 4 unsigned-by-signed byte products added into each int32 lane, in one instruction
# (HYBRIDLLM_NO_VNNI=1 keeps the AVX2 vpmaddubsw + vpmaddwd sequences)
HAS_VNNI = (HAS_MADDUBS and HAS_AVX512BW and bool(HOST_FEATURES.get("avx512vnni", False))
            and not os.environ.get("HYBRIDLLM_NO_VNNI"))


def maddubs(builder: ir.IRBuilder, u: ir.Value, s: ir.Value) -> ir.Value:
    """<64 x i8> unsigned u times <64 x i8> signed s, adjacent pairs summed -> <32 x i16> (vpmaddubsw).
    Callers keep |u0*s0 + u1*s1| < 2**15, so the instruction's saturation never happens."""
    if HAS_AVX512BW:
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vty(_I16, 32), [vty(_I8, 64)] * 2),
                                            "llvm.x86.avx512.pmaddubs.w.512")
        return builder.call(fn, [u, s])
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vty(_I16, 16), [vty(_I8, 32)] * 2),
                                        "llvm.x86.avx2.pmadd.ub.sw")
    halves = [builder.call(fn, [shuffle(builder, u, u, list(range(k, k + 32))),
                                shuffle(builder, s, s, list(range(k, k + 32)))]) for k in (0, 32)]
    return shuffle(builder, halves[0], halves[1], list(range(32)))


def dot4_u8s8(builder: ir.IRBuilder, acc: ir.Value, u: ir.Value, s: ir.Value) -> ir.Value:
    """acc (<16 x i32>) + per lane k the sum of u[4k+i] * s[4k+i], i < 4 (u unsigned, s signed bytes): exact
    int32 sums (callers keep each pair of products inside int16 for the vpmaddubsw fallback)."""
    if HAS_VNNI:
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(vty(_I32, 16), [vty(_I32, 16), vty(_I8, 64), vty(_I8, 64)]),
            "llvm.x86.avx512.vpdpbusd.512")
        return builder.call(fn, [acc, u, s])
    return builder.add(acc, madd_i16(builder, maddubs(builder, u, s), splat(builder, ir.Constant(_I16, 1), 32)))


def dot2_i16(builder: ir.IRBuilder, acc: ir.Value, a: ir.Value, b: ir.Value) -> ir.Value:
    """acc (<16 x i32>) + pairwise int16 products of a and b (<32 x i16>): vpdpwssd with AVX512-VNNI."""
    if HAS_VNNI:
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(vty(_I32, 16), [vty(_I32, 16), vty(_I16, 32), vty(_I16, 32)]),
            "llvm.x86.avx512.vpdpwssd.512")
        return builder.call(fn, [acc, a, b])
    return builder.add(acc, madd_i16(builder, a, b))


def madd_i16(builder: ir.IRBuilder, a: ir.Value, b: ir.Value) -> ir.Value:
    """<2n x i16> x <2n x i16> -> <n x i32> pairwise sums (LLVM emits vpmaddwd)."""
    n = a.type.count
    wide = vty(_I32, n)
    p = builder.mul(builder.sext(a, wide), builder.sext(b, wide))
    return builder.add(shuffle(builder, p, p, list(range(0, n, 2))), shuffle(builder, p, p, list(range(1, n, 2))))


@intrinsic
def fma_i32_v(typingctx: Any, acc: Any, v: Any, s: Any) -> Any:
    """acc + float(v) * s, lane by lane (v I32x16, s F32x16)."""
    if acc != F32x16 or v != I32x16 or s != F32x16:
        return None

    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> ir.Value:
        return _fma(builder, builder.sitofp(args[1], _llvm_type(F32x16)), args[2], args[0])
    return F32x16(acc, v, s), codegen


@intrinsic
def mul_f32(typingctx: Any, a: Any, b: Any) -> Any:
    if a != F32x16 or b != F32x16:
        return None

    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> ir.Value:
        return builder.fmul(args[0], args[1])
    return F32x16(a, b), codegen


@intrinsic
def atomic_load(typingctx: Any, arr: Any, idx: Any) -> Any:
    """arr[idx] of an int64 array, read atomically (acquire): safe to poll while other threads write."""
    if not (isinstance(arr, types.Array) and arr.dtype == types.int64 and isinstance(idx, types.Integer)):
        return None

    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> ir.Value:
        data = context.make_array(sig.args[0])(context, builder, args[0]).data
        ptr = builder.gep(data, [context.cast(builder, args[1], sig.args[1], types.int64)])
        return builder.load_atomic(ptr, "acquire", 8)
    return types.int64(arr, idx), codegen


@intrinsic
def atomic_add(typingctx: Any, arr: Any, idx: Any, value: Any) -> Any:
    """arr[idx] += value atomically (int64 array); returns the previous value."""
    if not (isinstance(arr, types.Array) and arr.dtype == types.int64 and isinstance(idx, types.Integer)
            and isinstance(value, types.Integer)):
        return None

    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> ir.Value:
        data = context.make_array(sig.args[0])(context, builder, args[0]).data
        ptr = builder.gep(data, [context.cast(builder, args[1], sig.args[1], types.int64)])
        v = context.cast(builder, args[2], sig.args[2], types.int64)
        return builder.atomic_rmw("add", ptr, v, "acq_rel")
    return types.int64(arr, idx, value), codegen


@intrinsic
def cpu_relax(typingctx: Any) -> Any:
    """A spin-wait hint (x86 `pause`; nothing elsewhere)."""
    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> ir.Value:
        if HAS_AVX2:
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), []),
                                                "llvm.x86.sse2.pause")
            builder.call(fn, [])
        return context.get_dummy_value()
    return types.none(), codegen
