"""One model graph over several devices: cut into consecutive splits by device, each run by its backend.

What ggml_backend_sched does for llama.cpp, for graphs whose layers are placed whole on devices:

* every node gets a device: a view goes with the tensor it views; a node reading a placed weight or KV
  cache tensor goes to that tensor's device; an unplaced node named `<name>-<il>` (llm_graph's callback
  names) goes to layer il's device, so a layer's first RMS norm runs next to its weights (llama.cpp pins
  "norm-il" for the same reason) and a boundary is crossed by the residual stream only; any other node
  stays with the node before it;
* consecutive nodes of one device form a split, prepared once on its backend (an RPC split is serialized
  once and GRAPH_RECOMPUTEd on every later step);
* a split reads only its device's memory: graph inputs (positions, masks, KV indices) get one copy per
  device that reads them, written once per step; an activation from another device gets a local copy,
  filled before the split runs (GET from one backend, SET into the next; between two RPC workers it goes
  through the master); a weight every device reads uses the device's replica;
* each device has one compute buffer, planned over all its nodes; what another device reads later is
  kept alive until the step ends.

A graph on one device is one split with no copies: exactly the single-device path.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from ..backends.base import Backend, Buffer, Plan
from ..ggml import ops
from ..ggml.tensor import Tensor
from ..ggml.types import GGMLOp, TensorFlag
from .alloc import ComputeBuffer, free_quietly

_LAYER_SUFFIX = re.compile(r"-(\d+)$")


@dataclass
class Transfer:
    """`src` (another device's tensor) is copied into `dst` (this split's copy) before the split runs."""
    src: Tensor
    dst: Tensor


@dataclass
class Split:
    backend: Backend
    nodes: list[Tensor]
    transfers: list[Transfer] = field(default_factory=list)
    plan: Plan | None = None


@dataclass
class Traffic:
    """Bytes moved between devices by the scheduler (inputs are counted by `Schedule.put`)."""
    transfers: int = 0
    transfer_bytes: int = 0
    input_bytes: int = 0


def buffer_lost(buf: Buffer) -> bool:
    """True for a remote buffer whose connection dropped: the worker freed it with the connection."""
    link, gen = getattr(buf, "link", None), getattr(buf, "generation", None)
    return link is not None and not link.alive(gen)


def _is_input(t: Tensor) -> bool:
    """A graph input: a leaf with no storage of its own (written by the runner each step)."""
    return t.op == GGMLOp.NONE and t.buffer is None and t.view_src is None


def _copy_of(t: Tensor) -> Tensor:
    """A tensor with t's type and layout, for another device (no view: it owns its bytes)."""
    c = Tensor(t.type, t.ne, t.nb, name=t.name)
    c.flags = TensorFlag.INPUT
    return c


