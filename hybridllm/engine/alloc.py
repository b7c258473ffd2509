"""Device memory for a model: weights uploaded once into one backend buffer, and per-graph compute
buffers whose offsets are planned like ggml-alloc does (a tensor's memory is reused as soon as the last
node reading it has run).

Everything goes through `hybridllm.backends.base.Backend`, so the same code places tensors on the numpy
backend today and on CuPy or RPC devices later.
"""
from __future__ import annotations

import bisect
import contextlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from ..backends.base import Backend, Buffer
from ..ggml import ops
from ..ggml.tensor import Tensor
from ..ggml.types import TensorFlag
from .gguf_file import GGUFFile, TensorInfo

# Offsets are aligned to a cache line even when the backend needs less: vectorized kernels prefer it.
MIN_ALIGNMENT = 64
# A tensor's memory is reused only this many nodes after its last reader: a GPU launch fusing a chain of
# nodes (up to ~10 for a MoE expert sum) reads inputs later than the chain's first node did, and may not
# fuse when an output of the chain took such an input's memory (cupy_ops/fusion.py).
REUSE_LAG = 16


class AllocError(RuntimeError):
    """Device memory could not be obtained; the message says how much and for what."""


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def free_quietly(buf: Buffer) -> None:
    """Free a buffer unless already freed. A remote buffer whose connection dropped is gone already:
    the worker freed it with the connection, so a failure to say so is no error."""
    if not buf.freed:
        with contextlib.suppress(RuntimeError, OSError):
            buf.backend.free_buffer(buf)


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
    return plan_tensors(graph.leafs, graph.nodes, alignment, size_of)


def plan_tensors(leafs: Sequence[Tensor], nodes: Sequence[Tensor], alignment: int,
                 size_of: Callable[[Tensor], int], keep: Iterable[Tensor] = ()) -> tuple[dict[int, int], int]:
    """plan_graph over explicit leafs and nodes (execution order); tensors in `keep` (e.g. read later by
    another device) live to the end like OUTPUT-flagged ones."""
    nodes = [n for n in nodes if n.computes]
    needs = {id(t): t for t in list(leafs) + nodes if t.buffer is None and t.view_src is None}
    kept = {id(t) for t in keep}
    last_use: dict[int, int] = {}
    for i, node in enumerate(nodes):
        for s in list(node.src) + [node]:
            if s is not None:
                owner = s.view_src if s.view_src is not None else s
                last_use[id(owner)] = i
    frees: dict[int, list[Tensor]] = {}
    for key, t in needs.items():
        if not t.flags & TensorFlag.OUTPUT and key in last_use and key not in kept:
            frees.setdefault(min(last_use[key] + REUSE_LAG, len(nodes) - 1), []).append(t)
    fl = _FreeList(alignment)
    offsets: dict[int, int] = {}
    for t in leafs:
        if id(t) in needs and id(t) not in offsets:
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
    """One graph's compute memory on one backend: allocated from the plan, bound to the tensors.

    `ComputeBuffer(backend, graph)` covers a whole graph; the scheduler passes one device's share of a
    graph as `leafs`/`nodes`, with `keep` the tensors other devices read after these nodes ran."""

    def __init__(self, backend: Backend, graph: ops.Graph | None = None, *, leafs: Sequence[Tensor] = (),
                 nodes: Sequence[Tensor] = (), keep: Iterable[Tensor] = ()) -> None:
        if graph is not None:
            leafs, nodes = graph.leafs, graph.nodes
        align = max(backend.alignment, MIN_ALIGNMENT)
        offsets, size = plan_tensors(leafs, nodes, align, backend.alloc_size, keep)
        buf = backend.alloc_buffer(max(size, align))
        if buf is None:
            raise AllocError(f"cannot allocate a {size / 2**20:.1f} MiB compute buffer on {backend.name}")
        self.backend, self.buffer, self.size = backend, buf, size
        for t in [*leafs, *nodes]:
            off = offsets.get(id(t))
            if off is not None:
                t.buffer, t.offset = buf, off
        bind_views([*leafs, *nodes])

    def free(self) -> None:
        self.backend.free_buffer(self.buffer)


def upload_progress(total: int, desc: str, enabled: bool) -> Any:
    """A tqdm bar in bytes (with rate) on stderr, or a silent stand-in."""
    if not enabled:
        return _NoBar()
    from tqdm import tqdm  # type: ignore[import-untyped]
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, leave=True,
                dynamic_ncols=True)


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


# Consecutive small tensors are uploaded as one SET of up to this many bytes: fewer messages, and a run
# above the RPC hash threshold (10 MiB) lets a worker with --cache skip it on the next load.
UPLOAD_RUN = 32 << 20


