"""hybridllm.ggml.ops builds the same nodes as the real ggml (the peer's libggml-base, via ctypes).

Each case builds a small graph twice, with ggml's constructors and with ours, and compares every tensor
reachable from the result field by field: type, ne, nb, op, op_params, flags, name, view_offs, and the
structure of src / view_src.
"""
from __future__ import annotations

import ctypes
import struct
from collections.abc import Callable
from typing import Any

import pytest

from hybridllm.ggml import ops
from hybridllm.ggml.tensor import Tensor
from hybridllm.ggml.types import GGMLOp, GGMLType, GluOp, UnaryOp
from hybridllm.testing.ggml_ref import _CTYPES, GT, GGMLGraph, _Converter

# ggml.h signatures after the context argument (codes of ggml_ref: t tensor, i int32, l int64, z size_t,
# f float, b bool, a int32[4]); "nc:" marks functions without a context.
SIGS = {
    "reshape_1d": "tl", "reshape_2d": "tll", "reshape_3d": "tlll", "reshape_4d": "tllll",
    "view_1d": "tlz", "view_2d": "tllzz", "view_3d": "tlllzzz", "view_4d": "tllllzzzz",
    "permute": "tiiii", "transpose": "t", "cont": "t", "cont_4d": "tllll", "dup": "t", "cpy": "tt",
    "cast": "ti", "add": "tt", "sub": "tt", "mul": "tt", "div": "tt", "add_inplace": "tt",
    "scale": "tf", "scale_bias": "tff", "clamp": "tff", "unary": "ti", "leaky_relu": "tfb",
    "glu": "tib", "glu_split": "tti", "swiglu_split": "tt", "geglu_split": "tt", "swiglu": "t",
    "swiglu_oai": "ttff", "rms_norm": "tf", "norm": "tf", "l2_norm": "tf",
    "sum_rows": "t", "mean": "t", "sum": "t", "argmax": "t", "argsort": "ti", "argsort_top_k": "ti",
    "top_k": "ti", "concat": "tti", "repeat": "tt", "repeat_4d": "tllll", "pad": "tiiii",
    "pad_ext": "tiiiiiiii", "fill": "tf", "arange": "fff", "mul_mat": "tt", "mul_mat_id": "ttt",
    "get_rows": "tt", "set_rows": "ttt", "soft_max": "t", "soft_max_ext": "ttff",
    "rope_ext": "tttiiiffffff", "rope_multi": "tttiaiiffffff", "flash_attn_ext": "ttttfff",
    "im2col": "ttiiiiiibi", "conv_2d": "ttiiiiii", "interpolate": "tlllli", "upscale": "tii",
    "nc:flash_attn_ext_set_prec": "ti", "nc:flash_attn_ext_add_sinks": "tt", "nc:soft_max_add_sinks": "tt",
    **{n: "t" for n in ("sqr", "sqrt", "log", "sin", "cos", "tanh", "silu", "gelu", "gelu_erf", "gelu_quick",
                         "sigmoid", "relu", "exp", "neg", "softplus", "expm1", "hardswish", "abs")},
}


def ggml_call(g: GGMLGraph, name: str, *args: Any) -> GT | None:
    noctx = "nc:" + name in SIGS
    sig = SIGS["nc:" + name] if noctx else SIGS[name]
    assert len(sig) == len(args), f"ggml_{name}: {len(args)} arguments for signature {sig}"
    fn = getattr(g.base_lib, "ggml_" + name)
    fn.argtypes = ([] if noctx else [ctypes.c_void_p]) + [_CTYPES[c] for c in sig]
    fn.restype = ctypes.c_void_p
    conv = [None if (c == "t" and a is None) else a.ptr if c == "t" else (ctypes.c_int32 * 4)(*a)
            if c == "a" else a for c, a in zip(sig, args)]
    ptr = fn(*conv) if noctx else fn(g.ctx, *conv)
    return GT(ptr, g) if ptr else None