class Schedule:
    """The splits of one graph, their compute buffers and plans; `run()` executes a step."""

    def __init__(self, graph: ops.Graph, master: Backend, *,
                 layer_backend: Callable[[int], Backend] | None = None,
                 replicas: Mapping[int, Mapping[int, Tensor]] | None = None) -> None:
        self.master = master
        self.layer_backend = layer_backend
        self.replicas = replicas or {}
        self.splits: list[Split] = []
        self.locals: dict[int, list[Tensor]] = {}     # id(graph input) -> its tensor on each device
        self.buffers: list[ComputeBuffer] = []
        self.traffic = Traffic()
        self._leafs: dict[int, list[Tensor]] = {}     # id(backend) -> inputs and copies it allocates
        self._keep: dict[int, list[Tensor]] = {}      # id(backend) -> tensors other devices read later
        self._device: dict[int, Backend] = {}         # id(node) -> its device
        self._assign(graph.nodes)
        self._cut(graph.nodes)
        self._localize()

    # --- building --------------------------------------------------------------------------------
    def _home(self, t: Tensor) -> Backend | None:
        """The device of a placed leaf (weights, KV cache); None for inputs and replicated weights."""
        if t.op == GGMLOp.NONE and t.buffer is not None and id(t) not in self.replicas:
            return t.buffer.backend
        return None

    def _fixed_device(self, n: Tensor) -> Backend | None:
        if n.view_src is not None:
            base = n.view_src
            if id(base) in self._device:
                return self._device[id(base)]
            home = self._home(base)
            if home is not None:
                return home
        for s in n.src:
            if s is not None:
                home = self._home(s.view_src if s.view_src is not None else s)
                if home is not None:
                    return home
        m = _LAYER_SUFFIX.search(n.name)
        if m and self.layer_backend is not None:
            try:
                return self.layer_backend(int(m.group(1)))
            except IndexError:   # a name that only looks like a layer's
                return None
        return None

    def _assign(self, nodes: Sequence[Tensor]) -> None:
        pending: list[Tensor] = []   # nodes before the first placed one take its device
        prev: Backend | None = None
        for n in nodes:
            dev = self._fixed_device(n) or prev
            if dev is None:
                pending.append(n)
                continue
            for p in pending:
                self._device[id(p)] = dev
            pending.clear()
            self._device[id(n)] = prev = dev
        for p in pending:
            self._device[id(p)] = self.master

    def _cut(self, nodes: Sequence[Tensor]) -> None:
        for n in nodes:
            dev = self._device[id(n)]
            if not self.splits or self.splits[-1].backend is not dev:
                self.splits.append(Split(dev, []))
            self.splits[-1].nodes.append(n)

    def _localize(self) -> None:
        """Point every split's sources at its own device's tensors (inputs, copies, replicas)."""
        copies: dict[tuple[int, int], Tensor] = {}
        input_home: dict[int, Backend] = {}
        for sp in self.splits:
            for n in sp.nodes:
                n.src = [self._local(s, sp, copies, input_home) if s is not None else None for s in n.src]
                if n.view_src is not None and (_is_input(n.view_src) or id(n.view_src) in self.replicas):
                    n.view_src = self._local(n.view_src, sp, copies, input_home)

    def _local(self, s: Tensor, sp: Split, copies: dict[tuple[int, int], Tensor],
               input_home: dict[int, Backend]) -> Tensor:
        dev = sp.backend
        reps = self.replicas.get(id(s))
        if reps is not None:
            if s.buffer is not None and s.buffer.backend is dev:
                return s
            if id(dev) in reps:
                return reps[id(dev)]
        if _is_input(s):
            home = input_home.setdefault(id(s), dev)
            if home is dev:
                if id(s) not in self.locals:
                    self.locals[id(s)] = [s]
                    self._leafs.setdefault(id(dev), []).append(s)
                return s
            key = (id(s), id(dev))
            if key not in copies:
                copies[key] = c = _copy_of(s)
                self.locals[id(s)].append(c)
                self._leafs.setdefault(id(dev), []).append(c)
            return copies[key]
        where = self._device.get(id(s)) or (s.buffer.backend if s.buffer is not None else None)
        if where is None or where is dev:
            return s
        key = (id(s), id(dev))
        if key not in copies:
            copies[key] = c = _copy_of(s)
            sp.transfers.append(Transfer(s, c))
            self._leafs.setdefault(id(dev), []).append(c)
            self._keep.setdefault(id(where), []).append(s.view_src if s.view_src is not None else s)
        return copies[key]

    # --- memory and plans ------------------------------------------------------------------------
    def allocate(self) -> None:
        """One compute buffer per device, planned over that device's nodes in order."""
        by_dev: dict[int, tuple[Backend, list[Tensor]]] = {}
        for sp in self.splits:
            by_dev.setdefault(id(sp.backend), (sp.backend, []))[1].extend(sp.nodes)
        try:
            for key, (dev, nodes) in by_dev.items():
                self.buffers.append(ComputeBuffer(dev, leafs=self._leafs.get(key, []), nodes=nodes,
                                                  keep=self._keep.get(key, [])))
        except BaseException:
            self.free()
            raise

    def prepare(self) -> None:
        """Allocate, then bind each split to its backend (Unsupported names the first bad node)."""
        self.allocate()
        try:
            for sp in self.splits:
                sp.plan = sp.backend.prepare(sp.nodes)
        except BaseException:
            self.free()
            raise

    @property
    def single(self) -> bool:
        return len(self.splits) == 1 and not self.splits[0].transfers

    @property
    def devices(self) -> list[Backend]:
        return list({id(sp.backend): sp.backend for sp in self.splits}.values())

    # --- a step ----------------------------------------------------------------------------------
    def put(self, t: Tensor, data: bytes | bytearray | memoryview) -> None:
        """Write a graph input on every device that reads it (nothing if no node reads it)."""
        for x in self.locals.get(id(t), ()):
            if x.buffer is not None:
                x.buffer.backend.set(x.buffer, x.offset, data)
                if x.buffer.backend is not self.master:
                    self.traffic.input_bytes += memoryview(data).nbytes

    def run(self) -> None:
        for sp in self.splits:
            for tr in sp.transfers:
                self._transfer(tr)
            sp.plan.run()  # type: ignore[union-attr]

    def _transfer(self, tr: Transfer) -> None:
        src, dst = tr.src, tr.dst
        sbuf, dbuf = src.buffer, dst.buffer
        assert sbuf is not None and dbuf is not None
        n = src.nbytes
        if not dbuf.backend.copy(sbuf, src.offset, dbuf, dst.offset, n):   # device-side when it can
            dbuf.backend.set(dbuf, dst.offset, sbuf.backend.get(sbuf, src.offset, n))
        self.traffic.transfers += 1
        self.traffic.transfer_bytes += n

    def free(self) -> None:
        for b in self.buffers:
            free_quietly(b.buffer)
        self.buffers.clear()

    def describe(self) -> str:
        parts = []
        for sp in self.splits:
            moved = sum(tr.src.nbytes for tr in sp.transfers)
            parts.append(f"{sp.backend.name}: {len(sp.nodes)} nodes, {len(sp.transfers)} inputs ({moved} B)")
        return "; ".join(parts)
