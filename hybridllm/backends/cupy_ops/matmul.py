"""MUL_MAT and MUL_MAT_ID on the GPU (kernels/matmul.cu): matrix-vector kernels for decode, 64x64 tiles
for prefill, all weight types of kernels/quant/all.cuh dequantized in registers."""
from __future__ import annotations

from typing import Sequence

from ...ggml.tensor import Tensor
from ...ggml.types import GGMLOp, GGMLType, TRAITS, type_name
from . import register
from .common import I32, I64, P, BuildCtx, dense_rows, launch, mma_ok, require, row_grid, src, storage_key
from .mmvq import MatOut, build_mmvq, build_mmvq_id, mmvq_id_ok, mmvq_ok

# ggml type -> kernel suffix and the byte alignment its decoder's loads need (quant/*.cuh ALIGN)
WEIGHT_TYPES: dict[int, int] = {
    GGMLType.F32: 4, GGMLType.F16: 2, GGMLType.BF16: 2, GGMLType.Q4_0: 2, GGMLType.Q4_1: 2,
    GGMLType.Q5_0: 2, GGMLType.Q5_1: 2, GGMLType.Q8_0: 2, GGMLType.IQ4_NL: 2, GGMLType.MXFP4: 1,
    GGMLType.Q2_K: 2, GGMLType.Q3_K: 2, GGMLType.Q4_K: 4, GGMLType.Q5_K: 4, GGMLType.Q6_K: 2,
    GGMLType.IQ4_XS: 2,
}

ROWS_PER_BLOCK = 4   # warps per matrix-vector block, one output row each
VEC_MAX_COLS = 8     # up to this many columns of B go through the matrix-vector kernels
TILE = 64            # output tile of the prefill kernel (kernels/matmul.cu MM_BM/MM_BN)


def check_weight(node: Tensor, a: Tensor, ctx: BuildCtx) -> None:
    align = WEIGHT_TYPES.get(a.type)
    require(align is not None, node, f"weight type {type_name(a.type)} not supported on GPU")
    dense_rows(node, a)
    ptr = int(ctx.ptr(a))
    require((ptr | a.nb[1] | a.nb[2] | a.nb[3]) % align == 0, node,
            f"weight {a.name!r} is not {align}-byte aligned")


def check_activations(node: Tensor, b: Tensor, ctx: BuildCtx) -> None:
    require(b.type == GGMLType.F32 and b.nb[0] == 4, node, "src1 must be f32 with dense rows")
    require((int(ctx.ptr(b)) | b.nb[1] | b.nb[2] | b.nb[3]) % 4 == 0, node, "src1 is not 4-byte aligned")


