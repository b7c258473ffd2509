"""Whole-super-block dot products for the K-quants and IQ4_XS, generated as one piece of LLVM IR.

For a 256-element super-block of weight type `fmt` and n activation rows (Q8_K values as int16) the
intrinsic `ksb_dot` returns, per row, 16 int32 lanes whose sum is ggml's integer super-block sum
sum_g scale_g * dot(q_g, y_g). The 16 sub-block scales are decoded with a few vector shuffles, each
32-element chunk is decoded once and multiplied by its scales in int16 (|q*scale| < 2**12), then
vpmaddwd'ed with each activation row. `ksb_min` gives the matching mins term sum_g min_g * bsum_g
(Q2_K, Q4_K, Q5_K), from the activation's int16 sums of 16. Layouts: quant-formats.md.
"""
from __future__ import annotations

from typing import Any

from llvmlite import ir  # type: ignore[import-untyped]
from numba import types
from numba.extending import intrinsic

from ...ggml.types import GGMLType
from .decode import K_FORMATS, KVALUES_IQ4NL
from .simd import (
    _F32,
    _I16,
    _I32,
    _I64,
    HAS_MADDUBS,
    I32x16,
    byte_ptr,
    dot2_i16,
    fp16_bits_to_f32,
    load_bytes,
    load_scalar,
    lookup16,
    madd_i16,
    maddubs,
    nibbles,
    shuffle,
    splat,
    vty,
)

HAS_MINS = (GGMLType.Q2_K, GGMLType.Q4_K, GGMLType.Q5_K)


class _Block:
    """IR helpers bound to one super-block: loads at byte offsets from its start, byte-vector ops."""

    def __init__(self, context: Any, builder: ir.IRBuilder, aty: Any, ary: ir.Value, off: ir.Value) -> None:
        self.c, self.b, self.aty, self.ary, self.off = context, builder, aty, ary, off

    def bytes(self, at: int, n: int) -> ir.Value:
        return load_bytes(self.c, self.b, self.aty, self.ary, self.b.add(self.off, ir.Constant(_I64, at)), n)

    def u16(self, at: int) -> ir.Value:
        return load_scalar(self.c, self.b, self.aty, self.ary, self.b.add(self.off, ir.Constant(_I64, at)), _I16)

    def k(self, v: ir.Value, value: int) -> ir.Value:
        """A constant vector shaped like v."""
        return splat(self.b, ir.Constant(v.type.element, value), v.type.count)

    def shr(self, v: ir.Value, n: int) -> ir.Value:
        return self.b.lshr(v, self.k(v, n)) if n else v

    def mask(self, v: ir.Value, m: int) -> ir.Value:
        return self.b.and_(v, self.k(v, m))

    def i16(self, v: ir.Value, signed: bool = False) -> ir.Value:
        return (self.b.sext if signed else self.b.zext)(v, vty(_I16, v.type.count))


