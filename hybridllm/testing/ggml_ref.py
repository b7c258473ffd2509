"""An oracle for backend ops: build a graph with the real ggml CPU library (the peer's), run it there and
on one of our backends, and compare every node.

The ggml context lives in a numpy byte array we own, so a tensor's `data` pointer is an offset into it.
After the graph is built, the whole context memory is mirrored into one backend buffer, each
`struct ggml_tensor` of the graph is read from memory and turned into our `Tensor` IR (exact ne, nb,
op_params, flags, src, view_src as ggml produced them), both sides compute, and node outputs are
compared (test-backend-ops style).

    g = GGMLGraph()
    a = g.new(GGMLType.F32, (64, 4), rng.standard_normal((4, 64)))
    out = g.rms_norm(a, 1e-6)          # any ggml_<op>(ctx, ...) constructor by name
    res = g.run(out)                   # ggml computes, then our backend computes
    res.assert_close(rtol=1e-6)
"""
from __future__ import annotations

import ctypes
import os
import struct
from ctypes import c_bool, c_float, c_int32, c_int64, c_size_t, c_void_p
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..backends.base import Backend, Buffer
from ..ggml.tensor import Tensor
from ..ggml.types import TRAITS, VIEW_OPS, GGMLOp, GGMLType, type_name
from .peer import load_peer

# struct ggml_tensor layout (ggml.h, 64-bit): checked against the header in tests/ops/test_oracle.py.
_T_TYPE, _T_NE, _T_NB, _T_OP, _T_PARAMS, _T_FLAGS = 0, 16, 48, 80, 84, 148
_T_SRC, _T_VIEW_SRC, _T_VIEW_OFFS, _T_DATA, _T_NAME = 152, 232, 240, 248, 256
_T_SIZE = 336
_MAX_SRC = 10

# Constructor signatures after the leading context argument: t tensor, i int32, l int64, z size_t,
# f float, b bool, a int32[4] array. Names without "ctx:" take no context (they modify a tensor).
_SIGS: dict[str, str] = {
    # elementwise / unary
    **{n: "tt" for n in ("add", "sub", "mul", "div", "add1", "add_inplace", "mul_inplace", "cpy",
                          "get_rows", "repeat")},
    **{n: "t" for n in ("sqr", "sqrt", "log", "sin", "cos", "sum", "sum_rows", "mean", "argmax", "cont",
                         "dup", "transpose", "abs", "sgn", "neg", "step", "tanh", "elu", "relu", "sigmoid",
                         "gelu", "gelu_quick", "silu", "hardswish", "hardsigmoid", "exp", "expm1",
                         "softplus", "gelu_erf", "floor", "ceil", "round", "trunc", "sqr_inplace",
                         "reglu", "geglu", "swiglu", "geglu_erf", "geglu_quick", "reglu_swapped",
                         "geglu_swapped", "swiglu_swapped", "geglu_erf_swapped", "geglu_quick_swapped",
                         "dup_inplace", "cumsum")},
    "unary": "ti", "glu": "tib", "glu_split": "tti", "swiglu_oai": "ttff", "swiglu_clamp": "ttf",
    "xielu": "tffff", "leaky_relu": "tfb",
    "scale": "tf", "scale_bias": "tff", "clamp": "tff",
    "norm": "tf", "rms_norm": "tf", "l2_norm": "tf", "rms_norm_inplace": "tf",
    "cast": "ti", "set_rows": "ttt", "add_id": "ttt", "group_norm": "tif",
    "cont_4d": "tllll", "reshape_4d": "tllll", "repeat_4d": "tllll",
    "view_1d": "tlz", "view_2d": "tllzz", "view_3d": "tlllzzz", "view_4d": "tllllzzzz",
    "permute": "tiiii",
    "rope_ext": "tttiiiffffff", "rope_multi": "tttiaiiffffff", "rope_ext_inplace": "tttiiiffffff",
    "soft_max": "t", "soft_max_ext": "ttff",
    "flash_attn_ext": "ttttfff",
    "argsort": "ti", "top_k": "ti", "argsort_top_k": "ti",
    "concat": "tti", "pad": "tiiii", "pad_ext": "tiiiiiiii", "pad_circular": "tiiii",
    "pad_ext_circular": "tiiiiiiii", "fill": "tf", "fill_inplace": "tf", "arange": "fff",
    "im2col": "ttiiiiiibi", "interpolate": "tlllli", "upscale": "tii", "tri": "ti",
    # no context
    "nc:soft_max_add_sinks": "tt", "nc:flash_attn_ext_add_sinks": "tt", "nc:flash_attn_ext_set_prec": "ti",
    "nc:rope_set_offset": "ti", "nc:set_output": "t", "nc:set_input": "t",
}
_CTYPES = {"t": c_void_p, "i": c_int32, "l": c_int64, "z": c_size_t, "f": c_float, "b": c_bool,
           "a": ctypes.POINTER(c_int32)}


