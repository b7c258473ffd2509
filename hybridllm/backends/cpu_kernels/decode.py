"""Block decoders for the matmul kernels: ggml weight blocks -> I16x32 integer vectors.

`fmt` is always a compile-time literal GGMLType id, so each kernel specialization contains only its
format's code. Decoded values are the integers ggml's vec_dot multiplies with the int8 activations
(e.g. q-8 for Q4_0, kvalues for IQ4_NL), so kernels reproduce ggml's integer sums exactly; the float
scales are applied by the kernels. Layouts: /work/shared/spec/quant-formats.md.
"""
from __future__ import annotations

from typing import Any

from llvmlite import ir  # type: ignore[import-untyped]
from numba import types
from numba.extending import intrinsic

from ...ggml.types import GGMLType
from .simd import (
    _F32,
    _HALF,
    _I8,
    _I16,
    _I32,
    _I64,
    HAS_MADDUBS,
    F32x16,
    I16x32,
    I32x16,
    _llvm_type,
    bits_to_bytes,
    byte_ptr,
    dot4_u8s8,
    fp16_bits_to_f32,
    load_bytes,
    load_scalar,
    lookup16,
    nibbles,
    shuffle,
    splat,
    vty,
)

_QS_AT: dict[int, int] = {GGMLType.Q4_0: 2, GGMLType.Q4_1: 4, GGMLType.Q5_0: 6, GGMLType.Q5_1: 8}
KVALUES_IQ4NL = [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113]
KVALUES_FP4 = [0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12]

Q32_FORMATS = (GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1, GGMLType.Q8_0,
               GGMLType.IQ4_NL, GGMLType.MXFP4)
K_FORMATS = (GGMLType.Q2_K, GGMLType.Q3_K, GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K, GGMLType.IQ4_XS)
F_FORMATS = (GGMLType.F32, GGMLType.F16, GGMLType.BF16)


def _literal(fmt: Any, allowed: tuple[int, ...]) -> int | None:
    if isinstance(fmt, types.IntegerLiteral) and fmt.literal_value in allowed:
        return int(fmt.literal_value)
    return None


def _i64(context: Any, builder: ir.IRBuilder, v: ir.Value, ty: Any) -> ir.Value:
    return context.cast(builder, v, ty, types.int64)


def _add(builder: ir.IRBuilder, off: ir.Value, k: int) -> ir.Value:
    return builder.add(off, ir.Constant(_I64, k))


def _u8(builder: ir.IRBuilder, v: int) -> ir.Value:
    return splat(builder, ir.Constant(_I8, v), 32)


@intrinsic
def dec_q32(typingctx: Any, fmt: Any, buf: Any, off: Any) -> Any:
    """The 32 integer values of the 32-element block at byte `off` (element order)."""
    f = _literal(fmt, Q32_FORMATS)
    if f is None or not isinstance(off, types.Integer):
        return None

    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> ir.Value:
        aty, a = sig.args[1], args[1]
        o = _i64(context, builder, args[2], sig.args[2])
        w = vty(_I16, 32)
        if f == GGMLType.Q8_0:
            return builder.sext(load_bytes(context, builder, aty, a, _add(builder, o, 2), 32), w)
        if f in (GGMLType.IQ4_NL, GGMLType.MXFP4):
            skip, table = (2, KVALUES_IQ4NL) if f == GGMLType.IQ4_NL else (1, KVALUES_FP4)
            idx = nibbles(builder, load_bytes(context, builder, aty, a, _add(builder, o, skip), 16))
            return builder.sext(lookup16(builder, idx, table), w)
        qs_at = _QS_AT[f]
        q = nibbles(builder, load_bytes(context, builder, aty, a, _add(builder, o, qs_at), 16))
        if f in (GGMLType.Q5_0, GGMLType.Q5_1):
            qh = load_scalar(context, builder, aty, a, _add(builder, o, qs_at - 4), _I32)
            q = builder.or_(q, bits_to_bytes(builder, qh, 16))
        q = builder.zext(q, w)
        bias = OFFSET.get(f, 0)
        return builder.sub(q, splat(builder, ir.Constant(_I16, bias), 32)) if bias else q
    return I16x32(fmt, buf, off), codegen