F32, F16, I32, I64, Q8_0, Q4_K = (GGMLType.F32, GGMLType.F16, GGMLType.I32, GGMLType.I64, GGMLType.Q8_0,
                                  GGMLType.Q4_K)


class Both:
    """A tensor built on both sides: `ref` in real ggml, `ours` with hybridllm.ggml.ops."""

    def __init__(self, ref: GT, ours: Tensor) -> None:
        self.ref, self.ours = ref, ours


class Pair:
    def __init__(self) -> None:
        self.g = GGMLGraph(mem_size=8 << 20)
        self.n = 0

    def new(self, type: int, *ne: int) -> Both:
        self.n += 1
        name = f"in{self.n}"
        ours = ops.set_name(ops.new_tensor(type, *ne), name)
        return Both(self.g.new(type, ne, name=name), ours)

    def __call__(self, fn: str, *args: Any, ours_fn: Callable[..., Any] | None = None) -> Both | None:
        ref = ggml_call(self.g, fn, *[a.ref if isinstance(a, Both) else a for a in args])
        impl = ours_fn or getattr(ops, fn)
        ours = impl(*[a.ours if isinstance(a, Both) else a for a in args])
        if ref is None:
            return None
        return Both(ref, ours if ours is not None else args[0].ours)

    def check(self, b: Both) -> None:
        conv = _Converter(self.g, None)  # type: ignore[arg-type]
        _same(conv.tensor(b.ref.ptr), b.ours, {})


def _same(ref: Tensor, ours: Tensor, seen: dict[int, int]) -> None:
    if id(ref) in seen:
        assert seen[id(ref)] == id(ours), f"{ours.name!r}: graph structure differs (shared node)"
        return
    seen[id(ref)] = id(ours)
    where = f"{ref.op.name} {ref.name!r}"
    assert ours.type == ref.type, f"{where}: type {ours.type!r} != {ref.type!r}"
    assert ours.ne == ref.ne, f"{where}: ne {ours.ne} != {ref.ne}"
    assert ours.nb == ref.nb, f"{where}: nb {ours.nb} != {ref.nb}"
    assert ours.op == ref.op, f"{where}: op {ours.op.name} != {ref.op.name}"
    assert ours.op_params == ref.op_params, f"{where}: op_params {ours.op_params[:48].hex()} != {ref.op_params[:48].hex()}"
    assert ours.flags == ref.flags, f"{where}: flags {ours.flags} != {ref.flags}"
    assert ours.name == ref.name, f"{where}: name {ours.name!r} != {ref.name!r}"
    assert ours.view_offs == ref.view_offs, f"{where}: view_offs {ours.view_offs} != {ref.view_offs}"
    assert (ours.view_src is None) == (ref.view_src is None), f"{where}: view_src presence differs"
    if ref.view_src is not None:
        _same(ref.view_src, ours.view_src, seen)  # type: ignore[arg-type]
    assert len(ours.src) == len(ref.src), f"{where}: {len(ours.src)} sources != {len(ref.src)}"
    for rs, os_ in zip(ref.src, ours.src):
        assert (rs is None) == (os_ is None), f"{where}: source presence differs"
        if rs is not None:
            _same(rs, os_, seen)  # type: ignore[arg-type]


@pytest.fixture
def p():
    pair = Pair()
    yield pair
    pair.g.close()


def test_views_and_layout(p: Pair) -> None:
    a = p.new(F32, 64, 6, 2)
    v2 = p("view_2d", a, 32, 6, a.ours.nb[1], 16)
    v3 = p("view_3d", v2, 8, 4, 6, 32, a.ours.nb[1], 4)  # view of a view: offsets accumulate
    p.check(v3)
    v4 = p("view_4d", a, 16, 3, 2, 2, 256, 512, 1536, 64)
    p.check(v4)
    p.check(p("view_1d", a, 100, 8))
    c = p("cont", v2)
    r = p("reshape_4d", c, 8, 4, 3, 2)
    p.check(p("permute", r, 0, 2, 1, 3))
    p.check(p("permute", r, 2, 0, 3, 1))
    p.check(p("transpose", p("reshape_2d", c, 16, 12)))
    p.check(p("cont_4d", p("transpose", a), 6, 64, 2, 1))
    p.check(p("reshape_1d", a, 768))
    p.check(p("reshape_3d", a, 32, 12, 2))


