"""Build one small ggml graph on two backends (the device under test and the numpy reference), run both,
read results back as numpy arrays."""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from hybridllm.backends.base import Backend
from hybridllm.backends.numpy_backend import NumpyBackend
from hybridllm.ggml.tensor import Tensor, pack_params
from hybridllm.ggml.types import GGMLOp, GGMLType, TensorFlag, default_strides, nbytes

NP = {GGMLType.F32: np.float32, GGMLType.F16: np.float16, GGMLType.I32: np.int32, GGMLType.I64: np.int64,
      GGMLType.BF16: np.uint16}


class Graph:
    """Tensors with their own buffers on one backend, and the nodes to run in order."""

    def __init__(self, backend: Backend) -> None:
        self.be = backend
        self.nodes: list[Tensor] = []
        self.buffers: list = []

    def _alloc(self, t: Tensor, size: int) -> None:
        buf = self.be.alloc_buffer(max(size, 1))
        assert buf is not None
        self.buffers.append(buf)
        t.buffer, t.offset = buf, 0

    def tensor(self, type: int, ne: Sequence[int], data: np.ndarray | bytes | None = None,
               nb: Sequence[int] | None = None, name: str = "") -> Tensor:
        t = Tensor(type, ne, nb, name=name)
        self._alloc(t, t.nbytes)
        if data is not None:
            raw = data.tobytes() if isinstance(data, np.ndarray) else bytes(data)
            assert len(raw) == t.nbytes, (len(raw), t.nbytes)
            self.be.set(t.buffer, 0, raw)
        return t

    def node(self, op: GGMLOp, type: int, ne: Sequence[int], srcs: Sequence[Tensor | None],
             params: Sequence[int | float] | bytes = (), name: str = "", into: Tensor | None = None,
             nb: Sequence[int] | None = None) -> Tensor:
        """A computing node; `into` makes it a view of that tensor's storage (CPY, SET_ROWS, in-place)."""
        p = params if isinstance(params, bytes) else pack_params(*params)
        t = Tensor(type, ne, nb if nb is not None else (into.nb if into is not None else None), op=op,
                   op_params=p, flags=TensorFlag.COMPUTE, src=list(srcs), name=name or f"n{len(self.nodes)}")
        if into is not None:
            t.buffer, t.offset, t.view_src = into.buffer, into.offset, into
        else:
            self._alloc(t, t.nbytes)
        self.nodes.append(t)
        return t

    def view(self, base: Tensor, ne: Sequence[int], nb: Sequence[int], offset: int = 0,
             op: GGMLOp = GGMLOp.VIEW) -> Tensor:
        t = Tensor(base.type, ne, nb, op=op, src=[base], view_src=base, view_offs=offset, name=f"v{len(self.nodes)}")
        t.buffer, t.offset = base.buffer, base.offset + offset
        self.nodes.append(t)
        return t

    def read(self, t: Tensor) -> np.ndarray:
        """Values of t, shape (ne3, ne2, ne1, ne0), honouring its strides."""
        raw = np.frombuffer(self.be.get(t.buffer, t.offset, t.nbytes), dtype=np.uint8)
        dt = np.dtype(NP[t.type])
        n0, n1, n2, n3 = t.ne
        b0, b1, b2, b3 = t.nb
        return np.ndarray((n3, n2, n1, n0), dtype=dt, buffer=raw.copy(), strides=(b3, b2, b1, b0)).copy()

    def read_raw(self, t: Tensor) -> bytes:
        return self.be.get(t.buffer, t.offset, t.nbytes)


def run_both(device: Backend, build: Callable[[Graph], Sequence[Tensor]],
             runs: int = 1) -> list[tuple[np.ndarray, np.ndarray]]:
    """Build with `build` on device and on numpy; run; return (device, reference) arrays per output."""
    out = []
    gd, gr = Graph(device), Graph(NumpyBackend())
    td, tr = build(gd), build(gr)
    plan = device.prepare(gd.nodes)
    for _ in range(runs):
        plan.run()
    gr.be.prepare(gr.nodes).run()
    for a, b in zip(td, tr):
        out.append((gd.read(a), gr.read(b)))
    for g in (gd, gr):
        for buf in g.buffers:
            g.be.free_buffer(buf)
    return out


def assert_close(got: np.ndarray, want: np.ndarray, rtol: float, atol: float, what: str = "") -> None:
    got64, want64 = got.astype(np.float64), want.astype(np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    assert np.array_equal(np.isnan(got64), np.isnan(want64)), f"{what}: NaN positions differ"
    ok = np.isclose(got64, want64, rtol=rtol, atol=atol, equal_nan=True)
    if not ok.all():
        idx = np.argwhere(~ok)[:5]
        detail = ", ".join(f"{tuple(i)}: {got64[tuple(i)]!r} vs {want64[tuple(i)]!r}" for i in idx)
        raise AssertionError(f"{what}: {int((~ok).sum())}/{ok.size} values differ (rtol={rtol}, atol={atol}): "
                             f"{detail}")


def contiguous(type: int, ne: Sequence[int]) -> tuple[int, int, int, int]:
    ne4 = tuple(ne) + (1,) * (4 - len(ne))
    return default_strides(type, ne4)  # type: ignore[arg-type]


def size_of(type: int, ne: Sequence[int], nb: Sequence[int]) -> int:
    return nbytes(type, tuple(ne) + (1,) * (4 - len(ne)), tuple(nb) + (0,) * (4 - len(nb)))