@register(GGMLOp.MUL_MAT)
def build_mul_mat(node: Tensor, ctx: BuildCtx):
    a, b = src(node, 0), src(node, 1)
    check_weight(node, a, ctx)
    check_activations(node, b, ctx)
    K, M, a2, a3 = a.ne
    _, N, b2, b3 = b.ne
    require(b.ne[0] == K and node.ne == (M, N, b2, b3), node, "shapes do not match A^T B")
    require(b2 % a2 == 0 and b3 % a3 == 0, node, "src0 does not broadcast over src1 dims 2/3")
    require(node.type == GGMLType.F32 and node.nb[0] == 4, node, "dst must be f32 with dense rows")
    if mmvq_ok(node, ctx):
        return build_mmvq(ctx, node, [MatOut(a, node, node.nb[1])], b)
    name = TRAITS[a.type].name
    args = (ctx.ptr(a), ctx.ptr(b), ctx.ptr(node), I32(K), I32(M), I32(N), I64(a.nb[1]), I64(a.nb[2]),
            I64(a.nb[3]), I64(b.nb[1]), I64(b.nb[2]), I64(b.nb[3]), I64(node.nb[1]), I64(node.nb[2]),
            I64(node.nb[3]), I32(b2), I32(b2 // a2), I32(b3 // a3))
    batch = b2 * b3
    if N <= VEC_MAX_COLS:
        kname = f"mul_mat_vec_{name}" if N == 1 else f"mul_mat_vec8_{name}"
        grid = ((M + ROWS_PER_BLOCK - 1) // ROWS_PER_BLOCK, (N + VEC_MAX_COLS - 1) // VEC_MAX_COLS, batch)
        return [launch(ctx.fn("matmul", kname), grid, (ctx.warp, ROWS_PER_BLOCK), args)]
    if mma_ok(ctx):
        return build_mul_mat_mma(node, a, b, ctx)
    grid = ((M + TILE - 1) // TILE, (N + TILE - 1) // TILE, batch)
    return [launch(ctx.fn("matmul", f"mul_mat_tile_{name}"), grid, (256,), args)]


MMA_BM, MMA_SMALL_GRID = 128, 264  # 2 blocks per multiprocessor on an H100


F16_SLOTS = 4  # f16 activation copies alive at once (each is read by the matmuls right after it)


def f16_for(ctx: BuildCtx, b: Tensor) -> tuple[list, int, int]:
    """(launches, pointer, K8): b's rows as f16 rows of K8 = K rounded up to 8 (kernels/mma.cu k_to_f16),
    converted once and shared by the matmuls reading b. Copies live in a small ring of buffers; reusing a
    slot forgets the copy it held (a later reader converts again), so no launch reads a stale copy."""
    key = storage_key(b)
    cacheable = b.type == GGMLType.F32 and b.is_contiguous
    if cacheable and key in ctx.f16:
        ptr, K8 = ctx.f16[key]
        return [], ptr, K8
    K = b.ne[0]
    K8 = (K + 7) // 8 * 8
    rows = b.ne[1] * b.ne[2] * b.ne[3]
    size = rows * K8 * 2
    if len(ctx.f16_slots) < F16_SLOTS:
        ctx.f16_slots.append([0, 0, None])
    slot = ctx.f16_slots[ctx.f16_next % len(ctx.f16_slots)]
    ctx.f16_next += 1
    if slot[2] is not None:
        ctx.f16.pop(slot[2], None)
    if slot[1] < size:
        slot[0], slot[1] = ctx.scratch(size), size
    slot[2] = key if cacheable else None
    gy, gz = row_grid(rows)
    args = (ctx.ptr(b), P(slot[0]), I32(K), I32(K8), I32(b.ne[1]), I32(b.ne[2]), I32(b.ne[3]), I64(b.nb[1]),
            I64(b.nb[2]), I64(b.nb[3]))
    if cacheable:
        ctx.f16[key] = (slot[0], K8)
    return [launch(ctx.fn("mma", "k_to_f16"), ((K8 + 255) // 256, gy, gz), (256,), args)], slot[0], K8


def build_mul_mat_mma(node: Tensor, a: Tensor, b: Tensor, ctx: BuildCtx, more: Sequence[Tensor] = ()):
    """Tensor-core tiles on f16 activations; `more` (up to two other MUL_MATs of the same weight type, K and
    src1) run in the same launch, their row tiles after this one's."""
    K, M, a2, a3 = a.ne
    _, N, b2, b3 = b.ne
    require(b.nb[0] == 4, node, "src1 rows must be dense")
    pre, bh, K8 = f16_for(ctx, b)
    batch = b2 * b3
    tiles = sum((x.ne[1] + MMA_BM - 1) // MMA_BM for x in [a] + [m.src[0] for m in more])
    bn = 128 if tiles * ((N + 127) // 128) * batch >= MMA_SMALL_GRID else 64
    extra = [(m.src[0], m) for m in more] + [(a, node)] * (2 - len(more))
    Ms = [x.ne[1] if i < len(more) else 0 for i, (x, _) in enumerate(extra)]
    args = (ctx.ptr(a), P(bh), ctx.ptr(node), I32(K), I32(K8), I32(M), I32(N), I64(a.nb[1]), I64(a.nb[2]),
            I64(a.nb[3]), I64(node.nb[1]), I64(node.nb[2]), I64(node.nb[3]), I32(b2), I32(b2 // a2), I32(b3 // a3),
            ctx.ptr(extra[0][0]), ctx.ptr(extra[1][0]), ctx.ptr(extra[0][1]), ctx.ptr(extra[1][1]), I32(Ms[0]),
            I32(Ms[1]), I64(extra[0][0].nb[1]), I64(extra[1][0].nb[1]), I64(extra[0][1].nb[1]),
            I64(extra[1][1].nb[1]))
    grid = (tiles, (N + bn - 1) // bn, batch)
    kname = f"mul_mat_mma{'' if bn == 128 else '64'}_{TRAITS[a.type].name}"
    return pre + [launch(ctx.fn("mma", kname), grid, (256,), args)]


def mma_multi_ok(node: Tensor, ctx: BuildCtx) -> bool:
    """A prefill MUL_MAT that may share a tensor-core launch with others reading the same src1."""
    a, b = node.src_at(0), node.src_at(1)
    if a is None or b is None or not mma_ok(ctx) or b.ne[1] <= VEC_MAX_COLS or b.ne[2] != 1 or b.ne[3] != 1:
        return False
    if a.type not in WEIGHT_TYPES or b.type != GGMLType.F32 or b.nb[0] != 4 or b.ne[0] != a.ne[0]:
        return False
    return node.type == GGMLType.F32 and node.nb[0] == 4 and node.ne == (a.ne[1], b.ne[1], 1, 1)


def build_mul_mat_multi(ctx: BuildCtx, mms: Sequence[Tensor]):
    first = mms[0]
    a, b = first.src[0], first.src[1]
    for m in mms:
        check_weight(m, m.src[0], ctx)
    check_activations(first, b, ctx)
    return build_mul_mat_mma(first, a, b, ctx, more=list(mms[1:]))


@register(GGMLOp.MUL_MAT_ID)
def build_mul_mat_id(node: Tensor, ctx: BuildCtx):
    a, b, ids = src(node, 0), src(node, 1), src(node, 2)
    check_weight(node, a, ctx)
    check_activations(node, b, ctx)
    K, M, n_expert, a3 = a.ne
    _, ne11, n_tokens, b3 = b.ne
    require(ids.type == GGMLType.I32, node, "ids must be i32")
    n_used = ids.ne[0]
    require(a3 == 1 and b3 == 1 and b.ne[0] == K, node, "unsupported shapes")
    require(ids.ne[1] == n_tokens and node.ne[:3] == (M, n_used, n_tokens), node, "ids/dst shapes differ")
    require(node.type == GGMLType.F32 and node.nb[0] == 4, node, "dst must be f32 with dense rows")
    require(n_used * n_tokens <= 65535, node, "too many (slot, token) pairs for one launch")
    if mmvq_id_ok(node, ctx):
        return build_mmvq_id(ctx, node)
    if mma_ok(ctx) and n_tokens > VEC_MAX_COLS and b.nb[0] == 4:
        return build_mul_mat_id_mma(node, a, b, ids, ctx)
    name = TRAITS[a.type].name
    args = (ctx.ptr(a), ctx.ptr(b), ctx.ptr(ids), ctx.ptr(node), ctx.err_ptr,
            ctx.error_code(node, "expert id out of range"), I32(K), I32(M), I32(n_expert), I32(n_used),
            I32(ne11), I64(a.nb[1]), I64(a.nb[2]), I64(b.nb[1]), I64(b.nb[2]), I64(ids.nb[0]),
            I64(ids.nb[1]), I64(node.nb[1]), I64(node.nb[2]))
    grid = ((M + ROWS_PER_BLOCK - 1) // ROWS_PER_BLOCK, n_used * n_tokens)
    return [launch(ctx.fn("matmul", f"mul_mat_id_vec_{name}"), grid, (ctx.warp, ROWS_PER_BLOCK), args)]


MOE_BN = 64  # kernels/mma.cu mul_mat_id_mma tile columns


def moe_route(ctx: BuildCtx, node: Tensor, ids: Tensor, n_expert: int) -> tuple[list, tuple[int, int, int]]:
    """Per-expert lists of (slot, token) pairs, made once per ids tensor and shared by its matmuls."""
    route = ctx.routes.get(id(ids))
    if route is not None:
        return [], route
    n_used, n_tok = ids.ne[0], ids.ne[1]
    cap = n_used * n_tok
    counts, lists = ctx.scratch(4 * n_expert), ctx.scratch(4 * n_expert * cap)
    args = (ctx.ptr(ids), P(counts), P(lists), I32(cap), I32(n_used), I32(n_tok), I32(n_expert), I64(ids.nb[0]),
            I64(ids.nb[1]), ctx.err_ptr, ctx.error_code(node, "expert id out of range"))
    route = ctx.routes[id(ids)] = (counts, lists, cap)
    return [launch(ctx.fn("mma", "k_moe_route"), (n_expert,), (256,), args)], route


def build_mul_mat_id_mma(node: Tensor, a: Tensor, b: Tensor, ids: Tensor, ctx: BuildCtx):
    """Many tokens: each expert's (slot, token) pairs through one tensor-core tile grid."""
    K, M, n_expert = a.ne[0], a.ne[1], a.ne[2]
    n_used, n_tok, ne11 = ids.ne[0], ids.ne[1], b.ne[1]
    require(n_expert <= 65535, node, "too many experts for one launch")
    pre, (counts, lists, cap) = moe_route(ctx, node, ids, n_expert)
    conv, bh, K8 = f16_for(ctx, b)  # rows (e % ne11) + ne11 * t, as the kernel indexes them
    # tokens pick distinct experts, so an expert has at most n_tok pairs; tiles loop past that if not
    grid = ((M + 127) // 128, (n_tok + MOE_BN - 1) // MOE_BN, n_expert)
    args = (ctx.ptr(a), P(bh), ctx.ptr(node), P(counts), P(lists), I32(cap), I32(K), I32(K8), I32(M), I32(n_used),
            I32(ne11), I64(a.nb[1]), I64(a.nb[2]), I64(node.nb[1]), I64(node.nb[2]))
    return pre + conv + [launch(ctx.fn("mma", f"mul_mat_id_mma_{TRAITS[a.type].name}"), grid, (256,), args)]
