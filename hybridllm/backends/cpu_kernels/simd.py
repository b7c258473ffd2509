"""SIMD vector values and operations for numba kernels, written as LLVM IR intrinsics.

numba has no vector types and (with its default SLP vectorizer off) does not vectorize the short int8
dot products of block formats. These intrinsics give kernels explicit vectors that live in registers:
integer lane sums (I32x16 for two 32-element blocks, I32x8 for ggml's 8 lanes), float accumulators of 8
lanes replaying ggml's AVX2 float order (F32x8, F32x4; FMA, hsum_float_8's tree), byte products
(vpmaddubsw / AVX512-VNNI vpdpbusd, vpdpwssd where present), atomics and `pause` for the thread pool.
LLVM legalizes the shapes to whatever the host has.

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
def load_f32x16(typingctx: Any, ary: Any, idx: Any) -> Any:
    """16 float32 values ary[idx:idx+16] of a 1-D float32 array."""
    if not (isinstance(ary, types.Array) and ary.dtype == types.float32 and isinstance(idx, types.Integer)):
        return None

    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> ir.Value:
        off = builder.mul(context.cast(builder, args[1], sig.args[1], types.int64), ir.Constant(_I64, 4))
        return builder.load(byte_ptr(context, builder, sig.args[0], args[0], off, _llvm_type(F32x16)), align=4)
    return F32x16(ary, idx), codegen


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


# --- 8-lane float accumulators in ggml's AVX2 order (bit-exact replays of its vec_dot / sgemm code) -----

F32x8 = Vec("f32", 8)
I32x8 = Vec("i32", 8)
F32x4 = Vec("f32", 4)


def _half16(builder: ir.IRBuilder, v: ir.Value, half: int) -> ir.Value:
    return shuffle(builder, v, v, list(range(8 * half, 8 * half + 8)))


def hsum8_ir(builder: ir.IRBuilder, x: ir.Value) -> ir.Value:
    """ggml's hsum_float_8 (and sgemm's hsum): ((x0+x4) + (x2+x6)) + ((x1+x5) + (x3+x7))."""
    t = builder.fadd(shuffle(builder, x, x, [4, 5, 6, 7]), shuffle(builder, x, x, [0, 1, 2, 3]))
    t = builder.fadd(t, shuffle(builder, t, t, [2, 3, 2, 3]))
    return builder.fadd(builder.extract_element(t, ir.Constant(_I32, 0)),
                        builder.extract_element(t, ir.Constant(_I32, 1)))


@intrinsic
def zero_f32x8(typingctx: Any) -> Any:
    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> ir.Value:
        return ir.Constant(vty(_F32, 8), None)
    return F32x8(), codegen


@intrinsic
def zero_f32x4(typingctx: Any) -> Any:
    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> ir.Value:
        return ir.Constant(vty(_F32, 4), None)
    return F32x4(), codegen


@intrinsic
def fma8_half(typingctx: Any, acc: Any, s: Any, p: Any, half: Any) -> Any:
    """acc + float(s[8h:8h+8]) * p[8h:8h+8] (one FMA, h the literal `half`): a block's step of ggml's
    `acc = _mm256_fmadd_ps(d, q, acc)` when s holds two blocks' 8 lane sums and p their scales."""
    if acc != F32x8 or s != I32x16 or p != F32x16 or not isinstance(half, types.IntegerLiteral):
        return None
    h = int(half.literal_value)

    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> ir.Value:
        f = builder.sitofp(_half16(builder, args[1], h), vty(_F32, 8))
        return _fma(builder, f, _half16(builder, args[2], h), args[0])
    return F32x8(acc, s, p, half), codegen


@intrinsic
def fma8_i32(typingctx: Any, acc: Any, s: Any, d: Any) -> Any:
    """acc + float(s) * d (s I32x8, d a float32 scalar), one FMA per lane."""
    if acc != F32x8 or s != I32x8 or not isinstance(d, types.Float):
        return None

    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> ir.Value:
        f = builder.sitofp(args[1], vty(_F32, 8))
        return _fma(builder, f, splat(builder, context.cast(builder, args[2], sig.args[2], types.float32), 8),
                    args[0])
    return F32x8(acc, s, d), codegen


