"""Device memory for a model: weights uploaded once into one backend buffer, and per-graph compute
buffers whose offsets are planned like ggml-alloc does (a tensor's memory is reused as soon as the last
node reading it has run).

Everything goes through `hybridllm.backends.base.Backend`, so the same code places tensors on the numpy
backend today and on CuPy or RPC devices later.
"""
from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Mapping

from ..backends.base import Backend
from ..ggml import ops
from ..ggml.tensor import Tensor
from ..ggml.types import TensorFlag
from .gguf_file import GGUFFile, TensorInfo

# Offsets are aligned to a cache line even when the backend needs less: vectorized kernels prefer it.
MIN_ALIGNMENT = 64


class AllocError(RuntimeError):
    """Device memory could not be obtained; the message says how much and for what."""


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


class _FreeList:
    """Best-fit allocator over one address range; adjacent free blocks merge."""

    def __init__(self, alignment: int) -> None:
        self.alignment = alignment
        self.blocks: list[tuple[int, int]] = []  # (offset, size), sorted by offset
        self.end = 0                             # high-water mark

    def alloc(self, size: int) -> int:
        size = _align(max(size, 1), self.alignment)
        best = -1
        for i, (_, bsize) in enumerate(self.blocks):
            if bsize >= size and (best < 0 or bsize < self.blocks[best][1]):
                best = i
        if best >= 0:
            off, bsize = self.blocks[best]
            if bsize == size:
                del self.blocks[best]
            else:
                self.blocks[best] = (off + size, bsize - size)
            return off
        if self.blocks and self.blocks[-1][0] + self.blocks[-1][1] == self.end:
            off = self.blocks.pop()[0]  # grow the trailing free block instead of leaving a hole
        else:
            off = self.end
        self.end = off + size
        return off

    def free(self, off: int, size: int) -> None:
        size = _align(max(size, 1), self.alignment)
        i = bisect.bisect_left(self.blocks, (off, 0))
        self.blocks.insert(i, (off, size))
        if i + 1 < len(self.blocks) and off + size == self.blocks[i + 1][0]:
            self.blocks[i] = (off, size + self.blocks[i + 1][1])
            del self.blocks[i + 1]
        if i > 0 and self.blocks[i - 1][0] + self.blocks[i - 1][1] == off:
            self.blocks[i - 1] = (self.blocks[i - 1][0], self.blocks[i - 1][1] + self.blocks[i][1])
            del self.blocks[i]


def plan_graph(graph: ops.Graph, alignment: int,
               size_of: Callable[[Tensor], int]) -> tuple[dict[int, int], int]:
    """Offsets (by id(tensor)) for every tensor of the graph that needs compute memory, and the total.

    Inputs (leafs without storage) live from the start to their last use; computed nodes from their
    node to their last use; OUTPUT-flagged tensors to the end. Views and tensors that already have
    storage (weights, KV cache) take nothing.
    """
    nodes = [n for n in graph.nodes if n.computes]
    needs = {id(t): t for t in list(graph.leafs) + nodes if t.buffer is None and t.view_src is None}
    last_use: dict[int, int] = {}
    for i, node in enumerate(nodes):
        for s in list(node.src) + [node]:
            if s is not None:
                owner = s.view_src if s.view_src is not None else s
                last_use[id(owner)] = i
    frees: dict[int, list[Tensor]] = {}
    for key, t in needs.items():
        if not t.flags & TensorFlag.OUTPUT and key in last_use:
            frees.setdefault(last_use[key], []).append(t)
    fl = _FreeList(alignment)
    offsets: dict[int, int] = {}
    for t in graph.leafs:
        if id(t) in needs:
            offsets[id(t)] = fl.alloc(size_of(t))
    for i, node in enumerate(nodes):
        if id(node) in needs and id(node) not in offsets:
            offsets[id(node)] = fl.alloc(size_of(node))
        for t in frees.get(i, ()):
            fl.free(offsets[id(t)], size_of(t))
    return offsets, fl.end


def bind_views(tensors: Iterable[Tensor]) -> None:
    """Give every view the storage of its base (views of views were flattened by ops)."""
    for t in tensors:
        if t.view_src is not None:
            t.buffer = t.view_src.buffer
            t.offset = t.view_src.offset + t.view_offs


class ComputeBuffer:
    """One graph's compute memory: allocated from the plan, bound to the graph's tensors."""

    def __init__(self, backend: Backend, graph: ops.Graph) -> None:
        align = max(backend.alignment, MIN_ALIGNMENT)
        offsets, size = plan_graph(graph, align, backend.alloc_size)
        buf = backend.alloc_buffer(max(size, align))
        if buf is None:
            raise AllocError(f"cannot allocate a {size / 2**20:.1f} MiB compute buffer on {backend.name}")
        self.backend, self.buffer, self.size = backend, buf, size
        for t in graph.tensors():
            off = offsets.get(id(t))
            if off is not None:
                t.buffer, t.offset = buf, off
        bind_views(graph.tensors())

    def free(self) -> None:
        self.backend.free_buffer(self.buffer)


class WeightStore:
    """The model's weights in one backend buffer, as leaf Tensors named like the GGUF tensors.

    Bytes are copied as stored (quantized stays quantized). Tensors the model does not use are skipped.
    """

    def __init__(self, backend: Backend, gguf: GGUFFile, names: Iterable[str]) -> None:
        infos: list[TensorInfo] = [gguf.tensors[n] for n in dict.fromkeys(names)]
        align = max(backend.alignment, MIN_ALIGNMENT)
        self.tensors: dict[str, Tensor] = {}
        offsets: list[int] = []
        size = 0
        for info in infos:
            t = ops.set_name(ops.new_tensor(info.type, *info.ne), info.name)
            self.tensors[info.name] = t
            offsets.append(size)
            size = _align(size + backend.alloc_size(t), align)
        buf = backend.alloc_buffer(max(size, align))
        if buf is None:
            raise AllocError(f"cannot allocate {size / 2**20:.1f} MiB for the weights on {backend.name}")
        self.backend, self.buffer, self.nbytes = backend, buf, size
        for info, off in zip(infos, offsets):
            t = self.tensors[info.name]
            t.buffer, t.offset = buf, off
            backend.set(buf, off, gguf.tensor_data(info.name).data)

    def __getitem__(self, name: str) -> Tensor:
        return self.tensors[name]

    def get(self, name: str) -> Tensor | None:
        return self.tensors.get(name)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def items(self) -> Mapping[str, Tensor]:
        return self.tensors

    def free(self) -> None:
        self.backend.free_buffer(self.buffer)