class _GgmlInitParams(ctypes.Structure):
    _fields_ = [("mem_size", c_size_t), ("mem_buffer", c_void_p), ("no_alloc", c_bool)]


_LIBS: tuple[ctypes.CDLL, ctypes.CDLL] | None = None


def ggml_libs() -> tuple[ctypes.CDLL, ctypes.CDLL]:
    """(libggml-base, libggml-cpu) of the peer wheel, loaded once."""
    global _LIBS
    if _LIBS is None:
        # Keep intermediate results materialized (RMS_NORM+MUL fusion would skip writing the norm).
        os.environ.setdefault("GGML_CPU_DISABLE_FUSION", "1")
        lcp = load_peer()
        d = Path(lcp.__file__).parent
        base = ctypes.CDLL(str(d / "libggml-base.so.0"), mode=ctypes.RTLD_GLOBAL)
        cpu = ctypes.CDLL(str(d / "libggml-cpu.so.0"), mode=ctypes.RTLD_GLOBAL)
        base.ggml_init.argtypes = [_GgmlInitParams]
        base.ggml_init.restype = c_void_p
        base.ggml_free.argtypes = [c_void_p]
        base.ggml_new_tensor_4d.argtypes = [c_void_p, c_int32, c_int64, c_int64, c_int64, c_int64]
        base.ggml_new_tensor_4d.restype = c_void_p
        base.ggml_new_graph_custom.argtypes = [c_void_p, c_size_t, c_bool]
        base.ggml_new_graph_custom.restype = c_void_p
        base.ggml_build_forward_expand.argtypes = [c_void_p, c_void_p]
        base.ggml_graph_n_nodes.argtypes = [c_void_p]
        base.ggml_graph_node.argtypes = [c_void_p, c_int32]
        base.ggml_graph_node.restype = c_void_p
        base.ggml_set_name.argtypes = [c_void_p, ctypes.c_char_p]
        base.ggml_set_name.restype = c_void_p
        base.ggml_quantize_chunk.argtypes = [c_int32, c_void_p, c_void_p, c_int64, c_int64, c_int64, c_void_p]
        base.ggml_quantize_chunk.restype = c_size_t
        base.ggml_quantize_requires_imatrix.argtypes = [c_int32]
        base.ggml_quantize_requires_imatrix.restype = c_bool
        cpu.ggml_graph_compute_with_ctx.argtypes = [c_void_p, c_void_p, c_int32]
        cpu.ggml_graph_compute_with_ctx.restype = c_int32
        _LIBS = (base, cpu)
    return _LIBS


@dataclass(frozen=True)
class GT:
    """A handle to a ggml tensor of a GGMLGraph (its struct address)."""
    ptr: int
    g: GGMLGraph = field(repr=False, compare=False)

    @property
    def raw(self) -> bytes:
        return self.g.struct_bytes(self.ptr)

    @property
    def type(self) -> GGMLType:
        return GGMLType(struct.unpack_from("<i", self.raw, _T_TYPE)[0])

    @property
    def ne(self) -> tuple[int, int, int, int]:
        return struct.unpack_from("<4q", self.raw, _T_NE)  # type: ignore[return-value]

    @property
    def nb(self) -> tuple[int, int, int, int]:
        return struct.unpack_from("<4Q", self.raw, _T_NB)  # type: ignore[return-value]

    @property
    def offset(self) -> int:
        return struct.unpack_from("<Q", self.raw, _T_DATA)[0] - self.g.base

    def set_name(self, name: str) -> GT:
        self.g.base_lib.ggml_set_name(self.ptr, name.encode())
        return self


def _nbytes(t: int, ne: Sequence[int], nb: Sequence[int]) -> int:
    from ..ggml.types import nbytes
    return nbytes(t, tuple(ne), tuple(nb))


