"""Launch fusion for the GPU backend: patterns of a decoder graph that run as one kernel.

    RMS_NORM -> MUL(w) [-> q8 copy]                       k_norm
    RMS_NORM -> MUL(w) -> ROPE [-> view -> SET_ROWS]      k_norm_rope (Q/K norm, rope, KV-cache store);
                                                          two in a row that are independent: k_norm_rope2
    MUL_MAT x {1..3} sharing src1 [-> view -> SET_ROWS]   mmvq (Q/K/V; V straight into the cache)
    MUL_MAT -> ADD(residual)                              mmvq with residual
    MUL_MAT gate, MUL_MAT up -> GLU                       mmvq_glu (+ q8 copy for the down projection)
    MUL_MAT_ID gate, up -> GLU                            mmvq_id_glu
    MUL_MAT_ID down -> MUL(router weights) -> views -> ADD chain [-> ADD residual]   mmvq_id_sum
    SOFT_MAX -> ARGSORT, GET_ROWS(top k) [-> SUM_ROWS -> CLAMP -> DIV]                 k_moe_router
    the same after MUL_MAT(f32 router weight, one token)                                k_moe_router_mv
    MUL(expert results, weights) -> views -> ADD chain [-> ADD residual] (prefill)      k_moe_wsum

A group's launch replaces all its members and runs at the position of one of them (`at`): the last member
for chains, the first for matmuls sharing an input. Intermediates it skips must have no other reader and
no OUTPUT flag. Because ggml's allocator reuses memory, moving work across other nodes is checked byte
range by byte range: nodes passed over may not write what the group reads or writes, nor read what it
writes (`Graph.safe`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Sequence

from ...ggml.tensor import Tensor
from ...ggml.types import VIEW_OPS, GGMLOp, GGMLType, GluOp, TensorFlag
from .common import BuildCtx, storage_key
from .mmvq import (MatOut, build_mmvq, build_mmvq_glu, build_mmvq_id_glu, build_mmvq_id_sum, mmvq_id_ok, mmvq_ok,
                   q8_cacheable)

# measurement switches (bench/gpu_run.sh): HYBRIDLLM_FUSE_OFF=pair,router_mv
_OFF = set(os.environ.get("HYBRIDLLM_FUSE_OFF", "").split(","))
_PAIRS, _ROUTER_MV = "pair" not in _OFF, "router_mv" not in _OFF

_GLU_FUSED = {GluOp.REGLU, GluOp.GEGLU, GluOp.SWIGLU, GluOp.SWIGLU_OAI, GluOp.GEGLU_ERF, GluOp.GEGLU_QUICK,
              GluOp.SWIGLU_CLAMP}


@dataclass
class Group:
    """Members replaced by one build; io lists, per member, the tensors from outside the group it reads and
    the tensors the fused launches write on its behalf (checked over the nodes the group moves past)."""
    members: list[Tensor]
    at: Tensor
    build: Callable[[BuildCtx], list]
    io: list[tuple[Tensor, list, list]] = field(default_factory=list)
    rowwise: bool = False  # the kernel reads each row's inputs before writing that row (in place is safe)
    pairable: bool = False  # one launch that may share a launch with the next such group (k_norm_rope2)

    @property
    def reads(self) -> list[Tensor]:
        return [t for _, r, _ in self.io for t in r if t is not None]

    @property
    def writes(self) -> list[Tensor]:
        return [t for _, _, w in self.io for t in w if t is not None]


class Graph:
    """The run list with positions, readers (through views) and byte ranges."""

    def __init__(self, nodes: Sequence[Tensor], run: Sequence[Tensor]) -> None:
        self.run = list(run)
        self.pos = {id(n): i for i, n in enumerate(self.run)}
        self.raw: dict[int, list[Tensor]] = {}
        for n in nodes:
            seen: set[int] = set()
            for s in [*n.src, n.view_src]:
                if s is not None and id(s) not in seen:
                    seen.add(id(s))
                    self.raw.setdefault(id(s), []).append(n)

    def readers(self, t: Tensor) -> list[Tensor]:
        """Run-list nodes that read t directly or through views, in run order."""
        out, stack, seen = [], [t], {id(t)}
        while stack:
            x = stack.pop()
            for u in self.raw.get(id(x), ()):
                if id(u) in seen:
                    continue
                seen.add(id(u))
                if u.op in VIEW_OPS:
                    stack.append(u)
                elif id(u) in self.pos:
                    out.append(u)
        return sorted(out, key=lambda u: self.pos[id(u)])

    def is_output(self, t: Tensor) -> bool:
        stack, seen = [t], {id(t)}
        while stack:
            x = stack.pop()
            if x.flags & TensorFlag.OUTPUT:
                return True
            for u in self.raw.get(id(x), ()):
                if u.op in VIEW_OPS and id(u) not in seen:
                    seen.add(id(u))
                    stack.append(u)
        return False

    def only_reader(self, t: Tensor, u: Tensor) -> bool:
        """u is the single reader of t and t is no graph output (so t need not be written)."""
        r = self.readers(t)
        return len(r) == 1 and r[0] is u and not self.is_output(t)

    def producer(self, t: Tensor | None) -> Tensor | None:
        """The run-list node whose output t is (or is a view of)."""
        while t is not None:
            if id(t) in self.pos:
                return t
            if t.op not in VIEW_OPS:
                return None
            t = t.view_src if t.view_src is not None else t.src_at(0)
        return None

    def safe(self, g: Group) -> bool:
        """Running g at g.at keeps every byte each node sees (see the module docstring): for each member, the
        nodes between its own position and g.at neither write what it reads or writes nor read what it
        writes, and its inputs are computed before g.at; and what the fused launch writes overlaps nothing
        it reads (see _inplace)."""
        if not _disjoint_io(g):
            return False
        p_at = self.pos[id(g.at)]
        ids = {id(m) for m in g.members}
        for m, reads, writes in g.io:
            reads = [t for t in reads if t is not None]
            writes = [t for t in writes if t is not None]
            for t in reads:
                p = self.producer(t)
                if p is not None and id(p) not in ids and self.pos[id(p)] >= p_at:
                    return False
            pm = self.pos[id(m)]
            lo, hi = min(pm, p_at), max(pm, p_at)
            wr = [_range(t) for t in writes]
            guard = wr + [_range(t) for t in reads]
            for n in self.run[lo + 1:hi]:
                if id(n) in ids:
                    continue
                w = _range(n)
                if any(_overlap(w, r) for r in guard):
                    return False
                if wr and any(_overlap(_range(s), r) for s in n.src if s is not None for r in wr):
                    return False
        return True


def _disjoint_io(g: Group) -> bool:
    """The allocator may give a member's output the memory of an input an earlier member read last, which
    unfused execution tolerates but one launch reading and writing both does not. Allowed: an output on
    exactly the bytes of an input read by the same member (an elementwise epilogue such as the residual), or
    by any member of a row-wise kernel."""
    reads = [(m, _range(t)) for m, rs, _ in g.io for t in rs if t is not None]
    writes = [(m, _range(t)) for m, _, ws in g.io for t in ws if t is not None]
    for i, (mw, w) in enumerate(writes):
        for mr, r in reads:
            if _overlap(w, r) and not (w == r and (g.rowwise or mr is mw)):
                return False
        if any(_overlap(w, w2) for _, w2 in writes[i + 1:]):
            return False
    return True


def _range(t: Tensor) -> tuple[int, int, int]:
    return (id(t.buffer), int(t.offset), int(t.offset + t.nbytes))


def _overlap(a: tuple[int, int, int], b: tuple[int, int, int]) -> bool:
    return a[0] == b[0] and a[1] < b[2] and b[1] < a[2]


# ---- matchers: each takes an unclaimed run node and returns a Group anchored on it, or None ------------------

def match_norm(g: Graph, n: Tensor, ctx: BuildCtx) -> Group | None:
    from .norm import build_norm_rope, build_rms_norm_mul, norm_rope_ok

    if n.op != GGMLOp.RMS_NORM:
        return None
    rd = g.readers(n)
    if len(rd) != 1 or g.is_output(n):
        return None
    mul = rd[0]
    if not _norm_mul_ok(n, mul):
        return None
    x, w = n.src[0], mul.src[1]
    rope_rd = g.readers(mul)
    if len(rope_rd) == 1 and not g.is_output(mul) and norm_rope_ok(n, mul, rope_rd[0]):
        rope = rope_rd[0]
        store = _rope_store(g, rope)
        if store is not None:
            return Group([n, mul, rope, store], store, lambda c: build_norm_rope(n, mul, rope, c, store),
                         [(n, [x], []), (mul, [w], []), (rope, [rope.src[1], rope.src_at(2)], []),
                          (store, [store.src[1]], [store])], rowwise=True, pairable=True)
        return Group([n, mul, rope], rope, lambda c: build_norm_rope(n, mul, rope, c),
                     [(n, [x], []), (mul, [w], []), (rope, [rope.src[1], rope.src_at(2)], [rope])], rowwise=True,
                     pairable=True)
    return Group([n, mul], mul, lambda c: build_rms_norm_mul(n, mul, c), [(n, [x], []), (mul, [w], [mul])],
                 rowwise=True)


def _norm_mul_ok(n: Tensor, mul: Tensor) -> bool:
    w = mul.src_at(1)
    if mul.op != GGMLOp.MUL or mul.src_at(0) is not n or w is None or w is n:
        return False
    if w.type != GGMLType.F32 or mul.type != GGMLType.F32 or n.type != GGMLType.F32:
        return False
    return mul.ne == n.ne and all(n.ne[d] % w.ne[d] == 0 for d in range(4)) and mul.nb[0] == 4


def _rope_store(g: Graph, rope: Tensor) -> Tensor | None:
    """The SET_ROWS that is the only reader of a contiguous rope output viewed as (ne0*ne1, ne2) rows."""
    rd = g.readers(rope)
    if len(rd) != 1 or g.is_output(rope) or not rope.is_contiguous:
        return None
    sr = rd[0]
    return sr if _store_ok(sr, rope, rope.ne[0] * rope.ne[1], rope.ne[2]) else None


def _store_ok(sr: Tensor, base: Tensor, row: int, n: int) -> bool:
    """sr = SET_ROWS(view of base as (row, n) rows, idx[n]) into a dense 2-D f16/f32 cache."""
    if sr.op != GGMLOp.SET_ROWS:
        return False
    v, idx = sr.src_at(0), sr.src_at(1)
    if v is None or idx is None or idx.type not in (GGMLType.I32, GGMLType.I64) or idx.ne[0] != n:
        return False
    if v is not base and (v.op not in VIEW_OPS or v.view_src is not base or v.view_offs != 0):
        return False
    if v.ne != (row, n, 1, 1) or not v.is_contiguous or v.type != GGMLType.F32:
        return False
    es = {GGMLType.F16: 2, GGMLType.F32: 4}.get(sr.type)
    return es is not None and sr.nb[0] == es and sr.ne[0] == row and sr.ne[2] == 1 and sr.ne[3] == 1


def match_glu(g: Graph, n: Tensor, ctx: BuildCtx) -> Group | None:
    """Anchored on either matmul of GLU(MUL_MAT gate, MUL_MAT up), one column, or their _ID forms."""
    if n.op not in (GGMLOp.MUL_MAT, GGMLOp.MUL_MAT_ID):
        return None
    rd = g.readers(n)
    if len(rd) != 1 or rd[0].op != GGMLOp.GLU:
        return None
    glu = rd[0]
    gate, up = glu.src_at(0), glu.src_at(1)
    if gate is None or up is None or gate is up or gate.op != n.op or up.op != n.op:
        return None
    if glu.param_i32(0) not in _GLU_FUSED or glu.type != GGMLType.F32 or not glu.is_contiguous:
        return None
    if not (g.only_reader(gate, glu) and g.only_reader(up, glu)):
        return None
    ag, au = gate.src[0], up.src[0]
    assert ag is not None and au is not None
    if ag.type != au.type or ag.ne[:2] != au.ne[:2] or gate.src[1] is not up.src[1] or gate.ne != glu.ne:
        return None
    write_f32 = _needs_f32(g, glu, ctx)
    if n.op == GGMLOp.MUL_MAT:
        b = gate.src[1]
        if not (mmvq_ok(gate, ctx, 1) and mmvq_ok(up, ctx, 1)) or b.ne[2] != 1 or b.ne[3] != 1:
            return None
        return Group([gate, up, glu], glu, lambda c: build_mmvq_glu(c, glu, gate, up, write_f32),
                     [(gate, [ag, b], []), (up, [au, b], []), (glu, [], [glu])])
    if gate.src[2] is not up.src[2] or not (mmvq_id_ok(gate, ctx) and mmvq_id_ok(up, ctx)):
        return None
    b, ids = gate.src[1], gate.src[2]
    return Group([gate, up, glu], glu, lambda c: build_mmvq_id_glu(c, glu, gate, up, write_f32),
                 [(gate, [ag, b, ids], []), (up, [au, b, ids], []), (glu, [], [glu])])


def _needs_f32(g: Graph, t: Tensor, ctx: BuildCtx) -> bool:
    """Whether anyone reads t other than as the q8 input of a matmul (then the f32 values must be written)."""
    if g.is_output(t) or not q8_cacheable(t):
        return True
    key = storage_key(t)
    for r in g.readers(t):
        if r.op == GGMLOp.MUL_MAT and mmvq_ok(r, ctx) and storage_key(r.src[1]) == key:
            continue
        if r.op == GGMLOp.MUL_MAT_ID and mmvq_id_ok(r, ctx) and storage_key(r.src[1]) == key:
            continue
        return True
    return False


def _moe_chain(g: Graph, mul: Tensor, mm: Tensor):
    """(weights, ADD chain, output, residual) of MUL(mm, weights [1, n_used, T]) -> n_used views -> ADD chain
    [-> ADD residual], or None."""
    w = mul.src_at(1)
    M, n_used, T = mm.ne[0], mm.ne[1], mm.ne[2]
    if mul.op != GGMLOp.MUL or mul.src_at(0) is not mm or w is None or w.type != GGMLType.F32 or n_used < 2:
        return None
    if w.ne != (1, n_used, T, 1) or mul.ne != mm.ne or not mul.is_contiguous or g.is_output(mul):
        return None
    views = {}
    for v in g.raw.get(id(mul), ()):
        if v.op not in VIEW_OPS or v.ne != (M, T, 1, 1) or v.nb[1] != mul.nb[2] or v.view_offs % mul.nb[1]:
            return None
        views[v.view_offs // mul.nb[1]] = v
    if sorted(views) != list(range(n_used)):
        return None
    chain, acc = [], views[0]
    for e in range(1, n_used):
        rd = g.readers(acc)
        if len(rd) != 1 or g.is_output(acc):
            return None
        add = rd[0]
        if add.op != GGMLOp.ADD or add.src_at(0) is not acc or add.src_at(1) is not views[e]:
            return None
        if add.type != GGMLType.F32 or add.ne != (M, T, 1, 1) or add.nb[0] != 4:
            return None
        chain.append(add)
        acc = add
    out, res = acc, None
    rd = g.readers(out)
    if len(rd) == 1 and not g.is_output(out) and rd[0].op == GGMLOp.ADD:
        r = _other_operand(rd[0], out)
        if r is not None and r.ne == out.ne and r.type == GGMLType.F32 and r.nb[0] == 4 and rd[0].nb[0] == 4:
            res, out = r, rd[0]
    return w, chain, out, res


def match_moe_sum(g: Graph, n: Tensor, ctx: BuildCtx) -> Group | None:
    """MUL_MAT_ID(down) -> MUL(weights [1, n_used, T]) -> n_used views -> ADD chain [-> ADD residual]: one
    matvec launch for decode batches."""
    if n.op != GGMLOp.MUL_MAT_ID or not mmvq_id_ok(n, ctx):
        return None
    rd = g.readers(n)
    if len(rd) != 1 or g.is_output(n):
        return None
    found = _moe_chain(g, rd[0], n)
    if found is None:
        return None
    w, chain, out, res = found
    mul = rd[0]
    members = [n, mul, *chain] + ([out] if res is not None else [])
    io = [(n, [n.src[0], n.src[1], n.src[2]], []), (mul, [w], []), (out, [res], [out])]
    return Group(members, out, lambda c: build_mmvq_id_sum(c, n, w, out, res), io)


def match_moe_wsum(g: Graph, n: Tensor, ctx: BuildCtx) -> Group | None:
    """The same weighted sum after expert matmuls that ran on their own (prefill): MUL, views and ADDs in
    one elementwise launch."""
    from .reduce import build_moe_wsum

    mm = n.src_at(0)
    if n.op != GGMLOp.MUL or mm is None or mm.op != GGMLOp.MUL_MAT_ID or not g.only_reader(mm, n):
        return None
    if mm.type != GGMLType.F32 or mm.nb[0] != 4:
        return None
    found = _moe_chain(g, n, mm)
    if found is None:
        return None
    w, chain, out, res = found
    members = [n, *chain] + ([out] if res is not None else [])
    io = [(n, [mm, w], []), (out, [res], [out])]
    return Group(members, out, lambda c: build_moe_wsum(c, mm, w, out, res), io)


def match_moe_router(g: Graph, n: Tensor, ctx: BuildCtx) -> Group | None:
    """llama.cpp's softmax MoE gating: SOFT_MAX(logits) read by ARGSORT(desc) and by GET_ROWS(probs as
    (1, n_exp, T), first n_used of the order) [-> SUM_ROWS -> CLAMP -> DIV(weights, sum)]."""
    from .reduce import SORT_MAX, build_moe_router, build_moe_router_mv, router_mv_ok

    mm = None
    if n.op == GGMLOp.MUL_MAT and _ROUTER_MV:  # decode: anchored on the logits matvec, which joins the launch
        rd = g.readers(n)
        if len(rd) != 1 or rd[0].op != GGMLOp.SOFT_MAX or g.is_output(n) or not router_mv_ok(n, ctx):
            return None
        mm, n = n, rd[0]
    if n.op != GGMLOp.SOFT_MAX or n.src_at(1) is not None or n.src_at(2) is not None or g.is_output(n):
        return None
    logits = n.src[0]
    n_exp, T = n.ne[0], n.ne[1]
    if (n.param_f32(0) != 1.0 or n.param_f32(1) != 0.0 or n.ne[2:] != (1, 1) or n_exp > SORT_MAX
            or not logits.is_contiguous or logits.type != GGMLType.F32 or not n.is_contiguous):
        return None
    rd = g.readers(n)
    srt = next((r for r in rd if r.op == GGMLOp.ARGSORT), None)
    gr = next((r for r in rd if r.op == GGMLOp.GET_ROWS), None)
    if len(rd) != 2 or srt is None or gr is None or srt.src[0] is not n or srt.param_i32(0) != 1:
        return None
    table, topk = gr.src_at(0), gr.src_at(1)
    if (table is None or topk is None or table.ne != (1, n_exp, T, 1) or table.view_src is not n
            or topk.view_src is not srt or topk.view_offs != 0 or topk.nb[1] != srt.nb[1] or topk.ne[1] != T
            or not srt.is_contiguous or gr.type != GGMLType.F32 or not gr.is_contiguous):
        return None
    n_used = topk.ne[0]
    if gr.ne != (1, n_used, T, 1):
        return None
    members, out, norm, clamp = [n, srt, gr], gr, None, None
    rd = g.readers(gr)
    if len(rd) == 2 and not g.is_output(gr):
        sr = next((r for r in rd if r.op == GGMLOp.SUM_ROWS), None)
        div = next((r for r in rd if r.op == GGMLOp.DIV), None)
        cl_rd = g.readers(sr) if sr is not None else []
        if (sr is not None and div is not None and len(cl_rd) == 1 and cl_rd[0].op == GGMLOp.CLAMP
                and not g.is_output(sr) and g.only_reader(cl_rd[0], div) and div.src_at(1) is cl_rd[0]
                and sr.src[0] is div.src[0] and sr.src[0].ne == (n_used, T, 1, 1)
                and div.ne == (n_used, T, 1, 1) and div.is_contiguous and div.type == GGMLType.F32):
            norm, clamp = div, cl_rd[0]
            members += [sr, clamp, div]
            out = div
    io = [(n, [logits], []), (srt, [], [srt]), (members[-1], [], [out])]
    if mm is not None:
        if mm is not logits:
            return None
        a, b = mm.src[0], mm.src[1]
        return Group([mm, *members], members[-1],
                     lambda c: build_moe_router_mv(c, mm, n, srt, gr, norm, clamp),
                     [(mm, [a, b], []), *io[1:]])
    return Group(members, members[-1], lambda c: build_moe_router(c, n, srt, gr, norm, clamp), io,
                 rowwise=True)


def _other_operand(add: Tensor, t: Tensor) -> Tensor | None:
    a, b = add.src_at(0), add.src_at(1)
    if a is t and b is not t:
        return b
    if b is t and a is not t:
        return a
    return None


def match_mm_add(g: Graph, n: Tensor, ctx: BuildCtx) -> Group | None:
    """MUL_MAT whose only reader is ADD(mm, r) of the same shape: the residual add in the epilogue."""
    if n.op != GGMLOp.MUL_MAT or not mmvq_ok(n, ctx):
        return None
    rd = g.readers(n)
    if len(rd) != 1 or g.is_output(n) or rd[0].op != GGMLOp.ADD or n.ne[2] != 1 or n.ne[3] != 1:
        return None
    add = rd[0]
    r = _other_operand(add, n)
    if r is None or r.type != GGMLType.F32 or r.ne != n.ne or r.nb[0] != 4:
        return None
    if add.type != GGMLType.F32 or add.ne != n.ne or add.nb[0] != 4:
        return None
    a, b = n.src[0], n.src[1]
    return Group([n, add], add, lambda c: build_mmvq(c, n, [MatOut(a, add, add.nb[1])], b, residual=r),
                 [(n, [a, b], []), (add, [r], [add])])


def match_shared_input(g: Graph, n: Tensor, ctx: BuildCtx, claimed: set[int]) -> Group | None:
    """Up to three q8 matmuls of one weight type reading the same src1 (Q/K/V), each optionally storing
    its result into a KV cache (a SET_ROWS that is its only reader)."""
    if n.op != GGMLOp.MUL_MAT or not mmvq_ok(n, ctx) or n.ne[2] != 1 or n.ne[3] != 1:
        return None
    b = n.src[1]
    mms = [n]
    for r in g.readers(b):
        if len(mms) == 3:
            break
        if (r is not n and r.op == GGMLOp.MUL_MAT and id(r) not in claimed and r.src[1] is b
                and g.pos[id(r)] > g.pos[id(n)] and mmvq_ok(r, ctx) and r.src[0].type == n.src[0].type
                and r.ne[2] == 1 and r.ne[3] == 1):
            mms.append(r)
    mats, members, io = [], [], []
    for mm in mms:
        members.append(mm)
        store = _mm_store(g, mm)
        if store is not None:
            members.append(store)
            io += [(mm, [mm.src[0], b], []), (store, [store.src[1]], [store])]
            mats.append(MatOut(mm.src[0], store, store.nb[1], store.src[1], store.type == GGMLType.F16))
        else:
            io.append((mm, [mm.src[0], b], [mm]))
            mats.append(MatOut(mm.src[0], mm, mm.nb[1]))
    if len(members) == 1:
        return None  # a lone matmul: the plain builder does the same
    return Group(members, n, lambda c: build_mmvq(c, n, mats, b), io)


def match_shared_input_prefill(g: Graph, n: Tensor, ctx: BuildCtx, claimed: set[int]) -> Group | None:
    """Up to three prefill matmuls of one weight type reading the same src1: one tensor-core launch (more
    blocks for the small Q/K/V projections)."""
    from .matmul import build_mul_mat_multi, mma_multi_ok

    if n.op != GGMLOp.MUL_MAT or not mma_multi_ok(n, ctx):
        return None
    b = n.src[1]
    mms = [n]
    for r in g.readers(b):
        if len(mms) == 3:
            break
        if (r is not n and r.op == GGMLOp.MUL_MAT and id(r) not in claimed and r.src[1] is b
                and g.pos[id(r)] > g.pos[id(n)] and mma_multi_ok(r, ctx) and r.src[0].type == n.src[0].type):
            mms.append(r)
    if len(mms) == 1:
        return None
    io = [(m, [m.src[0], b], [m]) for m in mms]
    return Group(list(mms), n, lambda c: build_mul_mat_multi(c, mms), io)


def _mm_store(g: Graph, mm: Tensor) -> Tensor | None:
    rd = g.readers(mm)
    if len(rd) != 1 or g.is_output(mm) or not mm.is_contiguous or mm.ne[1] != 1:
        return None
    return rd[0] if _store_ok(rd[0], mm, mm.ne[0], mm.ne[1]) else None


def plan(nodes: Sequence[Tensor], run: Sequence[Tensor], ctx: BuildCtx,
         build_one: Callable[[Tensor, BuildCtx], list]) -> list:
    """Launches for the run list with every safe fusion applied; `build_one` builds an unfused node."""
    from .mmvq import q8_invalidate

    g = Graph(nodes, run)
    for n in run:  # which tensors some matmul reads as q8 (their producers write the copy)
        if (n.op == GGMLOp.MUL_MAT and mmvq_ok(n, ctx)) or (n.op == GGMLOp.MUL_MAT_ID and mmvq_id_ok(n, ctx)):
            ctx.q8_wanted.add(storage_key(n.src[1]))
    claimed: dict[int, Group | None] = {}
    launches: list = []
    last: Group | None = None  # the group of launches[-1], when pairable
    for n in run:
        grp = claimed.get(id(n), False)
        if grp is False:
            grp = _match(g, n, ctx, claimed)
            if grp is not None:
                for m in grp.members:
                    claimed[id(m)] = grp
        if grp is not None and grp is not False and grp.at is not n:
            continue  # runs at another member's position
        before = set(map(id, ctx.q8.values()))
        if grp:
            built = grp.build(ctx)
            pair = _pair(ctx, launches[-1], built[0]) if (grp.pairable and last is not None and len(built) == 1
                                                          and _independent(last, grp) and _PAIRS) else None
            if pair is not None:
                launches[-1] = pair
                last = None
            else:
                launches += built
                last = grp if grp.pairable and len(built) == 1 else None
            written = grp.writes
        else:
            launches += build_one(n, ctx)
            written = [n]
            last = None
        q8_invalidate(ctx, written, [v for v in ctx.q8.values() if id(v) not in before])
    return launches


def _independent(a: Group, b: Group) -> bool:
    """Whether b may run alongside a: neither writes what the other reads or writes."""
    wa, wb = [_range(t) for t in a.writes], [_range(t) for t in b.writes]
    ra, rb = [_range(t) for t in a.reads], [_range(t) for t in b.reads]
    return not any(_overlap(w, x) for w in wa for x in rb + wb) and not any(_overlap(w, x) for w in wb for x in ra)


def _pair(ctx: BuildCtx, a, b):
    """Two k_norm_rope launches as one k_norm_rope2 launch (a's blocks first), or None."""
    import numpy as np

    from ..cupy_backend import Launch

    na, nb = a.grid[0] * a.grid[1], b.grid[0] * b.grid[1]
    if a.block != b.block or a.smem or b.smem or na + nb > 65535 or a.grid[2] != 1 or b.grid[2] != 1:
        return None
    return Launch(ctx.fn("norm", "k_norm_rope2"), (na + nb, 1, 1), a.block, (*a.args, *b.args, np.int32(na)), 0)


def _match(g: Graph, n: Tensor, ctx: BuildCtx, claimed: dict) -> Group | None:
    for m in (match_norm, match_moe_router, match_glu, match_moe_sum, match_moe_wsum, match_mm_add):
        grp = m(g, n, ctx)
        if grp is not None and all(id(x) not in claimed for x in grp.members) and g.safe(grp):
            return grp
    for m2 in (match_shared_input, match_shared_input_prefill):
        grp = m2(g, n, ctx, set(claimed))
        if grp is not None and all(id(x) not in claimed for x in grp.members) and g.safe(grp):
            return grp
    return None