def test_copies_and_casts(p: Pair) -> None:
    a = p.new(F32, 32, 4)
    dst = p.new(F16, 128)
    p.check(p("cpy", a, dst))
    p.check(p("cast", a, int(F16)))
    p.check(p("dup", a))
    p.check(p("cont", p("permute", a, 1, 0, 2, 3)))


def test_elementwise_and_unary(p: Pair) -> None:
    a = p.new(F32, 16, 4, 3)
    row = p.new(F32, 16)
    col = p.new(F32, 1, 4)
    for fn in ("add", "sub", "mul", "div"):
        p.check(p(fn, a, row))
        p.check(p(fn, a, col))
    p.check(p("add_inplace", a, row, ours_fn=lambda x, y: ops.add(x, y, inplace=True)))
    p.check(p("scale", a, 0.125))
    p.check(p("scale_bias", a, 2.0, -1.5))
    p.check(p("clamp", a, -1.0, float("inf")))
    for name in ("sqr", "sqrt", "log", "sin", "cos", "tanh", "silu", "gelu", "gelu_erf", "gelu_quick",
                 "sigmoid", "relu", "exp", "neg", "softplus", "expm1", "hardswish"):
        p.check(p(name, a))
    p.check(p("abs", a, ours_fn=ops.abs_))
    p.check(p("unary", a, int(UnaryOp.ELU), ours_fn=ops.unary))
    p.check(p("leaky_relu", a, 0.1, False))


def test_glu_and_norms(p: Pair) -> None:
    gate, up = p.new(F32, 24, 5), p.new(F32, 24, 5)
    p.check(p("swiglu_split", gate, up))
    p.check(p("geglu_split", gate, up))
    p.check(p("glu_split", gate, up, int(GluOp.REGLU), ours_fn=ops.glu_split))
    p.check(p("swiglu", gate))
    p.check(p("glu", gate, int(GluOp.GEGLU), True, ours_fn=ops.glu))
    p.check(p("swiglu_oai", gate, up, 1.702, 7.0))
    for fn in ("rms_norm", "norm", "l2_norm"):
        p.check(p(fn, gate, 1e-6))


def test_reductions_and_shapes(p: Pair) -> None:
    a = p.new(F32, 10, 4, 3)
    for fn in ("sum_rows", "mean", "sum"):
        p.check(p(fn, a))
    p.check(p("argmax", p.new(F32, 10, 4)))
    p.check(p("argsort", a, 1))
    p.check(p("argsort_top_k", a, 3))
    p.check(p("top_k", a, 3))
    p.check(p("concat", a, p.new(F32, 10, 2, 3), 1))
    p.check(p("repeat", p.new(F32, 10, 1, 3), a))
    p.check(p("repeat_4d", p.new(F32, 1, 4, 1), 1, 4, 6, 1))
    p.check(p("pad", a, 6, 0, 0, 0))
    p.check(p("pad_ext", a, 1, 2, 0, 1, 0, 0, 0, 0))
    p.check(p("fill", a, -float("inf")))
    p.check(p("arange", 0.0, 10.0, 3.0))


def test_matmul_rows(p: Pair) -> None:
    w = p.new(Q8_0, 64, 16)
    x = p.new(F32, 64, 5)
    p.check(p("mul_mat", w, x))
    k = p.new(F16, 32, 7, 2, 1)
    q = p.new(F32, 32, 3, 8, 1)  # GQA broadcast over dim 2
    p.check(p("mul_mat", k, q))
    emb = p.new(Q4_K, 256, 100)
    ids = p.new(I32, 6)
    p.check(p("get_rows", emb, ids))
    probs = p.new(F32, 1, 8, 6)
    sel = p.new(I32, 2, 6)
    p.check(p("get_rows", probs, sel))
    exps = p.new(Q8_0, 64, 32, 8)
    xb = p.new(F32, 64, 1, 6)
    p.check(p("mul_mat_id", exps, xb, sel))
    cache = p.new(F16, 64, 32)
    rows = p.new(F32, 64, 5)
    idx = p.new(I64, 5)
    p.check(p("set_rows", cache, rows, idx))


