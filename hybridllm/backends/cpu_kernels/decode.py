"""32-element block formats (and plain float weights) for the matmul kernels, as LLVM IR intrinsics.

`fmt` is always a compile-time literal GGMLType id, so each kernel specialization contains only its
format's code. `q32_lanes` gives, per block, ggml's 8 int32 lanes (lane k: the products of elements
4k..4k+3 with the int8 activations, e.g. (q-8)*y for Q4_0, kvalues*y for IQ4_NL), exactly; the float
scales (`q32_scale2`, `q32_scale_at`) are applied by the kernels in ggml's order. Layouts:
/work/shared/spec/quant-formats.md.
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
    F32x8,
    F32x16,
    I32x16,
    bits_to_bytes,
    byte_ptr,
    dot4_u8s8,
    fp16_bits_to_f32,
    load_bytes,
    load_scalar,
    lookup16,
    madd_i16,
    masked_load,
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


def _dec_q32_ir(f: int, context: Any, builder: ir.IRBuilder, aty: Any, a: ir.Value, o: ir.Value) -> ir.Value:
    """The 32 signed values of the 32-element block at `o` as <32 x i16> (element order)."""
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


@intrinsic
def load8_f(typingctx: Any, fmt: Any, buf: Any, off: Any, count: Any) -> Any:
    """`count` (<= 8) consecutive F32/F16/BF16 elements at byte `off` as F32x8, the other lanes 0 and
    their memory untouched."""
    f = _literal(fmt, F_FORMATS)
    if f is None or not isinstance(off, types.Integer) or not isinstance(count, types.Integer):
        return None

    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> ir.Value:
        aty, a = sig.args[1], args[1]
        o = _i64(context, builder, args[2], sig.args[2])
        cnt = _i64(context, builder, args[3], sig.args[3])
        ft = vty(_F32, 8)
        if f == GGMLType.F32:
            return masked_load(builder, byte_ptr(context, builder, aty, a, o, ft), cnt, ft)
        bits = masked_load(builder, byte_ptr(context, builder, aty, a, o, vty(_I16, 8)), cnt, vty(_I16, 8))
        if f == GGMLType.F16:
            return builder.fpext(builder.bitcast(bits, vty(_HALF, 8)), ft)
        wide = builder.shl(builder.zext(bits, vty(_I32, 8)), splat(builder, ir.Constant(_I32, 16), 8))
        return builder.bitcast(wide, ft)
    return F32x8(fmt, buf, off, count), codegen


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
def q32_lanes(typingctx: Any, fmt: Any, abuf: Any, off: Any, bsz: Any, two: Any, bq8: Any, es: Any, ycorr: Any,
              yis: Any) -> Any:
    """ggml's 8 int32 lanes (lane k: products of elements 4k..4k+3) of the block at `off`, and if the literal
    `two` is 1 of the next block at `off + bsz`, against the int8 activations at each element of the tuple
    `es` of `bq8`: per activation row an I32x16, lanes 0-7 for the first block, 8-15 for the second (0 if
    none). With vpmaddubsw the weights go in as unsigned bytes (q + offset, the offset taken back out by
    starting from `ycorr`, -offset times the activation's sums of 4, at `yis`) or, for SIGNED types, as
    |q| against sign-moved activations; without, as int16 products."""
    f = _literal(fmt, Q32_FORMATS)
    n = _ntuple(es)
    if (f is None or n is None or _ntuple(yis) != n or not isinstance(off, types.Integer)
            or not isinstance(two, types.IntegerLiteral)):
        return None
    pair = bool(two.literal_value)
    ret = types.UniTuple(I32x16, n)

    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> ir.Value:
        aty, a = sig.args[1], args[1]
        o = _i64(context, builder, args[2], sig.args[2])
        o2 = builder.add(o, _i64(context, builder, args[3], sig.args[3]))
        starts = [_i64(context, builder, builder.extract_value(args[6], i), sig.args[6].dtype) for i in range(n)]
        width = 64 if pair else 32
        load_y = [builder.load(byte_ptr(context, builder, sig.args[5], args[5], e, vty(_I8, width)), align=1)
                  for e in starts]
        if not HAS_MADDUBS:
            return context.make_tuple(builder, ret, _lanes_i16(f, context, builder, aty, a, o, o2, pair, load_y))
        u = _block_u8(context, builder, aty, a, o, f)
        u = shuffle(builder, u, _block_u8(context, builder, aty, a, o2, f) if pair else ir.Constant(u.type, None),
                    list(range(64)))
        zero = ir.Constant(u.type, None)
        negative = builder.icmp_signed("<", u, zero) if f in SIGNED else None
        if negative is not None:  # |q| <= 128 unsigned; activations are in [-127, 127], so -y fits
            u = builder.select(negative, builder.sub(zero, u), u)
        out = []
        for i in range(n):
            y = load_y[i] if pair else shuffle(builder, load_y[i], ir.Constant(load_y[i].type, None),
                                               list(range(64)))
            if negative is not None:
                y = builder.select(negative, builder.sub(zero, y), y)
            acc = ir.Constant(vty(_I32, 16), None)
            if f in OFFSET:  # start from -offset * (sums of 4 activations): the lanes come out exact
                yo = builder.mul(_i64(context, builder, builder.extract_value(args[8], i), sig.args[8].dtype),
                                 ir.Constant(_I64, 4))
                acc = builder.load(byte_ptr(context, builder, sig.args[7], args[7], yo, vty(_I32, 16 if pair else 8)),
                                   align=4)
                if not pair:
                    acc = shuffle(builder, acc, ir.Constant(acc.type, None), list(range(16)))
            out.append(dot4_u8s8(builder, acc, u, y))
        return context.make_tuple(builder, ret, out)
    return ret(fmt, abuf, off, bsz, two, bq8, es, ycorr, yis), codegen


def _lanes_i16(f: int, context: Any, builder: ir.IRBuilder, aty: Any, a: ir.Value, o: ir.Value, o2: ir.Value,
               pair: bool, ys: list[ir.Value]) -> list[ir.Value]:
    """Portable q32_lanes: int16 products (lanes of 2 elements) folded to lanes of 4."""
    blocks = [_dec_q32_ir(f, context, builder, aty, a, o)] + ([_dec_q32_ir(f, context, builder, aty, a, o2)]
                                                             if pair else [])
    out = []
    for y in ys:
        halves = []
        for k, q in enumerate(blocks):
            yk = builder.sext(shuffle(builder, y, y, list(range(32 * k, 32 * k + 32))), vty(_I16, 32))
            p = madd_i16(builder, q, yk)
            halves.append(builder.add(shuffle(builder, p, p, list(range(0, 16, 2))),
                                      shuffle(builder, p, p, list(range(1, 16, 2)))))
        if len(halves) == 1:
            halves.append(ir.Constant(vty(_I32, 8), None))
        out.append(shuffle(builder, halves[0], halves[1], list(range(16))))
    return out


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
