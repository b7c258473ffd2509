"""Decode matmuls on int8 activations (kernels/mmvq.cu): the q8 copies of matmul inputs and the launches of
the matrix-vector kernels, plain or with fused epilogues (several matrices sharing one input, residual add,
KV-cache row store, GLU of gate/up, MoE expert sums).

A q8 copy is made once per input and shared by every matmul reading it; a producer that knows its output
will be read as q8 (RMS_NORM, GLU, FLASH_ATTN_EXT) writes the copy itself, saving the quantize launch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ...ggml.tensor import Tensor
from ...ggml.types import GGMLType, TRAITS
from .common import F32, I32, I64, NULL, P, BuildCtx, launch, mma_ok, require, row_grid, storage_key

# Weight types with an integer dot product (kernels/q8.cuh HL_FOR_EACH_Q8_TYPE) and their load alignment.
Q8_TYPES: dict[int, int] = {
    GGMLType.Q4_0: 2, GGMLType.Q4_1: 4, GGMLType.Q5_0: 2, GGMLType.Q5_1: 4, GGMLType.Q8_0: 2,
    GGMLType.Q4_K: 16, GGMLType.Q5_K: 16, GGMLType.Q6_K: 2,
}
MMV_WARPS = 4      # kernels/mmvq.cu
MMV_MAX_COLS = 8   # columns of the mmvq8 kernels
MODULE = "mmvq"


def glu_warps(warp: int) -> int:
    """Warps per block of the 32-row GLU kernels (kernels/mmvq.cu GLU_WARPS)."""
    return 512 // warp


@dataclass(frozen=True)
class Q8Buf:
    """A q8 copy: int8 values at `q` (flat order of the source), one f32 scale per 32 at `d`."""
    q: int
    d: int
    n: int


def q8_weight_ok(a: Tensor, ctx: BuildCtx) -> bool:
    """A weight the integer kernels can read: supported type, dense rows, aligned for the loads."""
    align = Q8_TYPES.get(a.type)
    if align is None or a.nb[0] != TRAITS[a.type].type_size or a.buffer is None:
        return False
    try:
        ptr = int(ctx.ptr(a))
    except Exception:
        return False
    return (ptr | a.nb[1] | a.nb[2] | a.nb[3]) % align == 0


def q8_input_ok(b: Tensor) -> bool:
    return b.type == GGMLType.F32 and b.nb[0] == 4 and b.ne[0] % 32 == 0


def mmvq_ok(node: Tensor, ctx: BuildCtx, max_cols: int = MMV_MAX_COLS) -> bool:
    """MUL_MAT that runs as a q8 matrix-vector product: a q8 weight, f32 input, <= max_cols columns."""
    a, b = node.src_at(0), node.src_at(1)
    if a is None or b is None or node.type != GGMLType.F32 or node.nb[0] != 4:
        return False
    return q8_weight_ok(a, ctx) and q8_input_ok(b) and b.ne[1] <= max_cols and b.ne[0] == a.ne[0]


def mmvq_id_ok(node: Tensor, ctx: BuildCtx) -> bool:
    """MUL_MAT_ID that runs as q8 matrix-vector products per (slot, token): decode-sized batches (larger
    ones go to the grouped tensor-core tiles where there are those)."""
    a, b, ids = node.src_at(0), node.src_at(1), node.src_at(2)
    if a is None or b is None or ids is None or node.type != GGMLType.F32 or node.nb[0] != 4:
        return False
    if ids.ne[1] > MMV_MAX_COLS and mma_ok(ctx):
        return False
    return (q8_weight_ok(a, ctx) and q8_input_ok(b) and ids.type == GGMLType.I32 and a.ne[3] == 1
            and b.ne[3] == 1 and ids.ne[1] * ids.ne[0] <= 65535)


def new_q8(ctx: BuildCtx, n: int) -> Q8Buf:
    return Q8Buf(ctx.scratch(n), ctx.scratch(n // 32 * 4), n)


def q8_cacheable(t: Tensor) -> bool:
    return t.type == GGMLType.F32 and t.is_contiguous and t.ne[0] % 32 == 0


def q8_out(ctx: BuildCtx, t: Tensor) -> Q8Buf | None:
    """A q8 buffer for a producer to fill, when some matmul will read `t` as q8; else None."""
    key = storage_key(t)
    if key not in ctx.q8_wanted or not q8_cacheable(t):
        return None
    buf = new_q8(ctx, t.nelements)
    ctx.q8[key] = buf
    return buf


def q8_for(ctx: BuildCtx, b: Tensor) -> tuple[list, Q8Buf]:
    """(launches, q8 copy of b): the cached copy, or a quantize launch making one (rows of b in order)."""
    key = storage_key(b)
    if q8_cacheable(b) and key in ctx.q8:
        return [], ctx.q8[key]
    K = b.ne[0]
    rows = b.ne[1] * b.ne[2] * b.ne[3]
    buf = new_q8(ctx, K * rows)
    gy, gz = row_grid(rows)
    args = (ctx.ptr(b), P(buf.q), P(buf.d), I32(K), I32(b.ne[1]), I32(b.ne[2]), I32(b.ne[3]), I64(b.nb[1]),
            I64(b.nb[2]), I64(b.nb[3]))
    if q8_cacheable(b):
        ctx.q8[key] = buf
    return [launch(ctx.fn(MODULE, "k_quantize_q8"), ((K + 255) // 256, gy, gz), (256,), args)], buf


def q8_invalidate(ctx: BuildCtx, written: Sequence[Tensor], keep: Sequence[Q8Buf] = ()) -> None:
    """Forget q8 (and f16) copies whose source bytes a launch just overwrote."""
    for t in written:
        if t is None or t.buffer is None:
            continue
        lo, hi = t.offset, t.offset + t.nbytes
        for key in [k for k, v in ctx.q8.items() if k[0] == id(t.buffer) and v not in keep]:
            if key[1] < hi and lo < key[1] + key[2]:
                del ctx.q8[key]
        for key in [k for k in ctx.f16 if k[0] == id(t.buffer)]:
            if key[1] < hi and lo < key[1] + key[2]:
                del ctx.f16[key]


@dataclass
class MatOut:
    """One matrix of a fused mmvq launch: weight `a`, output row base `dst` with column stride `nbd`;
    with `idx` (I32/I64, one per column) the column goes to row idx[n] of `dst` (a KV-cache store)."""
    a: Tensor
    dst: Tensor
    nbd: int
    idx: Tensor | None = None
    f16: bool = False


def build_mmvq(ctx: BuildCtx, node: Tensor, mats: Sequence[MatOut], b: Tensor,
               residual: Tensor | None = None) -> list:
    """Up to three matrices of one type against the columns of b (and batches, for a single matrix)."""
    a0 = mats[0].a
    K, N = a0.ne[0], b.ne[1]
    require(1 <= len(mats) <= 3 and all(m.a.type == a0.type and m.a.ne[0] == K for m in mats), node,
            "fused matrices differ in type or K")
    b2, b3 = b.ne[2], b.ne[3]
    if len(mats) > 1 or residual is not None:
        require(b2 == 1 and b3 == 1, node, "fused matvec without batches")
    require(b2 % a0.ne[2] == 0 and b3 % a0.ne[3] == 0, node, "src0 does not broadcast over src1 dims 2/3")
    pre, xq = q8_for(ctx, b)
    nc = 1 if N == 1 else MMV_MAX_COLS
    m = list(mats) + [MatOut(a0, mats[0].dst, 0)] * (3 - len(mats))
    Ms = [mm.a.ne[1] if i < len(mats) else 0 for i, mm in enumerate(m)]
    idx64 = any(mm.idx is not None and mm.idx.type == GGMLType.I64 for mm in mats)
    require(all(mm.idx is None or mm.idx.type == (GGMLType.I64 if idx64 else GGMLType.I32) for mm in mats),
            node, "mixed index types")
    dst0 = mats[0].dst
    if residual is not None:
        rargs = (ctx.ptr(residual), I64(residual.nb[1]))
    else:
        rargs = (NULL, I64(0))
    args = (*(ctx.ptr(mm.a) for mm in m), *(ctx.ptr(mm.dst) for mm in m),
            *(ctx.ptr(mm.idx) if mm.idx is not None else NULL for mm in m), *(I32(x) for x in Ms),
            *(I32(int(mm.f16)) for mm in m), *(I64(mm.nbd) for mm in m), *(I64(mm.a.nb[1]) for mm in m),
            I32(idx64), P(xq.q), P(xq.d), *rargs, I32(K), I32(N), I64(a0.nb[2]), I64(a0.nb[3]), I32(b2),
            I32(b2 // a0.ne[2]), I32(b3 // a0.ne[3]), I64(dst0.nb[2]), I64(dst0.nb[3]),
            I64(residual.nb[2] if residual is not None else 0), I64(residual.nb[3] if residual is not None else 0))
    kname = f"mmvq{'' if nc == 1 else '8'}_{TRAITS[a0.type].name}"
    grid = ((sum(Ms) + MMV_WARPS - 1) // MMV_WARPS, (N + nc - 1) // nc, b2 * b3)
    return pre + [launch(ctx.fn(MODULE, kname), grid, (ctx.warp, MMV_WARPS), args)]


def glu_params(glu: Tensor) -> tuple:
    return I32(glu.param_i32(0)), F32(glu.param_f32(2)), F32(glu.param_f32(3))


def build_mmvq_glu(ctx: BuildCtx, glu: Tensor, gate: Tensor, up: Tensor, write_f32: bool) -> list:
    """GLU(gate @ x, up @ x) for one column, with the q8 copy of the result when a matmul wants it."""
    ag, au, b = gate.src[0], up.src[0], gate.src[1]
    assert ag is not None and au is not None and b is not None
    pre, xq = q8_for(ctx, b)
    out = q8_out(ctx, glu)
    M, K = ag.ne[1], ag.ne[0]
    args = (ctx.ptr(ag), ctx.ptr(au), I64(ag.nb[1]), I64(au.nb[1]), ctx.ptr(glu) if write_f32 or out is None else NULL,
            I64(glu.nb[1]), P(out.q) if out else NULL, P(out.d) if out else NULL, P(xq.q), P(xq.d), I32(K), I32(M),
            *glu_params(glu))
    fn = ctx.fn(MODULE, f"mmvq_glu_{TRAITS[ag.type].name}")
    return pre + [launch(fn, ((M + 31) // 32, b.ne[1]), (ctx.warp, glu_warps(ctx.warp)), args)]


def _id_common(ctx: BuildCtx, node: Tensor):
    a, b, ids = node.src[0], node.src[1], node.src[2]
    assert a is not None and b is not None and ids is not None
    K, M, n_expert = a.ne[0], a.ne[1], a.ne[2]
    n_used, n_tok, ne11 = ids.ne[0], ids.ne[1], b.ne[1]
    require(b.ne[0] == K and b.ne[2] == n_tok and n_used % ne11 == 0, node, "src1/ids shapes do not match")
    return a, b, ids, K, M, n_expert, n_used, n_tok, ne11


def build_mmvq_id(ctx: BuildCtx, node: Tensor) -> list:
    a, b, ids, K, M, n_expert, n_used, n_tok, ne11 = _id_common(ctx, node)
    require(node.ne[:3] == (M, n_used, n_tok), node, "dst shape differs")
    pre, xq = q8_for(ctx, b)
    args = (ctx.ptr(a), P(xq.q), P(xq.d), ctx.ptr(ids), ctx.ptr(node), ctx.err_ptr,
            ctx.error_code(node, "expert id out of range"), I32(K), I32(M), I32(n_expert), I32(n_used), I32(ne11),
            I64(a.nb[1]), I64(a.nb[2]), I64(ids.nb[0]), I64(ids.nb[1]), I64(node.nb[1]), I64(node.nb[2]))
    grid = ((M + MMV_WARPS - 1) // MMV_WARPS, n_used * n_tok)
    return pre + [launch(ctx.fn(MODULE, f"mmvq_id_{TRAITS[a.type].name}"), grid, (ctx.warp, MMV_WARPS), args)]


def build_mmvq_id_glu(ctx: BuildCtx, glu: Tensor, gate: Tensor, up: Tensor, write_f32: bool) -> list:
    ag, b, ids, K, M, n_expert, n_used, n_tok, ne11 = _id_common(ctx, gate)
    au = up.src[0]
    assert au is not None
    pre, xq = q8_for(ctx, b)
    out = q8_out(ctx, glu)
    dst = ctx.ptr(glu) if write_f32 or out is None else NULL
    args = (ctx.ptr(ag), ctx.ptr(au), I64(ag.nb[1]), I64(ag.nb[2]), I64(au.nb[1]), I64(au.nb[2]), P(xq.q),
            P(xq.d), ctx.ptr(ids), dst, P(out.q) if out else NULL, P(out.d) if out else NULL, ctx.err_ptr,
            ctx.error_code(gate, "expert id out of range"), I32(K), I32(M), I32(n_expert), I32(n_used), I32(ne11),
            I64(ids.nb[0]), I64(ids.nb[1]), I64(glu.nb[1]), I64(glu.nb[2]), *glu_params(glu))
    fn = ctx.fn(MODULE, f"mmvq_id_glu_{TRAITS[ag.type].name}")
    return pre + [launch(fn, ((M + 31) // 32, n_used * n_tok), (ctx.warp, glu_warps(ctx.warp)), args)]


def build_mmvq_id_sum(ctx: BuildCtx, mm: Tensor, weights: Tensor, out: Tensor, residual: Tensor | None) -> list:
    """out[:, t] = sum_e weights[0, e, t] * (mm's expert e result)[:, t] (+ residual)."""
    a, b, ids, K, M, n_expert, n_used, n_tok, ne11 = _id_common(ctx, mm)
    pre, xq = q8_for(ctx, b)
    r = (ctx.ptr(residual), I64(residual.nb[1])) if residual is not None else (NULL, I64(0))
    args = (ctx.ptr(a), P(xq.q), P(xq.d), ctx.ptr(ids), ctx.ptr(weights), r[0], ctx.ptr(out), ctx.err_ptr,
            ctx.error_code(mm, "expert id out of range"), I32(K), I32(M), I32(n_expert), I32(n_used), I32(ne11),
            I64(a.nb[1]), I64(a.nb[2]), I64(ids.nb[0]), I64(ids.nb[1]), I64(weights.nb[1]), I64(weights.nb[2]),
            r[1], I64(out.nb[1]))
    grid = ((M + MMV_WARPS - 1) // MMV_WARPS, n_tok)
    return pre + [launch(ctx.fn(MODULE, f"mmvq_id_sum_{TRAITS[a.type].name}"), grid, (ctx.warp, MMV_WARPS), args)]