def _pairs(b: _Block, v8: ir.Value) -> ir.Value:
    """8 per-32 values -> 16 per-16 values (each twice)."""
    return shuffle(b.b, v8, v8, [i // 2 for i in range(16)])


def _scales(f: int, b: _Block) -> tuple[ir.Value, ir.Value | None]:
    """(scale, min) of each 16-element group as <16 x i16> (min None for types without mins)."""
    bb = b.b
    if f in (GGMLType.Q4_K, GGMLType.Q5_K):
        s = b.bytes(4, 16)                       # 12 scale bytes (+4 bytes of the next field)
        zero = ir.Constant(s.type, None)
        lo6, lo4, hi4 = b.mask(s, 63), b.mask(s, 15), b.shr(s, 4)
        top2 = bb.shl(b.shr(s, 6), b.k(s, 4))    # high 2 bits of sub-blocks 4..7, in place
        sc = bb.or_(shuffle(bb, lo6, lo4, [0, 1, 2, 3, 24, 25, 26, 27]),
                    shuffle(bb, zero, top2, [0, 0, 0, 0, 16, 17, 18, 19]))
        mn = bb.or_(shuffle(bb, lo6, hi4, [4, 5, 6, 7, 24, 25, 26, 27]),
                    shuffle(bb, zero, top2, [0, 0, 0, 0, 20, 21, 22, 23]))
        return b.i16(_pairs(b, sc)), b.i16(_pairs(b, mn))
    if f == GGMLType.Q6_K:
        return b.i16(b.bytes(192, 16), signed=True), None
    if f == GGMLType.Q2_K:
        s = b.bytes(0, 16)
        return b.i16(b.mask(s, 15)), b.i16(b.shr(s, 4))
    if f == GGMLType.Q3_K:
        s = b.bytes(94, 16)                      # scale byte k is s[k + 2] (stays inside the block)
        low = shuffle(bb, b.mask(s, 15), b.shr(s, 4), [*range(2, 10), *range(18, 26)])
        high = b.i16(shuffle(bb, s, s, [10, 11, 12, 13] * 4))
        high = b.mask(bb.lshr(high, ir.Constant(high.type, [ir.Constant(_I16, 2 * (g // 4)) for g in range(16)])), 3)
        both = bb.or_(b.i16(low), bb.shl(high, b.k(high, 4)))
        return bb.sub(both, b.k(both, 32)), None
    # IQ4_XS: 4 low bits in scales_l (2 per byte), 2 high bits in the u16 scales_h
    s = b.bytes(0, 8)
    low = b.i16(shuffle(bb, b.mask(s, 15), b.shr(s, 4), [4, 12, 5, 13, 6, 14, 7, 15]))
    hv = splat(bb, b.u16(2), 8)
    high = b.mask(bb.lshr(hv, ir.Constant(hv.type, [ir.Constant(_I16, 2 * j) for j in range(8)])), 3)
    ls = bb.or_(low, bb.shl(high, b.k(high, 4)))
    return _pairs(b, bb.sub(ls, b.k(ls, 32))), None


def _chunk(f: int, b: _Block, j: int) -> ir.Value:
    """Integer values of elements 32j..32j+31 as <32 x i16> (before scaling)."""
    bb = b.b
    h, jj = divmod(j, 4)
    if f in (GGMLType.Q4_K, GGMLType.Q5_K):
        qs = b.bytes((16 if f == GGMLType.Q4_K else 48) + 32 * (j // 2), 32)
        q = b.shr(qs, 4) if j % 2 else b.mask(qs, 15)
        if f == GGMLType.Q5_K:
            q = bb.or_(q, bb.shl(b.mask(b.shr(b.bytes(16, 32), j), 1), b.k(q, 4)))
        return b.i16(q)
    if f == GGMLType.Q6_K:
        ql = b.bytes(64 * h + 32 * (jj & 1), 32)
        lo4 = b.shr(ql, 4) if jj >= 2 else b.mask(ql, 15)
        hi2 = b.mask(b.shr(b.bytes(128 + 32 * h, 32), 2 * jj), 3)
        q = b.i16(bb.or_(lo4, bb.shl(hi2, b.k(hi2, 4))))
        return bb.sub(q, b.k(q, 32))
    if f == GGMLType.IQ4_XS:
        return b.i16(lookup16(bb, nibbles(bb, b.bytes(8 + 16 * j, 16)), KVALUES_IQ4NL), signed=True)
    q2 = b.mask(b.shr(b.bytes((32 if f == GGMLType.Q3_K else 16) + 32 * h, 32), 2 * jj), 3)
    if f == GGMLType.Q2_K:
        return b.i16(q2)
    hb = b.mask(b.shr(b.bytes(0, 32), 4 * h + jj), 1)   # Q3_K: a clear hmask bit means -4
    q = b.i16(bb.or_(q2, bb.shl(hb, b.k(hb, 2))))
    return bb.sub(q, b.k(q, 4))


def _cols(sig_cols: Any) -> int | None:
    if isinstance(sig_cols, types.UniTuple) and isinstance(sig_cols.dtype, types.Integer):
        return sig_cols.count
    return None


def _madd16(bb: ir.IRBuilder, a: ir.Value, b: ir.Value) -> ir.Value:
    """<2n x i16> x <2n x i16> -> <n x i32> pairwise sums (vpmaddwd)."""
    n = a.type.count
    wide = vty(_I32, n)
    p = bb.mul(bb.sext(a, wide), bb.sext(b, wide))
    return bb.add(shuffle(bb, p, p, list(range(0, n, 2))), shuffle(bb, p, p, list(range(1, n, 2))))


def _i16_at(context: Any, builder: ir.IRBuilder, aty: Any, ary: ir.Value, elem: ir.Value, n: int) -> ir.Value:
    off = builder.mul(elem, ir.Constant(_I64, 2))
    return builder.load(byte_ptr(context, builder, aty, ary, off, vty(_I16, n)), align=2)


def _typer(fmt: Any, abuf: Any, off: Any, vec: Any, cols: Any) -> tuple[int, int] | None:
    n = _cols(cols)
    ok = (isinstance(fmt, types.IntegerLiteral) and fmt.literal_value in K_FORMATS and n is not None
          and isinstance(off, types.Integer) and isinstance(vec, types.Array) and vec.dtype == types.int16)
    return (int(fmt.literal_value), n) if ok and n is not None else None


@intrinsic
def ksb_dot(typingctx: Any, fmt: Any, abuf: Any, off: Any, bq: Any, cols: Any) -> Any:
    """Integer super-block sums of the block at byte `off` against the activation rows starting at int16
    elements `cols` (a tuple) of `bq`: a tuple of I32x16, one per row."""
    spec = _typer(fmt, abuf, off, bq, cols)
    if spec is None:
        return None
    f, n = spec
    ret = types.UniTuple(I32x16, n)

    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> ir.Value:
        blk = _Block(context, builder, sig.args[1], args[1],
                     context.cast(builder, args[2], sig.args[2], types.int64))
        sc16, _ = _scales(f, blk)
        starts = [context.cast(builder, builder.extract_value(args[4], i), sig.args[4].dtype, types.int64)
                  for i in range(n)]
        acc: list[ir.Value | None] = [None] * n
        for j in range(8):
            q = builder.mul(_chunk(f, blk, j), shuffle(builder, sc16, sc16, [2 * j] * 16 + [2 * j + 1] * 16))
            for i in range(n):
                y = _i16_at(context, builder, sig.args[3], args[3],
                            builder.add(starts[i], ir.Constant(_I64, 32 * j)), 32)
                p = _madd16(builder, q, y)
                acc[i] = p if acc[i] is None else builder.add(acc[i], p)
        return context.make_tuple(builder, ret, acc)
    return ret(fmt, abuf, off, bq, cols), codegen


@intrinsic
def ksb_min(typingctx: Any, fmt: Any, abuf: Any, off: Any, bsum: Any, cols: Any) -> Any:
    """sum_g min_g * bsum_g of the block at `off` (mins of Q2_K/Q4_K/Q5_K) against the 16 int16 group sums
    at elements `cols` of `bsum`: a tuple of I32x16 (8 partial sums, 8 zeros) per row."""
    spec = _typer(fmt, abuf, off, bsum, cols)
    if spec is None:
        return None
    f, n = spec
    ret = types.UniTuple(I32x16, n)

    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> ir.Value:
        blk = _Block(context, builder, sig.args[1], args[1],
                     context.cast(builder, args[2], sig.args[2], types.int64))
        zero8 = ir.Constant(vty(_I32, 8), None)
        if f not in HAS_MINS:  # typed for every K format; only reached for those with mins
            return context.make_tuple(builder, ret, [shuffle(builder, zero8, zero8, list(range(16)))] * n)
        _, mn16 = _scales(f, blk)
        assert mn16 is not None
        out = []
        for i in range(n):
            start = context.cast(builder, builder.extract_value(args[4], i), sig.args[4].dtype, types.int64)
            p = _madd16(builder, mn16, _i16_at(context, builder, sig.args[3], args[3], start, 16))
            out.append(shuffle(builder, p, zero8, list(range(16))))
        return context.make_tuple(builder, ret, out)
    return ret(fmt, abuf, off, bsum, cols), codegen



_D_AT: dict[int, tuple[int, int | None]] = {  # byte offsets of d and dmin
    GGMLType.Q2_K: (80, 82), GGMLType.Q3_K: (108, None), GGMLType.Q4_K: (0, 2), GGMLType.Q5_K: (0, 2),
    GGMLType.Q6_K: (208, None), GGMLType.IQ4_XS: (0, None)}


@intrinsic
def ksb_d(typingctx: Any, fmt: Any, abuf: Any, off: Any) -> Any:
    """(d, dmin) of the super-block at byte `off` as float32 (dmin 0 for types without mins)."""
    if not (isinstance(fmt, types.IntegerLiteral) and fmt.literal_value in K_FORMATS
            and isinstance(off, types.Integer)):
        return None
    d_at, dmin_at = _D_AT[fmt.literal_value]
    ret = types.UniTuple(types.float32, 2)

    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> ir.Value:
        blk = _Block(context, builder, sig.args[1], args[1],
                     context.cast(builder, args[2], sig.args[2], types.int64))
        d = fp16_bits_to_f32(builder, blk.u16(d_at))
        dmin = fp16_bits_to_f32(builder, blk.u16(dmin_at)) if dmin_at is not None else ir.Constant(_F32, 0.0)
        return context.make_tuple(builder, ret, [d, dmin])
    return ret(fmt, abuf, off), codegen


# --- byte-product path (x86 vpmaddubsw): unsigned weight bytes times int8 activations ---------------

BYTE_FORMATS = (GGMLType.Q2_K, GGMLType.Q3_K, GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K)
_OFFSET: dict[int, int] = {GGMLType.Q3_K: 4, GGMLType.Q6_K: 32}  # stored unsigned value = q + offset


def _concat(bb: ir.IRBuilder, lo: ir.Value, hi: ir.Value) -> ir.Value:
    return shuffle(bb, lo, hi, list(range(2 * lo.type.count)))


def _pair_u8(f: int, b: _Block, p: int) -> ir.Value:
    """Elements 64p..64p+63 as unsigned bytes (q + offset), <64 x i8>."""
    bb = b.b
    h, j0 = divmod(2 * p, 4)
    if f in (GGMLType.Q4_K, GGMLType.Q5_K):
        qs = b.bytes((16 if f == GGMLType.Q4_K else 48) + 32 * p, 32)
        u = _concat(bb, b.mask(qs, 15), b.shr(qs, 4))
        if f == GGMLType.Q5_K:
            qh = b.bytes(16, 32)
            hb = _concat(bb, b.mask(b.shr(qh, 2 * p), 1), b.mask(b.shr(qh, 2 * p + 1), 1))
            u = bb.or_(u, bb.shl(hb, b.k(hb, 4)))
        return u
    if f == GGMLType.Q6_K:
        ql = b.bytes(64 * h, 64)
        lo4 = b.shr(ql, 4) if j0 == 2 else b.mask(ql, 15)
        qh = b.bytes(128 + 32 * h, 32)
        hi2 = _concat(bb, b.mask(b.shr(qh, 2 * j0), 3), b.mask(b.shr(qh, 2 * j0 + 2), 3))
        return bb.or_(lo4, bb.shl(hi2, b.k(hi2, 4)))
    qs = b.bytes((32 if f == GGMLType.Q3_K else 16) + 32 * h, 32)
    u = _concat(bb, b.mask(b.shr(qs, 2 * j0), 3), b.mask(b.shr(qs, 2 * j0 + 2), 3))
    if f == GGMLType.Q3_K:
        hm = b.bytes(0, 32)
        hb = _concat(bb, b.mask(b.shr(hm, 4 * h + j0), 1), b.mask(b.shr(hm, 4 * h + j0 + 1), 1))
        u = bb.or_(u, bb.shl(hb, b.k(hb, 2)))
    return u


def _i8_at(context: Any, builder: ir.IRBuilder, aty: Any, ary: ir.Value, elem: ir.Value, n: int) -> ir.Value:
    return builder.load(byte_ptr(context, builder, aty, ary, elem, vty(ir.IntType(8), n)), align=1)


@intrinsic
def ksb_dot8(typingctx: Any, fmt: Any, abuf: Any, off: Any, bq8: Any, bsum: Any, qcols: Any, scols: Any) -> Any:
    """As ksb_dot, with int8 activations (`bq8`, elements `qcols`) and vpmaddubsw: weight bytes are made
    unsigned (q + offset) and the offset comes back out through the activation's int16 16-sums (`bsum`,
    elements `scols`). Exact integer sums, as ksb_dot."""
    n = _cols(qcols)
    if not (isinstance(fmt, types.IntegerLiteral) and fmt.literal_value in K_FORMATS and n is not None
            and _cols(scols) == n and isinstance(bq8, types.Array) and bq8.dtype == types.int8
            and isinstance(bsum, types.Array) and bsum.dtype == types.int16):
        return None
    f = int(fmt.literal_value)
    ret = types.UniTuple(I32x16, n)

    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> ir.Value:
        if f not in BYTE_FORMATS or not HAS_MADDUBS:  # typed for every K format, never reached for these
            return context.make_tuple(builder, ret, [ir.Constant(vty(_I32, 16), None)] * n)
        blk = _Block(context, builder, sig.args[1], args[1],
                     context.cast(builder, args[2], sig.args[2], types.int64))
        sc16, _ = _scales(f, blk)
        qs = [context.cast(builder, builder.extract_value(args[5], i), sig.args[5].dtype, types.int64)
              for i in range(n)]
        acc = [ir.Constant(vty(_I32, 16), None)] * n
        for p in range(4):
            u = _pair_u8(f, blk, p)
            scv = shuffle(builder, sc16, sc16, [4 * p + k // 8 for k in range(32)])
            for i in range(n):
                y = _i8_at(context, builder, sig.args[3], args[3], builder.add(qs[i], ir.Constant(_I64, 64 * p)), 64)
                acc[i] = dot2_i16(builder, acc[i], maddubs(builder, u, y), scv)
        off = _OFFSET.get(f, 0)
        if off:
            zero8 = ir.Constant(vty(_I32, 8), None)
            for i in range(n):
                start = context.cast(builder, builder.extract_value(args[6], i), sig.args[6].dtype, types.int64)
                corr = madd_i16(builder, sc16, _i16_at(context, builder, sig.args[4], args[4], start, 16))
                corr = builder.mul(corr, splat(builder, ir.Constant(_I32, off), 8))
                acc[i] = builder.sub(acc[i], shuffle(builder, corr, zero8, list(range(16))))
        return context.make_tuple(builder, ret, acc)
    return ret(fmt, abuf, off, bq8, bsum, qcols, scols), codegen