class GGMLGraph:
    """A ggml context over a numpy array we own; op constructors are reached as attributes."""

    def __init__(self, mem_size: int = 64 << 20) -> None:
        self.base_lib, self.cpu_lib = ggml_libs()
        self.mem = np.zeros(mem_size, dtype=np.uint8)
        self.base = self.mem.ctypes.data
        self.ctx = self.base_lib.ggml_init(_GgmlInitParams(mem_size, self.base, False))
        if not self.ctx:
            raise RuntimeError("ggml_init failed")
        self._count = 0

    def close(self) -> None:
        if self.ctx:
            self.base_lib.ggml_free(self.ctx)
            self.ctx = None

    def __enter__(self) -> GGMLGraph:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    def struct_bytes(self, ptr: int) -> bytes:
        off = ptr - self.base
        if 0 <= off <= self.mem.size - _T_SIZE:
            return self.mem[off:off + _T_SIZE].tobytes()
        return ctypes.string_at(ptr, _T_SIZE)

    # --- building ------------------------------------------------------------------------------
    def new(self, type: int, ne: Sequence[int], data: np.ndarray | None = None, name: str = "") -> GT:
        """A new tensor; `data` (any shape with the right element count) is converted to its type:
        quantized types are quantized with ggml's own reference quantizer. uint8 `data` is stored as raw
        bytes instead (random blocks test a decoder on every bit pattern)."""
        ne4 = tuple(ne) + (1,) * (4 - len(ne))
        ptr = self.base_lib.ggml_new_tensor_4d(self.ctx, int(type), *ne4)
        if not ptr:
            raise MemoryError("ggml context is full")
        t = GT(ptr, self)
        self._count += 1
        t.set_name(name or f"in{self._count}")
        if data is not None:
            self.upload(t, data)
        return t

    @np.errstate(invalid="ignore", over="ignore")
    def upload(self, t: GT, data: np.ndarray) -> None:
        tt = t.type
        ne, nb = t.ne, t.nb
        values = np.asarray(data)
        if values.dtype == np.uint8 and tt != GGMLType.I8:   # raw bytes (e.g. random blocks)
            n = _nbytes(tt, ne, nb)
            self.mem[t.offset:t.offset + n] = values.reshape(-1)[:n]
            return
        if TRAITS[tt].quantized:
            src = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
            nrows = ne[1] * ne[2] * ne[3]
            imat = None
            if self.base_lib.ggml_quantize_requires_imatrix(int(tt)):
                imat = np.ones(ne[0], dtype=np.float32)
            self.base_lib.ggml_quantize_chunk(int(tt), src.ctypes.data, self.base + t.offset, 0, nrows, ne[0],
                                              imat.ctypes.data if imat is not None else None)
            return
        from ..backends.numpy_ops.common import NP_DTYPES, f32_to_bf16
        dt = NP_DTYPES[tt]
        arr = np.ndarray((ne[3], ne[2], ne[1], ne[0]), dtype=dt, buffer=self.mem, offset=t.offset,
                         strides=(nb[3], nb[2], nb[1], nb[0]))
        values = values.reshape(arr.shape)
        arr[...] = f32_to_bf16(values.astype(np.float32)) if tt == GGMLType.BF16 else values

    def __getattr__(self, name: str) -> Callable[..., Any]:
        if name.startswith("_"):
            raise AttributeError(name)
        sig, noctx = _SIGS.get(name), False
        if sig is None:
            sig, noctx = _SIGS.get("nc:" + name), True
        if sig is None:
            raise AttributeError(f"no signature known for ggml_{name}; add it to _SIGS")
        fn = getattr(self.base_lib, "ggml_" + name)
        fn.argtypes = ([] if noctx else [c_void_p]) + [_CTYPES[c] for c in sig]
        fn.restype = c_void_p

        def call(*args: Any) -> GT | None:
            if len(args) != len(sig):
                raise TypeError(f"ggml_{name} takes {len(sig)} arguments after ctx, got {len(args)}")
            conv = [self._arg(c, a) for c, a in zip(sig, args)]
            ptr = fn(*conv) if noctx else fn(self.ctx, *conv)
            return GT(ptr, self) if ptr else None
        return call

    @staticmethod
    def _arg(code: str, a: Any) -> Any:
        if code == "t":
            return None if a is None else a.ptr
        if code == "a":
            return (c_int32 * 4)(*a)
        return a

    # --- running -------------------------------------------------------------------------------
    def run(self, *outputs: GT, backend: Backend | None = None, n_threads: int = 1) -> RunResult:
        """Compute the graph of `outputs` with ggml and with `backend` (a NumpyBackend by default)."""
        gf = self.base_lib.ggml_new_graph_custom(self.ctx, 4096, False)
        for o in outputs:
            self.base_lib.ggml_build_forward_expand(gf, o.ptr)
        ptrs = [self.base_lib.ggml_graph_node(gf, i) for i in range(self.base_lib.ggml_graph_n_nodes(gf))]
        if backend is None:
            from ..backends.numpy_backend import NumpyBackend
            backend = NumpyBackend()
        buf = backend.alloc_buffer(self.mem.size)
        if buf is None:
            raise MemoryError("backend cannot mirror the ggml context")
        self.base_lib.ggml_used_mem.argtypes = [c_void_p]
        self.base_lib.ggml_used_mem.restype = c_size_t
        used = self.base_lib.ggml_used_mem(self.ctx)
        backend.set(buf, 0, self.mem[:used])   # inputs as ggml will see them
        conv = _Converter(self, buf)
        nodes = [conv.tensor(p) for p in ptrs]
        status = self.cpu_lib.ggml_graph_compute_with_ctx(self.ctx, gf, n_threads)
        if status != 0:
            raise RuntimeError(f"ggml_graph_compute failed with status {status}")
        plan = backend.prepare(nodes)
        plan.run()
        return RunResult(self, backend, buf, nodes, {p: conv.tensor(p) for p in ptrs}, conv, plan, gf, n_threads)