def test_attention_ops(p: Pair) -> None:
    q = p.new(F32, 64, 4, 7)
    pos = p.new(I32, 7)
    ff = p.new(F32, 32)
    args = (64, 2, 4096, 1e6, 0.5, 1.0, 1.0, 32.0, 1.0)
    p.check(p("rope_ext", q, pos, None, *args))
    p.check(p("rope_ext", q, pos, ff, 64, 0, 8192, 5e5, 1.0, 0.0, 1.0, 32.0, 1.0))
    pos4 = p.new(I32, 28)
    p.check(p("rope_multi", q, pos4, None, 64, [8, 12, 12, 0], 40, 32768, 1e6, 1.0, 0.0, 1.0, 32.0, 1.0))

    kq = p.new(F32, 256, 7, 4)
    mask = p.new(F16, 256, 7)
    p.check(p("soft_max_ext", kq, mask, 0.125, 0.0))
    p.check(p("soft_max", kq))

    qp = p("permute", q, 0, 2, 1, 3)
    kc = p.new(F16, 64, 2, 256)
    kp = p("permute", kc, 0, 2, 1, 3)
    fa = p("flash_attn_ext", qp, kp, kp, mask, 0.125, 0.0, 30.0)
    p("flash_attn_ext_set_prec", fa, 10)
    sinks = p.new(F32, 4)
    p("flash_attn_ext_add_sinks", fa, sinks)
    p.check(fa)
    sm = p("soft_max_ext", kq, mask, 1.0, 0.0)
    p("soft_max_add_sinks", sm, sinks)
    p.check(sm)


def test_vision_ops(p: Pair) -> None:
    kernel = p.new(F16, 14, 14, 3, 32)
    image = p.new(F32, 56, 42, 3, 1)
    p.check(p("im2col", kernel, image, 14, 14, 0, 0, 1, 1, True, int(F16)))
    p.check(p("conv_2d", kernel, image, 14, 14, 0, 0, 1, 1))
    grid = p.new(F32, 6, 4, 8)
    p.check(p("interpolate", grid, 9, 7, 8, 1, 1 | (1 << 8)))
    p.check(p("upscale", grid, 2, 0))


def test_rejects_what_ggml_asserts() -> None:
    a = ops.new_tensor_2d(F32, 8, 4)
    with pytest.raises(ops.GraphError):
        ops.add(a, ops.new_tensor_2d(F32, 3, 4))
    with pytest.raises(ops.GraphError):
        ops.reshape_2d(ops.transpose(a), 4, 8)
    with pytest.raises(ops.GraphError):
        ops.view_2d(a, 8, 4, 32, 4)  # runs past the end of a
    with pytest.raises(ops.GraphError):
        ops.mul_mat(ops.transpose(a), a)


def test_graph_order_and_select() -> None:
    """Graph visits sources depth-first like ggml_visit_parents; select leaves other branches unflagged."""
    x = ops.set_name(ops.new_tensor_2d(F32, 8, 2), "x")
    a = ops.scale(x, 2.0)
    b = ops.add(a, x)
    c = ops.mul(b, a)
    g = ops.Graph()
    g.expand(c)
    assert g.nodes == [a, b, c] and g.leafs == [x]
    assert [n.name for n in g.nodes] == ["node_0", "node_1", "node_2"]
    other = ops.scale(x, 3.0)
    g2 = ops.Graph()
    g2.select([other, a], 1)
    assert other in g2.nodes and not other.computes and a.computes
    assert struct.unpack_from("<f", a.op_params, 0)[0] == 2.0
    assert a.op == GGMLOp.SCALE