@intrinsic
def fma4_i32(typingctx: Any, acc: Any, s: Any, d: Any) -> Any:
    """acc + float(s[0:4]) * d for a 4-lane acc (s an I32x8 whose first 4 lanes count)."""
    if acc != F32x4 or s != I32x8 or not isinstance(d, types.Float):
        return None

    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> ir.Value:
        f = builder.sitofp(shuffle(builder, args[1], args[1], [0, 1, 2, 3]), vty(_F32, 4))
        return _fma(builder, f, splat(builder, context.cast(builder, args[2], sig.args[2], types.float32), 4),
                    args[0])
    return F32x4(acc, s, d), codegen


@intrinsic
def add8(typingctx: Any, a: Any, b: Any) -> Any:
    if a != F32x8 or b != F32x8:
        return None

    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> ir.Value:
        return builder.fadd(args[0], args[1])
    return F32x8(a, b), codegen


@intrinsic
def hsum8(typingctx: Any, x: Any) -> Any:
    if x != F32x8:
        return None

    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> ir.Value:
        return hsum8_ir(builder, args[0])
    return types.float32(x), codegen


@intrinsic
def hsum4(typingctx: Any, x: Any) -> Any:
    """(x0+x2) + (x1+x3): ggml's movehl / movehdup reduction of a 4-lane accumulator."""
    if x != F32x4:
        return None

    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> ir.Value:
        t = builder.fadd(args[0], shuffle(builder, args[0], args[0], [2, 3, 2, 3]))
        return builder.fadd(builder.extract_element(t, ir.Constant(_I32, 0)),
                            builder.extract_element(t, ir.Constant(_I32, 1)))
    return types.float32(x), codegen


@intrinsic
def isum8(typingctx: Any, x: Any) -> Any:
    """Sum of 8 int32 lanes (exact) as int64."""
    if x != I32x8:
        return None

    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> ir.Value:
        return builder.sext(_hadd(builder, args[0], builder.add), _I64)
    return types.int64(x), codegen


@intrinsic
def fma_f(typingctx: Any, a: Any, b: Any, c: Any) -> Any:
    """a*b + c with one rounding (scalar float32): what GCC makes of ggml's `c += a*b`."""
    if not all(isinstance(t, types.Float) for t in (a, b, c)):
        return None

    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> ir.Value:
        v = [context.cast(builder, x, t, types.float32) for x, t in zip(args, sig.args)]
        return _fma(builder, v[0], v[1], v[2])
    return types.float32(a, b, c), codegen


@intrinsic
def fma8(typingctx: Any, acc: Any, a: Any, b: Any) -> Any:
    """a*b + acc, one rounding per lane (F32x8)."""
    if acc != F32x8 or a != F32x8 or b != F32x8:
        return None

    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> ir.Value:
        return _fma(builder, args[1], args[2], args[0])
    return F32x8(acc, a, b), codegen


@intrinsic
def load_f32x8(typingctx: Any, ary: Any, idx: Any, count: Any) -> Any:
    """float32 ary[idx:idx+count] (count <= 8; lanes past it are 0) of a 1-D float32 array."""
    if not (isinstance(ary, types.Array) and ary.dtype == types.float32 and isinstance(idx, types.Integer)
            and isinstance(count, types.Integer)):
        return None

    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> ir.Value:
        off = builder.mul(context.cast(builder, args[1], sig.args[1], types.int64), ir.Constant(_I64, 4))
        ptr = byte_ptr(context, builder, sig.args[0], args[0], off, vty(_F32, 8))
        return masked_load(builder, ptr, context.cast(builder, args[2], sig.args[2], types.int64), vty(_F32, 8))
    return F32x8(ary, idx, count), codegen


def masked_load(builder: ir.IRBuilder, ptr: ir.Value, count: ir.Value, vt: ir.VectorType) -> ir.Value:
    """The first `count` lanes at ptr (the rest 0, never touched in memory); a plain load when count >= n."""
    n = vt.count
    lanes = const_vec(_I64, list(range(n)))
    mask = builder.icmp_signed("<", lanes, splat(builder, count, n))
    fn = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(vt, [ptr.type, _I32, vty(_I1, n), vt]),
        f"llvm.masked.load.v{n}{'f32' if vt.element == _F32 else 'i16'}.p0")
    return builder.call(fn, [ptr, ir.Constant(_I32, 1), mask, ir.Constant(vt, None)])