class _Converter:
    """Reads ggml tensor structs into our Tensor IR, memoized by address."""

    def __init__(self, g: GGMLGraph, buf: Buffer) -> None:
        self.g, self.buf = g, buf
        self.done: dict[int, Tensor] = {}

    def tensor(self, ptr: int) -> Tensor:
        t = self.done.get(ptr)
        if t is not None:
            return t
        raw = self.g.struct_bytes(ptr)
        srcs = list(struct.unpack_from(f"<{_MAX_SRC}Q", raw, _T_SRC))
        while srcs and not srcs[-1]:
            srcs.pop()
        view_src, = struct.unpack_from("<Q", raw, _T_VIEW_SRC)
        data, = struct.unpack_from("<Q", raw, _T_DATA)
        name = raw[_T_NAME:_T_NAME + 64].split(b"\0", 1)[0].decode(errors="replace")
        t = Tensor(struct.unpack_from("<i", raw, _T_TYPE)[0], struct.unpack_from("<4q", raw, _T_NE),
                   struct.unpack_from("<4Q", raw, _T_NB), op=struct.unpack_from("<i", raw, _T_OP)[0],
                   op_params=raw[_T_PARAMS:_T_PARAMS + 64], flags=struct.unpack_from("<i", raw, _T_FLAGS)[0],
                   view_offs=struct.unpack_from("<Q", raw, _T_VIEW_OFFS)[0], name=name)
        self.done[ptr] = t   # before recursing: ggml_cast's CPY names itself as src[1]
        if data:
            t.buffer, t.offset = self.buf, data - self.g.base
        t.src = [self.tensor(s) if s else None for s in srcs]
        t.view_src = self.tensor(view_src) if view_src else None
        t.id = ptr
        return t


@np.errstate(invalid="ignore")
def tensor_values(mem: np.ndarray, t: Tensor) -> np.ndarray:
    """The logical elements of t in `mem` (a whole-context byte array) as float64 or int64 (ne3, ne2, ne1,
    ne0); quantized types are dequantized with hybridllm.quants."""
    n0, n1, n2, n3 = t.ne
    b0, b1, b2, b3 = t.nb
    tr = TRAITS[t.type]
    if tr.quantized:
        from ..quants import dequantize
        rb = tr.type_size * n0 // tr.blck_size
        rows = np.ndarray((n3, n2, n1, rb), np.uint8, mem, t.offset, (b3, b2, b1, 1))
        return dequantize(np.ascontiguousarray(rows), t.type, n0).astype(np.float64)
    from ..backends.numpy_ops.common import NP_DTYPES, bf16_to_f32
    v = np.ndarray((n3, n2, n1, n0), NP_DTYPES[t.type], mem, t.offset, (b3, b2, b1, b0))
    if t.type == GGMLType.BF16:
        return bf16_to_f32(v).astype(np.float64)
    if t.type in (GGMLType.I8, GGMLType.I16, GGMLType.I32, GGMLType.I64):
        return v.astype(np.int64)
    return v.astype(np.float64)