@intrinsic
def load_f16x(typingctx: Any, fmt: Any, buf: Any, off: Any) -> Any:
    """16 consecutive F32/F16/BF16 elements at byte `off` as F32x16 (exact conversion)."""
    f = _literal(fmt, F_FORMATS)
    if f is None or not isinstance(off, types.Integer):
        return None

    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> ir.Value:
        aty, a = sig.args[1], args[1]
        o = _i64(context, builder, args[2], sig.args[2])
        ft = _llvm_type(F32x16)
        if f == GGMLType.F32:
            return builder.load(byte_ptr(context, builder, aty, a, o, ft), align=1)
        if f == GGMLType.F16:
            return builder.fpext(builder.load(byte_ptr(context, builder, aty, a, o, vty(_HALF, 16)), align=1), ft)
        bits = builder.load(byte_ptr(context, builder, aty, a, o, vty(_I16, 16)), align=1)
        wide = builder.shl(builder.zext(bits, vty(_I32, 16)), splat(builder, ir.Constant(_I32, 16), 16))
        return builder.bitcast(wide, ft)
    return F32x16(fmt, buf, off), codegen


@intrinsic
def load_f(typingctx: Any, fmt: Any, buf: Any, off: Any) -> Any:
    """One F32/F16/BF16 element at byte `off` as float32 (exact)."""
    f = _literal(fmt, F_FORMATS)
    if f is None or not isinstance(off, types.Integer):
        return None

    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> ir.Value:
        aty, a = sig.args[1], args[1]
        o = _i64(context, builder, args[2], sig.args[2])
        if f == GGMLType.F32:
            return load_scalar(context, builder, aty, a, o, _F32)
        bits = load_scalar(context, builder, aty, a, o, _I16)
        if f == GGMLType.F16:
            return fp16_bits_to_f32(builder, bits)
        return builder.bitcast(builder.shl(builder.zext(bits, _I32), ir.Constant(_I32, 16)), _F32)
    return types.float32(fmt, buf, off), codegen


@intrinsic
def u32_at(typingctx: Any, buf: Any, off: Any) -> Any:
    if not isinstance(off, types.Integer):
        return None

    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> ir.Value:
        o = _i64(context, builder, args[1], sig.args[1])
        return builder.zext(load_scalar(context, builder, sig.args[0], args[0], o, _I32), _I64)
    return types.int64(buf, off), codegen


@intrinsic
def q32_scale_at(typingctx: Any, fmt: Any, buf: Any, off: Any) -> Any:
    """The block scale d of the 32-element block at byte `off`: F16, or for MXFP4 the E8M0 byte as
    2**(e-128) (half the E8M0 value, matching the doubled FP4 table; e < 2 gives denormals)."""
    f = _literal(fmt, Q32_FORMATS)
    if f is None or not isinstance(off, types.Integer):
        return None

    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> ir.Value:
        return _scale(builder, context, sig.args[1], args[1], _i64(context, builder, args[2], sig.args[2]), f)
    return types.float32(fmt, buf, off), codegen


def _scale(builder: ir.IRBuilder, context: Any, aty: Any, a: ir.Value, o: ir.Value, f: int) -> ir.Value:
    if f == GGMLType.MXFP4:
        e = builder.zext(load_scalar(context, builder, aty, a, o, _I8), _I32)
        denormal = builder.shl(ir.Constant(_I32, 0x00200000), e)
        normal = builder.shl(builder.sub(e, ir.Constant(_I32, 1)), ir.Constant(_I32, 23))
        small = builder.icmp_unsigned("<", e, ir.Constant(_I32, 2))
        return builder.bitcast(builder.select(small, denormal, normal), _F32)
    return fp16_bits_to_f32(builder, load_scalar(context, builder, aty, a, o, _I16))


# --- byte-product path (x86 vpmaddubsw) for the 4/5-bit legacy types ------------------------------------

BYTE_FORMATS = (GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1, GGMLType.Q8_0, GGMLType.IQ4_NL,
                GGMLType.MXFP4)
OFFSET: dict[int, int] = {GGMLType.Q4_0: 8, GGMLType.Q5_0: 16}  # stored unsigned value = q + offset
SIGNED = (GGMLType.Q8_0, GGMLType.IQ4_NL, GGMLType.MXFP4)  # |q| times y with q's sign moved onto y