def _runs(entries: list[tuple[Tensor, str, int]]) -> Iterable[list[tuple[Tensor, str, int]]]:
    run: list[tuple[Tensor, str, int]] = []
    for e in entries:
        if run and e[2] + e[0].nbytes - run[0][2] > UPLOAD_RUN:
            yield run
            run = []
        run.append(e)
    if run:
        yield run


def _run_bytes(gguf: GGUFFile, run: list[tuple[Tensor, str, int]]) -> Any:
    """The bytes of a run of tensors as they lie in the buffer (alignment gaps zeroed)."""
    if len(run) == 1:
        return gguf.tensor_data(run[0][1]).data
    start = run[0][2]
    out = bytearray(run[-1][2] + run[-1][0].nbytes - start)
    for t, name, off in run:
        out[off - start:off - start + t.nbytes] = gguf.tensor_data(name).data
    return out


class WeightStore:
    """The model's weights as leaf Tensors named like the GGUF tensors, in one buffer per device.

    `devices_of(name)` lists the backends that hold a tensor (default: `backend`); the first holds the
    tensor the graph uses, the others a replica (tensors every layer reads, e.g. rope_freqs, are copied
    to each device with layers so no device reads another's weights). Bytes are copied as stored
    (quantized stays quantized). Tensors the model does not use are skipped.
    """

    def __init__(self, backend: Backend, gguf: GGUFFile, names: Iterable[str], *,
                 devices_of: Callable[[str], Sequence[Backend]] | None = None, progress: bool = False) -> None:
        self.backend, self.path = backend, gguf.path
        self.tensors: dict[str, Tensor] = {}
        self.replicas: dict[int, dict[int, Tensor]] = {}   # id(tensor) -> id(backend) -> its copy there
        self.layout: dict[int, tuple[Backend, list[tuple[Tensor, str, int]], int]] = {}
        for name in dict.fromkeys(names):
            info: TensorInfo = gguf.tensors[name]
            for i, dev in enumerate(devices_of(name) if devices_of else (backend,)):
                t = ops.set_name(ops.new_tensor(info.type, *info.ne), info.name)
                if i == 0:
                    self.tensors[name] = t
                else:
                    self.replicas.setdefault(id(self.tensors[name]), {})[id(dev)] = t
                _, entries, size = self.layout.get(id(dev), (dev, [], 0))
                align = max(dev.alignment, MIN_ALIGNMENT)
                entries.append((t, name, size))
                self.layout[id(dev)] = (dev, entries, _align(size + dev.alloc_size(t), align))
        self.buffers: dict[int, Buffer] = {}
        try:
            for key in self.layout:
                self._upload(key, gguf, progress)
        except BaseException:
            self.free()
            raise

    def _upload(self, key: int, gguf: GGUFFile, progress: bool) -> None:
        """Allocate the device's buffer and copy its tensors into it (again after a device was lost)."""
        dev, entries, size = self.layout[key]
        buf = dev.alloc_buffer(max(size, MIN_ALIGNMENT))
        if buf is None:
            raise AllocError(f"cannot allocate {size / 2**20:.1f} MiB for the weights on {dev.name}")
        self.buffers[key] = buf
        init = getattr(dev, "init_tensor", None)   # RPC: padded rows of quantized tensors (CUDA workers)
        bar = upload_progress(sum(t.nbytes for t, _, _ in entries), f"weights -> {dev.name}", progress)
        try:
            for run in _runs(entries):
                for t, _, off in run:
                    t.buffer, t.offset = buf, off
                    if init is not None:
                        init(t)
                dev.set(buf, run[0][2], _run_bytes(gguf, run))
                bar.update(sum(t.nbytes for t, _, _ in run))
        finally:
            bar.close()

    def reload(self, backend: Backend, progress: bool = False) -> None:
        """Upload `backend`'s share again into a new buffer (its old one was lost with a worker)."""
        old = self.buffers.pop(id(backend), None)
        if old is not None:
            free_quietly(old)
        with GGUFFile(self.path) as f:
            self._upload(id(backend), f, progress)

    @property
    def buffer(self) -> Buffer:
        """The primary device's buffer (single-device code)."""
        return self.buffers[id(self.backend)] if id(self.backend) in self.buffers else \
            next(iter(self.buffers.values()))

    @property
    def nbytes(self) -> int:
        return sum(size for _, _, size in self.layout.values())

    def bytes_on(self, backend: Backend) -> int:
        entry = self.layout.get(id(backend))
        return entry[2] if entry else 0

    @property
    def devices(self) -> list[Backend]:
        return [dev for dev, _, _ in self.layout.values()]

    def __getitem__(self, name: str) -> Tensor:
        return self.tensors[name]

    def get(self, name: str) -> Tensor | None:
        return self.tensors.get(name)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def items(self) -> Mapping[str, Tensor]:
        return self.tensors

    def free(self) -> None:
        for buf in self.buffers.values():
            free_quietly(buf)
        self.buffers.clear()