@np.errstate(invalid="ignore", over="ignore")
def _within_one_ulp(a: np.ndarray, b: np.ndarray, t: GGMLType) -> np.ndarray:
    dt = {GGMLType.F16: np.float16, GGMLType.BF16: np.float32}.get(t, np.float32)
    ulp = np.spacing(np.abs(b).astype(dt)).astype(np.float64)
    if t == GGMLType.BF16:
        ulp *= 1 << 16
    return np.abs(a - b) <= ulp * 1.0001


@dataclass
class RunResult:
    g: GGMLGraph
    backend: Backend
    buf: Buffer
    nodes: list[Tensor]
    by_ptr: dict[int, Tensor]
    conv: _Converter
    plan: Any
    graph: int = 0
    n_threads: int = 1

    def set_input(self, t: GT, data: np.ndarray) -> None:
        """New values for a leaf, on both sides (then `rerun`)."""
        self.g.upload(t, data)
        n = _nbytes(t.type, t.ne, t.nb)
        self.backend.set(self.buf, t.offset, self.g.mem[t.offset:t.offset + n])

    def rerun(self) -> None:
        """Compute the same graph again on both sides (GRAPH_RECOMPUTE: our plan is reused as is)."""
        status = self.g.cpu_lib.ggml_graph_compute_with_ctx(self.g.ctx, self.graph, self.n_threads)
        if status != 0:
            raise RuntimeError(f"ggml_graph_compute failed with status {status}")
        self.plan.run()

    def node(self, t: GT | Tensor) -> Tensor:
        return self.conv.tensor(t.ptr) if isinstance(t, GT) else t

    def ref(self, t: GT | Tensor) -> np.ndarray:
        """ggml's values of a node (float64/int64, shape (ne3, ne2, ne1, ne0))."""
        return tensor_values(self.g.mem, self.node(t))

    def ours(self, t: GT | Tensor) -> np.ndarray:
        arr = getattr(self.buf, "array", None)
        if arr is None:
            arr = np.frombuffer(self.backend.get(self.buf, 0, self.buf.size), dtype=np.uint8)
        return tensor_values(arr, self.node(t))

    def computed(self) -> list[Tensor]:
        return [n for n in self.nodes if n.computes and n.op not in VIEW_OPS]

    def assert_close(self, rtol: float = 1e-6, atol: float = 1e-6, only: Sequence[GT] | None = None,
                     skip_ops: Sequence[GGMLOp] = (), ulp_outliers: int = 0) -> None:
        """Every computed node (or `only` those) equal within rtol/atol (NaN == NaN, inf == inf).

        `ulp_outliers`: per node, up to this many elements may instead differ by one unit in the last
        place of the node's type (glibc's expf/logf are not always correctly rounded; we are)."""
        nodes = [self.node(t) for t in only] if only is not None else self.computed()
        for n in nodes:
            if n.op in skip_ops:
                continue
            ref, ours = self.ref(n), self.ours(n)
            if ref.shape != ours.shape:
                raise AssertionError(f"{n.op.name} {n.name!r}: shapes differ")
            bad = ~np.isclose(ours, ref, rtol=rtol, atol=atol, equal_nan=True)
            if bad.any() and ulp_outliers and int(bad.sum()) <= ulp_outliers:
                bad &= ~_within_one_ulp(ours, ref, n.type)
            if bad.any():
                idx = tuple(int(i) for i in np.argwhere(bad)[0])
                both = np.isfinite(ref) & np.isfinite(ours)
                err = np.abs(ours[both] - ref[both])
                raise AssertionError(
                    f"{n.op.name} {n.name!r} ({type_name(n.type)}, ne={n.ne}): {int(bad.sum())} of {bad.size} "
                    f"differ; first at (i3,i2,i1,i0)={idx}: ours {ours[idx]!r} ggml {ref[idx]!r}; "
                    f"max abs err {err.max() if err.size else float('nan'):.3g}")

    def max_rel_err(self, t: GT | Tensor) -> float:
        ref, ours = self.ref(t), self.ours(t)
        scale = max(float(np.abs(ref).max()), 1e-30)
        return float(np.abs(ours - ref).max() / scale)