def _block_u8(context: Any, builder: ir.IRBuilder, aty: Any, a: ir.Value, o: ir.Value, f: int) -> ir.Value:
    """The 32 values of the block at `o` as <32 x i8>: q + offset (unsigned) or, for SIGNED, q itself."""
    if f == GGMLType.Q8_0:
        return load_bytes(context, builder, aty, a, _add(builder, o, 2), 32)
    if f in (GGMLType.IQ4_NL, GGMLType.MXFP4):
        skip, table = (2, KVALUES_IQ4NL) if f == GGMLType.IQ4_NL else (1, KVALUES_FP4)
        return lookup16(builder, nibbles(builder, load_bytes(context, builder, aty, a, _add(builder, o, skip), 16)),
                        table)
    qs_at = _QS_AT[f]
    u = nibbles(builder, load_bytes(context, builder, aty, a, _add(builder, o, qs_at), 16))
    if f in (GGMLType.Q5_0, GGMLType.Q5_1):
        qh = load_scalar(context, builder, aty, a, _add(builder, o, qs_at - 4), _I32)
        u = builder.or_(u, bits_to_bytes(builder, qh, 16))
    return u


def _ntuple(t: Any) -> int | None:
    if isinstance(t, types.UniTuple) and isinstance(t.dtype, types.Integer):
        return t.count
    return None


@intrinsic
def q32_dot8x2(typingctx: Any, fmt: Any, abuf: Any, off: Any, bsz: Any, bq8: Any, es: Any, ycorr: Any,
               yis: Any) -> Any:
    """Integer dot products of the two blocks at `off` and `off + bsz` with 64 int8 activations at each
    element of the tuple `es` of `bq8`; per activation row an I32x16 whose lanes 0-7 sum to block 0's dot
    and lanes 8-15 to block 1's (lane k: elements 4k..4k+3, exact). Weights go in as unsigned bytes
    (vpdpbusd, or vpmaddubsw + vpmaddwd), decoded once; their offset is taken back out lane by lane by
    starting from `ycorr` (int32, 8 per block: -offset times the activation's sums of 4) at `yis`."""
    f = _literal(fmt, Q32_FORMATS)
    n = _ntuple(es)
    if f is None or n is None or _ntuple(yis) != n or not isinstance(off, types.Integer):
        return None
    ret = types.UniTuple(I32x16, n)

    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> ir.Value:
        if f not in BYTE_FORMATS or not HAS_MADDUBS:  # typed for every 32-block format, never reached
            return context.make_tuple(builder, ret, [ir.Constant(vty(_I32, 16), None)] * n)
        aty, a = sig.args[1], args[1]
        o = _i64(context, builder, args[2], sig.args[2])
        o2 = builder.add(o, _i64(context, builder, args[3], sig.args[3]))
        u = shuffle(builder, _block_u8(context, builder, aty, a, o, f), _block_u8(context, builder, aty, a, o2, f),
                    list(range(64)))
        zero = ir.Constant(u.type, None)
        negative = builder.icmp_signed("<", u, zero) if f in SIGNED else None
        if negative is not None:  # |q| <= 128 unsigned; activations are in [-127, 127], so -y fits
            u = builder.select(negative, builder.sub(zero, u), u)
        out = []
        for i in range(n):
            ye = _i64(context, builder, builder.extract_value(args[5], i), sig.args[5].dtype)
            y = builder.load(byte_ptr(context, builder, sig.args[4], args[4], ye, vty(_I8, 64)), align=1)
            if negative is not None:
                y = builder.select(negative, builder.sub(zero, y), y)
            acc = ir.Constant(vty(_I32, 16), None)
            if f in OFFSET:  # start from -offset * (sums of 4 activations): the lanes come out exact
                yo = builder.mul(_i64(context, builder, builder.extract_value(args[7], i), sig.args[7].dtype),
                                 ir.Constant(_I64, 4))
                acc = builder.load(byte_ptr(context, builder, sig.args[6], args[6], yo, vty(_I32, 16)), align=4)
            out.append(dot4_u8s8(builder, acc, u, y))
        return context.make_tuple(builder, ret, out)
    return ret(fmt, abuf, off, bsz, bq8, es, ycorr, yis), codegen


@intrinsic
def q32_scale2(typingctx: Any, fmt: Any, abuf: Any, off: Any, bsz: Any) -> Any:
    """Scales d of the blocks at `off` and `off + bsz` as F32x16: 8 lanes of each."""
    f = _literal(fmt, Q32_FORMATS)
    if f is None or not isinstance(off, types.Integer) or not isinstance(bsz, types.Integer):
        return None

    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> ir.Value:
        aty, a = sig.args[1], args[1]
        o = _i64(context, builder, args[2], sig.args[2])
        o2 = builder.add(o, _i64(context, builder, args[3], sig.args[3]))
        d0, d1 = (_scale(builder, context, aty, a, at, f) for at in (o, o2))
        return shuffle(builder, splat(builder, d0, 8), splat(builder, d1, 8), list(range(16)))
    return F32x16(fmt, abuf, off, bsz), codegen
