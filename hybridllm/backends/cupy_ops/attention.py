"""FLASH_ATTN_EXT on the GPU (kernels/attention.cu).

Decode (one query) over an aligned F16 cache runs `k_fad_*`: blocks of up to 4 query heads sharing a K/V
head, the keys split over blocks whose partials the last block merges. Otherwise one block per (QB queries,
head, sequence): 8 warps and one query for decode, 4 warps and 8 (4 above head size 128) queries for prefill."""
from __future__ import annotations

import os

from ...ggml.tensor import Tensor
from ...ggml.types import GGMLOp, GGMLType, type_name
from . import register
from .common import F32, I32, I64, NULL, P, BuildCtx, launch, require, src
from .mmvq import q8_out
from .norm import alibi

_KV_TYPES = {GGMLType.F32: 4, GGMLType.F16: 2, GGMLType.BF16: 2}


@register(GGMLOp.FLASH_ATTN_EXT)
def build_flash_attn(node: Tensor, ctx: BuildCtx):
    q, k, v = src(node, 0), src(node, 1), src(node, 2)
    mask, sinks = node.src_at(3), node.src_at(4)
    require(q.type == GGMLType.F32 and q.nb[0] == 4, node, "Q must be f32 with dense rows")
    for t in (k, v):
        require(t.type in _KV_TYPES, node, f"K/V type {type_name(t.type)} not supported on GPU")
        require(t.nb[0] == _KV_TYPES[t.type], node, "K/V rows must be dense")
    D, n_q, H, S = q.ne
    Dv, n_kv = v.ne[0], k.ne[1]
    require(k.ne[0] == D and v.ne[1] == n_kv, node, "K/V shapes do not match Q")
    require(H % k.ne[2] == 0 and H % v.ne[2] == 0 and S % k.ne[3] == 0 and S % v.ne[3] == 0, node,
            "K/V heads do not broadcast")
    require(max(D, Dv) <= 512, node, "head dimension above 512")
    require(node.type == GGMLType.F32 and node.ne == (Dv, H, n_q, S) and node.nb[0] == 4, node,
            "dst must be f32 (Dv, H, n_q, S)")
    if mask is not None:
        require(mask.type in (GGMLType.F16, GGMLType.F32) and mask.ne[0] >= n_kv and mask.ne[1] >= n_q,
                node, "mask must be f16/f32 (>= n_kv, >= n_q)")
        require(mask.nb[0] == (2 if mask.type == GGMLType.F16 else 4), node, "mask rows not dense")
        margs = (I32(mask.ne[2]), I32(mask.ne[3]), I64(mask.nb[1]), I64(mask.nb[2]), I64(mask.nb[3]))
    else:
        margs = (I32(1), I32(1), I64(0), I64(0), I64(0))
    if sinks is not None:
        require(sinks.type == GGMLType.F32 and sinks.ne[0] >= H, node, "sinks must be f32, one per head")
    scale, max_bias, softcap = node.param_f32(0), node.param_f32(1), node.param_f32(2)
    if softcap != 0.0:
        scale /= softcap
    m0, m1, h2 = alibi(H, max_bias)
    soft = (F32(scale), F32(max_bias), F32(m0), F32(m1), I32(h2), F32(softcap))
    q8 = q8_out(ctx, node) if Dv % 32 == 0 else None
    q8args = (P(q8.q), P(q8.d)) if q8 is not None else (NULL, NULL)
    require(H <= 65535 and S <= 65535, node, "grid too large")
    if n_q == 1 and max(D, Dv) <= 256 and _decode_ok(q, k, v, ctx) \
            and os.environ.get("HYBRIDLLM_FA_DECODE") != "block":
        return [_decode(node, q, k, v, mask, sinks, soft, q8args, ctx)]
    maxd = next(m for m in (64, 128, 256, 512) if max(D, Dv) <= m)
    qb, nw = (1, 8) if n_q == 1 else {64: (8, 4), 128: (8, 4), 256: (4, 4), 512: (1, 4)}[maxd]
    if n_q == 1 and maxd == 128 and os.environ.get("HYBRIDLLM_FA_DECODE_WARPS") in ("2", "4"):
        nw = int(os.environ["HYBRIDLLM_FA_DECODE_WARPS"])  # measurement override (bench/gpu_profile.py --fa)
    vpl = maxd // ctx.warp
    # 16-byte loads of K rows when every row start is aligned (always so for an F16 cache, D % 8 == 0);
    # vector loads of each lane's V slice when those are aligned
    kvec = k.type == GGMLType.F16 and D % 8 == 0 and (int(ctx.ptr(k)) | k.nb[1] | k.nb[2] | k.nb[3]) % 16 == 0
    vvec = v.type == GGMLType.F16 and vpl >= 2 and (int(ctx.ptr(v)) | v.nb[1] | v.nb[2] | v.nb[3]) % (2 * vpl) == 0
    args = (ctx.ptr(q), ctx.ptr(k), ctx.ptr(v), ctx.ptr(mask), ctx.ptr(sinks), ctx.ptr(node),
            I32(k.type), I32(v.type), I32(mask.type if mask is not None else -1), I32(kvec), I32(vvec), I32(D),
            I32(Dv), I32(n_q), I32(n_kv),
            I32(H // k.ne[2]), I32(S // k.ne[3]), I32(H // v.ne[2]), I32(S // v.ne[3]),
            I64(q.nb[1]), I64(q.nb[2]), I64(q.nb[3]), I64(k.nb[1]), I64(k.nb[2]), I64(k.nb[3]),
            I64(v.nb[1]), I64(v.nb[2]), I64(v.nb[3]), *margs, *soft, I64(node.nb[1]), I64(node.nb[2]),
            I64(node.nb[3]), *q8args)
    return [launch(ctx.fn("attention", f"k_fa_{maxd}_{qb}_{nw}"), ((n_q + qb - 1) // qb, H, S), (nw * ctx.warp,),
                   args)]


FAD_NT, FAD_TILE, FAD_R = 128, 32, 4  # kernels/attention.cu
FAD_MAX_SPLIT = 64
N_SM_DEFAULT = 132  # H100 SXM; only sizes the key split


def _decode_ok(q: Tensor, k: Tensor, v: Tensor, ctx: BuildCtx) -> bool:
    """The split decode kernel reads K/V rows as 16-byte f16 vectors and writes a dense output."""
    D, Dv = q.ne[0], v.ne[0]
    if k.type != GGMLType.F16 or v.type != GGMLType.F16 or D % 8 or Dv % 8:
        return False
    return all((int(ctx.ptr(t)) | t.nb[1] | t.nb[2] | t.nb[3]) % 16 == 0 for t in (k, v))


def _rows_per_block(H: int, rk2: int, rv2: int) -> int:
    """Query heads a block serves: consecutive heads sharing one K and one V head, at most FAD_R."""
    return max(r for r in range(1, FAD_R + 1) if rk2 % r == 0 and rv2 % r == 0 and H % r == 0)


def _decode(node: Tensor, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, sinks: Tensor | None,
            soft: tuple, q8args: tuple, ctx: BuildCtx):
    """k_fad launch; `soft`: the kernels' (scale, max_bias, m0, m1, n_head_log2, softcap) arguments."""
    D, _, H, S = q.ne
    Dv, n_kv = v.ne[0], k.ne[1]
    rk2, rk3, rv2, rv3 = H // k.ne[2], S // k.ne[3], H // v.ne[2], S // v.ne[3]
    nr = _rows_per_block(H, rk2, rv2)
    maxd = next(m for m in (64, 128, 256) if max(D, Dv) <= m)
    tiles = max(1, -(-n_kv // FAD_TILE))
    groups = H // nr * S
    n_sm = int(getattr(ctx.backend.rt, "n_sm", N_SM_DEFAULT))
    n_split = max(1, min(tiles, FAD_MAX_SPLIT, -(-4 * n_sm // groups)))
    per = max(-(-tiles // n_split), int(os.environ.get("HYBRIDLLM_FA_TILES_PER_SPLIT", "1")))  # (measurements)
    n_split = -(-tiles // per)
    part = ctx.scratch(4 * groups * n_split * FAD_R * (maxd + 2))
    if mask is not None:
        margs = (I32(mask.type), I32(mask.ne[2]), I32(mask.ne[3]), I64(mask.nb[2]), I64(mask.nb[3]))
    else:
        margs = (I32(-1), I32(1), I32(1), I64(0), I64(0))
    fargs = (ctx.ptr(q), ctx.ptr(k), ctx.ptr(v), ctx.ptr(mask), ctx.ptr(sinks), ctx.ptr(node), I32(D), I32(Dv),
             I32(n_kv), I32(nr), I32(rk2), I32(rk3), I32(rv2), I32(rv3), I64(q.nb[2]), I64(q.nb[3]),
             I64(k.nb[1]), I64(k.nb[2]), I64(k.nb[3]), I64(v.nb[1]), I64(v.nb[2]), I64(v.nb[3]), *margs, *soft,
             I64(node.nb[1]), I64(node.nb[3]), *q8args, P(part), P(ctx.counters(groups)), I32(per))
    # 16-byte output rows: the last block merges with vector loads and stores (else element by element)
    vec = (int(ctx.ptr(node)) | node.nb[1] | node.nb[3]) % 16 == 0 and os.environ.get("HYBRIDLLM_FA_DECODE") != "rows"
    name = f"k_fad_{maxd}" if vec else f"k_fadr_{maxd}"
    return launch(ctx.fn("attention", name), (n_split, H // nr, S), (FAD_NT,), fargs)