@intrinsic
def reduce_dot4(typingctx: Any, x0: Any, x1: Any, x2: Any, x3: Any) -> Any:
    """GGML_F32x8_REDUCE of ggml_vec_dot_f32/f16's four accumulators: x0+=x2, x1+=x3, x0+=x1, then
    t = lo4 + hi4 and (t0+t1) + (t2+t3) (two hadds)."""
    if not all(t == F32x8 for t in (x0, x1, x2, x3)):
        return None

    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> ir.Value:
        a, b, c, d = args
        x = builder.fadd(builder.fadd(a, c), builder.fadd(b, d))
        t = builder.fadd(shuffle(builder, x, x, [0, 1, 2, 3]), shuffle(builder, x, x, [4, 5, 6, 7]))
        e = [builder.extract_element(t, ir.Constant(_I32, k)) for k in range(4)]
        return builder.fadd(builder.fadd(e[0], e[1]), builder.fadd(e[2], e[3]))
    return types.float32(x0, x1, x2, x3), codegen


@intrinsic
def lo8(typingctx: Any, s: Any) -> Any:
    """Lanes 0-7 of an I32x16 as I32x8."""
    if s != I32x16:
        return None

    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> ir.Value:
        return _half16(builder, args[0], 0)
    return I32x8(s), codegen


I32x4 = Vec("i32", 4)


@intrinsic
def isum8x4(typingctx: Any, a: Any, b: Any, c: Any, d: Any) -> Any:
    """The exact sums of four I32x8 as one I32x4 (lane i: vector i)."""
    if not all(t == I32x8 for t in (a, b, c, d)):
        return None

    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> ir.Value:
        ab = builder.add(shuffle(builder, args[0], args[1], list(range(0, 16, 2))),
                         shuffle(builder, args[0], args[1], list(range(1, 16, 2))))      # a 4 | b 4
        cd = builder.add(shuffle(builder, args[2], args[3], list(range(0, 16, 2))),
                         shuffle(builder, args[2], args[3], list(range(1, 16, 2))))
        x = builder.add(shuffle(builder, ab, cd, list(range(0, 16, 2))),
                        shuffle(builder, ab, cd, list(range(1, 16, 2))))                 # a2 b2 c2 d2
        return builder.add(shuffle(builder, x, x, [0, 2, 4, 6]), shuffle(builder, x, x, [1, 3, 5, 7]))
    return I32x4(a, b, c, d), codegen


@intrinsic
def tiled_step4(typingctx: Any, fmt: Any, acc: Any, s: Any, m: Any, d: Any, dmin: Any, y0: Any, y1: Any,
                y2: Any, y3: Any) -> Any:
    """ggml's tiled-kernel update for four outputs at once (lane i, exactly as its scalar/AVX2 code):
    r = d*float(s); r = fma(-dmin, float(m), r) for types with mins; acc = fma(r, y_i, acc)."""
    if (acc != F32x4 or s != I32x4 or m != I32x4 or not isinstance(fmt, types.IntegerLiteral)):
        return None
    use_min = int(fmt.literal_value) in (10, 12, 13)  # Q2_K, Q4_K, Q5_K

    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> ir.Value:
        f4 = vty(_F32, 4)
        sc = [context.cast(builder, args[k], sig.args[k], types.float32) for k in range(4, 10)]
        r = builder.fmul(splat(builder, sc[0], 4), builder.sitofp(args[2], f4))
        if use_min:
            r = _fma(builder, splat(builder, builder.fneg(sc[1]), 4), builder.sitofp(args[3], f4), r)
        y = ir.Constant(f4, None)
        for i in range(4):
            y = builder.insert_element(y, sc[2 + i], ir.Constant(_I32, i))
        return _fma(builder, r, y, args[1])
    return F32x4(fmt, acc, s, m, d, dmin, y0, y1, y2, y3), codegen


@intrinsic
def lane4(typingctx: Any, v: Any, i: Any) -> Any:
    if v != F32x4 or not isinstance(i, types.IntegerLiteral):
        return None
    k = int(i.literal_value)

    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> ir.Value:
        return builder.extract_element(args[0], ir.Constant(_I32, k))
    return types.float32(v, i), codegen
