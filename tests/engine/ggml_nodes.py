"""Node-by-node check of a prepared graph against the real ggml CPU kernels (the peer's libggml-cpu).

For every node our plan runs, the same node is rebuilt as a one-node ggml graph whose sources point at
*our* buffers (so both sides see identical inputs), computed by ggml into a scratch copy of the
destination, and compared with what our kernel then writes. The first op that is not bit-exact shows
where a model's logits start to drift from llama.cpp's.

    report = check_plan(nodes, kernels)      # after inputs are set, instead of plan.run()
"""
from __future__ import annotations

import ctypes
import struct
from collections.abc import Callable, Sequence
from ctypes import c_void_p
from dataclasses import dataclass

import numpy as np

from hybridllm.backends.base import nodes_to_run
from hybridllm.ggml.tensor import Tensor
from hybridllm.ggml.types import GGMLOp
from hybridllm.testing.ggml_ref import (
    _T_DATA,
    _T_FLAGS,
    _T_NB,
    _T_NE,
    _T_OP,
    _T_PARAMS,
    _T_SRC,
    _T_TYPE,
    _T_VIEW_OFFS,
    _T_VIEW_SRC,
    _GgmlInitParams,
    ggml_libs,
    tensor_values,
)


def _addr(t: Tensor) -> int:
    return t.buffer.array.ctypes.data + t.offset  # type: ignore[union-attr]


@dataclass
class NodeDiff:
    index: int
    op: str
    name: str
    exact: bool
    max_abs: float
    max_rel: float


class NodeChecker:
    def __init__(self, mem_size: int = 256 << 20) -> None:
        self.base, self.cpu = ggml_libs()
        self.base.ggml_new_graph.argtypes = [c_void_p]
        self.base.ggml_new_graph.restype = c_void_p
        self.mem = np.zeros(mem_size, np.uint8)
        self.mem_size = mem_size

    def reference(self, node: Tensor) -> np.ndarray:
        """ggml's output bytes for `node` given the current contents of its sources."""
        ctx = self.base.ggml_init(_GgmlInitParams(self.mem_size, self.mem.ctypes.data, False))
        try:
            made: dict[int, int] = {}
            out = np.array(np.frombuffer(node.buffer.array, np.uint8, node.nbytes, node.offset))  # type: ignore

            def make(t: Tensor, data: int, op: int) -> int:
                ptr = self.base.ggml_new_tensor_4d(ctx, 0, 1, 1, 1, 1)
                raw = (ctypes.c_char * 336).from_address(ptr)
                struct.pack_into("<i", raw, _T_TYPE, int(t.type))
                struct.pack_into("<4q", raw, _T_NE, *t.ne)
                struct.pack_into("<4Q", raw, _T_NB, *t.nb)
                struct.pack_into("<i", raw, _T_OP, op)
                raw[_T_PARAMS:_T_PARAMS + 64] = t.op_params
                struct.pack_into("<i", raw, _T_FLAGS, 0)
                struct.pack_into("<Q", raw, _T_VIEW_SRC, 0)
                struct.pack_into("<Q", raw, _T_VIEW_OFFS, 0)
                struct.pack_into("<Q", raw, _T_DATA, data)
                return ptr

            node_ptr = make(node, out.ctypes.data, int(node.op))
            made[id(node)] = node_ptr
            srcs = []
            for s in node.src:
                if s is None:
                    srcs.append(0)
                elif s is node:
                    srcs.append(node_ptr)
                else:
                    srcs.append(made.setdefault(id(s), make(s, _addr(s), 0)))
            raw = (ctypes.c_char * 336).from_address(node_ptr)
            struct.pack_into(f"<{len(srcs)}Q", raw, _T_SRC, *srcs)
            gf = self.base.ggml_new_graph(ctx)
            self.base.ggml_build_forward_expand(gf, node_ptr)
            if self.cpu.ggml_graph_compute_with_ctx(ctx, gf, 1) != 0:
                raise RuntimeError(f"ggml failed on {node.op.name} {node.name!r}")
            return out
        finally:
            self.base.ggml_free(ctx)


def _values(buf: np.ndarray, t: Tensor, base_offset: int) -> np.ndarray:
    shadow = Tensor(t.type, t.ne, t.nb)
    shadow.offset = t.offset - base_offset
    return tensor_values(buf, shadow)


def check_plan(nodes: Sequence[Tensor], kernels: Sequence[Callable[[], None]],
               skip: Sequence[GGMLOp] = ()) -> list[NodeDiff]:
    """Run our kernels one by one, each preceded by ggml's result for the same node and inputs."""
    checker = NodeChecker()
    diffs = []
    for i, (node, k) in enumerate(zip(nodes_to_run(nodes), kernels)):
        if node.op in skip:
            k()
            continue
        ref = checker.reference(node)
        k()
        ours = np.frombuffer(node.buffer.array, np.uint8, node.nbytes, node.offset)  # type: ignore
        exact = bool(np.array_equal(ref, ours))
        a, b = _values(ours, node, node.offset), _values(ref, node, node.offset)
        err = np.abs(a - b)
        err = err[np.isfinite(err)]
        scale = float(np.max(np.abs(b[np.isfinite(b)]))) if np.isfinite(b).any() else 1.0
        mx = float(err.max()) if err.size else 0.0
        diffs.append(NodeDiff(i, node.op.name, node.name, exact, mx, mx / max(scale, 1e-30)))
    return diffs


def summarize(diffs: Sequence[NodeDiff]) -> str:
    by_op: dict[str, list[NodeDiff]] = {}
    for d in diffs:
        by_op.setdefault(d.op, []).append(d)
    lines = []
    for op, ds in sorted(by_op.items()):
        inexact = [d for d in ds if not d.exact]
        worst = max(ds, key=lambda d: d.max_rel)
        lines.append(f"{op:16s} {len(ds):4d} nodes, {len(inexact):4d} not bit-exact, worst rel {worst.max_rel:.2e} "
                     f"({worst.name})")
    return "\n".join(lines)
