"""K-quant (and IQ4_XS) super-blocks against Q8_K activations, generated as LLVM IR, with ggml's exact
integer lanes.

ggml's AVX2 vec_dot keeps, per super-block, 8 int32 lanes: lane l sums, over the eight 32-element chunks,
scale * (products of chunk elements 4l..4l+3) (Q6_K then subtracts 32 * (scale*bsum of groups 2l and
2l+1)); its float math depends on those lanes, so `ksb_lanes` returns exactly them (from vpmaddubsw /
vpdpwssd, or int16 products on hosts without them). `ksb_mins` returns the lanes of ggml's mins
products (4 for Q4_K/Q5_K, 8 for Q2_K), `ksb_d` the super-block's d and dmin. Layouts: quant-formats.md.
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
    I32x8,
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
    """Values of elements 32j..32j+31 as <32 x i16> as ggml multiplies them: signed q, except Q6_K's
    unsigned 6-bit codes (its -32 comes back through the bsums)."""
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
        return b.i16(bb.or_(lo4, bb.shl(hi2, b.k(hi2, 4))))
    if f == GGMLType.IQ4_XS:
        return b.i16(lookup16(bb, nibbles(bb, b.bytes(8 + 16 * j, 16)), KVALUES_IQ4NL), signed=True)
    q2 = b.mask(b.shr(b.bytes((32 if f == GGMLType.Q3_K else 16) + 32 * h, 32), 2 * jj), 3)
    if f == GGMLType.Q2_K:
        return b.i16(q2)
    hb = b.mask(b.shr(b.bytes(0, 32), 4 * h + jj), 1)   # Q3_K: a clear hmask bit means -4
    q = b.i16(bb.or_(q2, bb.shl(hb, b.k(hb, 2))))
    return bb.sub(q, b.k(q, 4))


def _concat(bb: ir.IRBuilder, lo: ir.Value, hi: ir.Value) -> ir.Value:
    return shuffle(bb, lo, hi, list(range(2 * lo.type.count)))


def _pair_bytes(f: int, b: _Block, p: int) -> tuple[ir.Value, ir.Value | None]:
    """Elements 64p..64p+63 for vpmaddubsw as <64 x i8>: (unsigned codes, None), or for Q3_K
    (low 2 bits, 4 where the high bit is clear) whose products ggml subtracts, or for IQ4_XS
    (signed values, None) which take the sign trick."""
    bb = b.b
    h, j0 = divmod(2 * p, 4)
    if f in (GGMLType.Q4_K, GGMLType.Q5_K):
        qs = b.bytes((16 if f == GGMLType.Q4_K else 48) + 32 * p, 32)
        u = _concat(bb, b.mask(qs, 15), b.shr(qs, 4))
        if f == GGMLType.Q5_K:
            qh = b.bytes(16, 32)
            hb = _concat(bb, b.mask(b.shr(qh, 2 * p), 1), b.mask(b.shr(qh, 2 * p + 1), 1))
            u = bb.or_(u, bb.shl(hb, b.k(hb, 4)))
        return u, None
    if f == GGMLType.Q6_K:
        ql = b.bytes(64 * h, 64)
        lo4 = b.shr(ql, 4) if j0 == 2 else b.mask(ql, 15)
        qh = b.bytes(128 + 32 * h, 32)
        hi2 = _concat(bb, b.mask(b.shr(qh, 2 * j0), 3), b.mask(b.shr(qh, 2 * j0 + 2), 3))
        return bb.or_(lo4, bb.shl(hi2, b.k(hi2, 4))), None
    if f == GGMLType.IQ4_XS:
        lo, hi = (lookup16(bb, nibbles(bb, b.bytes(8 + 32 * p + 16 * k, 16)), KVALUES_IQ4NL) for k in (0, 1))
        return _concat(bb, lo, hi), None
    qs = b.bytes((32 if f == GGMLType.Q3_K else 16) + 32 * h, 32)
    u = _concat(bb, b.mask(b.shr(qs, 2 * j0), 3), b.mask(b.shr(qs, 2 * j0 + 2), 3))
    if f == GGMLType.Q2_K:
        return u, None
    hm = b.bytes(0, 32)
    hb = _concat(bb, b.mask(b.shr(hm, 4 * h + j0), 1), b.mask(b.shr(hm, 4 * h + j0 + 1), 1))
    return u, bb.shl(bb.xor(hb, b.k(hb, 1)), b.k(hb, 2))


def _cols(sig_cols: Any) -> int | None:
    if isinstance(sig_cols, types.UniTuple) and isinstance(sig_cols.dtype, types.Integer):
        return sig_cols.count
    return None


def _i16_at(context: Any, builder: ir.IRBuilder, aty: Any, ary: ir.Value, elem: ir.Value, n: int) -> ir.Value:
    off = builder.mul(elem, ir.Constant(_I64, 2))
    return builder.load(byte_ptr(context, builder, aty, ary, off, vty(_I16, n)), align=2)


def _i8_at(context: Any, builder: ir.IRBuilder, aty: Any, ary: ir.Value, elem: ir.Value, n: int) -> ir.Value:
    return builder.load(byte_ptr(context, builder, aty, ary, elem, vty(ir.IntType(8), n)), align=1)


def _fold(bb: ir.IRBuilder, v: ir.Value, adjacent: bool) -> ir.Value:
    """<2n x i32> -> <n x i32>: lanes k and k+n (adjacent=False) or 2k and 2k+1 summed."""
    n = v.type.count // 2
    a = list(range(0, 2 * n, 2)) if adjacent else list(range(n))
    c = list(range(1, 2 * n, 2)) if adjacent else list(range(n, 2 * n))
    return bb.add(shuffle(bb, v, v, a), shuffle(bb, v, v, c))


def _lanes_bytes(f: int, blk: _Block, sc16: ir.Value, ys: list[ir.Value], load_y: Any) -> list[ir.Value]:
    """vpmaddubsw path: per activation row, ggml's 8 lanes (before Q6_K's bsum term)."""
    bb = blk.b
    acc = [ir.Constant(vty(_I32, 16), None)] * len(ys)
    for p in range(4):
        u, sub = _pair_bytes(f, blk, p)
        negative = None
        if f == GGMLType.IQ4_XS:  # ggml's sign trick: |q| times y with q's sign
            zero = ir.Constant(u.type, None)
            negative = bb.icmp_signed("<", u, zero)
            u = bb.select(negative, bb.sub(zero, u), u)
        scv = shuffle(bb, sc16, sc16, [4 * p + k // 8 for k in range(32)])
        for i, start in enumerate(ys):
            y = load_y(bb.add(start, ir.Constant(_I64, 64 * p)))
            if negative is not None:
                y = bb.select(negative, bb.sub(ir.Constant(y.type, None), y), y)
            prod = maddubs(bb, u, y)
            if sub is not None:
                prod = bb.sub(prod, maddubs(bb, sub, y))
            acc[i] = dot2_i16(bb, acc[i], prod, scv)
    return [_fold(bb, a, adjacent=False) for a in acc]


def _lanes_i16(f: int, blk: _Block, sc16: ir.Value, ys: list[ir.Value], load_y: Any) -> list[ir.Value]:
    """Portable path: int16 products of each chunk (lanes of 2 elements), folded to lanes of 4."""
    bb = blk.b
    acc = [ir.Constant(vty(_I32, 16), None)] * len(ys)
    for j in range(8):
        q = bb.mul(_chunk(f, blk, j), shuffle(bb, sc16, sc16, [2 * j] * 16 + [2 * j + 1] * 16))
        for i, start in enumerate(ys):
            y = bb.sext(load_y(bb.add(start, ir.Constant(_I64, 32 * j))), vty(_I16, 32))
            acc[i] = bb.add(acc[i], madd_i16(bb, q, y))
    return [_fold(bb, a, adjacent=True) for a in acc]


@intrinsic
def ksb_lanes(typingctx: Any, fmt: Any, abuf: Any, off: Any, bq8: Any, bsum: Any, qcols: Any, scols: Any) -> Any:
    """ggml's 8 int32 lanes for the super-block at byte `off` against each activation row of the tuple
    `qcols` (int8 element offsets into `bq8`; `scols`: their 16 int16 bsums in `bsum`): one I32x8 per row."""
    n = _cols(qcols)
    if not (isinstance(fmt, types.IntegerLiteral) and fmt.literal_value in K_FORMATS and n is not None
            and _cols(scols) == n and isinstance(bq8, types.Array) and bq8.dtype == types.int8
            and isinstance(bsum, types.Array) and bsum.dtype == types.int16 and isinstance(off, types.Integer)):
        return None
    f = int(fmt.literal_value)
    ret = types.UniTuple(I32x8, n)

    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> ir.Value:
        blk = _Block(context, builder, sig.args[1], args[1], context.cast(builder, args[2], sig.args[2], types.int64))
        sc16, _ = _scales(f, blk)
        ys = [context.cast(builder, builder.extract_value(args[5], i), sig.args[5].dtype, types.int64)
              for i in range(n)]
        width = 64 if HAS_MADDUBS else 32
        load_y = lambda e: _i8_at(context, builder, sig.args[3], args[3], e, width)
        lanes = (_lanes_bytes if HAS_MADDUBS else _lanes_i16)(f, blk, sc16, ys, load_y)
        if f == GGMLType.Q6_K:  # ggml: lane l -= 32 * (scale*bsum of groups 2l and 2l+1)
            for i in range(n):
                start = context.cast(builder, builder.extract_value(args[6], i), sig.args[6].dtype, types.int64)
                corr = madd_i16(builder, _i16_at(context, builder, sig.args[4], args[4], start, 16), sc16)
                lanes[i] = builder.sub(lanes[i], builder.shl(corr, splat(builder, ir.Constant(_I32, 5), 8)))
        return context.make_tuple(builder, ret, lanes)
    return ret(fmt, abuf, off, bq8, bsum, qcols, scols), codegen


@intrinsic
def ksb_mins(typingctx: Any, fmt: Any, abuf: Any, off: Any, bsum: Any, scols: Any) -> Any:
    """ggml's mins products of the super-block at `off` with each activation row's 16 int16 bsums (element
    offsets `scols` of `bsum`), as I32x8: Q4_K/Q5_K lane k (k < 4) = m(2k)*s(2k) + m(2k+1)*s(2k+1) with s
    the 32-element sums; Q2_K lane k = m(2k)*b(2k) + m(2k+1)*b(2k+1); zeros for types without mins."""
    n = _cols(scols)
    if not (isinstance(fmt, types.IntegerLiteral) and fmt.literal_value in K_FORMATS and n is not None
            and isinstance(bsum, types.Array) and bsum.dtype == types.int16 and isinstance(off, types.Integer)):
        return None
    f = int(fmt.literal_value)
    ret = types.UniTuple(I32x8, n)

    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> ir.Value:
        zero8 = ir.Constant(vty(_I32, 8), None)
        if f not in HAS_MINS:  # typed for every K format; only reached for those with mins
            return context.make_tuple(builder, ret, [zero8] * n)
        blk = _Block(context, builder, sig.args[1], args[1], context.cast(builder, args[2], sig.args[2], types.int64))
        _, mn16 = _scales(f, blk)
        assert mn16 is not None
        out = []
        for i in range(n):
            start = context.cast(builder, builder.extract_value(args[4], i), sig.args[4].dtype, types.int64)
            prod = madd_i16(builder, mn16, _i16_at(context, builder, sig.args[3], args[3], start, 16))
            if f != GGMLType.Q2_K:  # m_j is in both of its 16-groups: lanes 2k, 2k+1 -> lane k
                prod = shuffle(builder, _fold(builder, prod, adjacent=True), ir.Constant(vty(_I32, 4), None),
                               list(range(8)))
            out.append(prod)
        return context.make_tuple(builder, ret, out)
    return ret(fmt, abuf, off, bsum, scols), codegen


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


