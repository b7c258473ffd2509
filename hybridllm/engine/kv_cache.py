"""The KV cache, laid out and addressed like llama.cpp's (llama-kv-cache.cpp), for one sequence.

Each attention layer owns a K and a V tensor of shape (n_embd_k_gqa, kv_size) in one backend buffer
(F16 by default). A ubatch's K/V rows are written by SET_ROWS nodes at cell indices passed as I64 inputs
(`attn_inp_k_idxs` / `attn_inp_v_idxs`), attention reads a view of the first n_kv cells (n_kv padded to
256 so that decode graphs can be reused), and an F16 mask (`attn_inp_kq_mask`, 0 or -inf) hides empty
cells, future positions and, in a sliding-window cache, positions older than the window. V is stored
untransposed for flash attention; without it (`v_trans`) V is stored transposed, one element per index,
as llama.cpp does so that KQ*V needs no copy.

Placement: the full cache puts position p in cell p; a sliding-window cache is a ring (cell p mod size),
sized n_swa + n_ubatch rounded up to 256 so that a ubatch never overwrites a cell still in its window.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ..backends.base import Backend, Buffer
from ..ggml import ops
from ..ggml.tensor import Tensor
from ..ggml.types import GGMLType, row_size
from .alloc import MIN_ALIGNMENT, AllocError, free_quietly

KV_PAD = 256  # llama.cpp pads n_ctx, n_kv and the SWA cache size to 256 cells


def pad(n: int, to: int = KV_PAD) -> int:
    return (n + to - 1) // to * to


class ContextOverflow(Exception):
    """The sequence does not fit the context; the message says by how much."""


@dataclass(frozen=True)
class LayerKV:
    """One attention layer's cache geometry."""
    il: int
    n_head_kv: int
    head_dim_k: int
    head_dim_v: int

    @property
    def n_embd_k_gqa(self) -> int:
        return self.n_head_kv * self.head_dim_k

    @property
    def n_embd_v_gqa(self) -> int:
        return self.n_head_kv * self.head_dim_v


class KVCache:
    """K/V tensors for a set of layers, and which position each cell holds (-1 = empty)."""

    def __init__(self, backend: Backend, layers: Sequence[LayerKV], size: int, *,
                 type_k: GGMLType = GGMLType.F16, type_v: GGMLType = GGMLType.F16,
                 n_swa: int = 0, v_trans: bool = False, name_tag: str = "",
                 backend_of: Callable[[int], Backend] | None = None) -> None:
        """`backend_of(il)` places each layer's K/V on its layer's device (default: all on `backend`);
        the cell bookkeeping is shared, so every device sees the same cells and masks."""
        self.backend, self.size, self.n_swa, self.v_trans = backend, size, n_swa, v_trans
        self.layers = {spec.il: spec for spec in layers}
        self.k: dict[int, Tensor] = {}
        self.v: dict[int, Tensor] = {}
        # per device: (backend, [(tensor, offset)], bytes)
        self.layout: dict[int, tuple[Backend, list[tuple[Tensor, int]], int]] = {}
        for spec in layers:
            dev = backend_of(spec.il) if backend_of else backend
            k = ops.set_name(ops.new_tensor_3d(type_k, spec.n_embd_k_gqa, size, 1), f"cache_{name_tag}k_l{spec.il}")
            v = ops.set_name(ops.new_tensor_3d(type_v, spec.n_embd_v_gqa, size, 1), f"cache_{name_tag}v_l{spec.il}")
            _, entries, total = self.layout.get(id(dev), (dev, [], 0))
            for t in (k, v):
                entries.append((t, total))
                total = pad(total + dev.alloc_size(t), MIN_ALIGNMENT)
            self.layout[id(dev)] = (dev, entries, total)
            self.k[spec.il], self.v[spec.il] = k, v
        self.nbytes = sum(total for _, _, total in self.layout.values())
        self.buffers: dict[int, Buffer] = {}
        try:
            for key in self.layout:
                self._alloc(key)
        except BaseException:
            self.free()
            raise
        self.pos = np.full(size, -1, dtype=np.int64)

    def _alloc(self, key: int) -> None:
        dev, entries, total = self.layout[key]
        buf = dev.alloc_buffer(max(total, MIN_ALIGNMENT))
        if buf is None:
            raise AllocError(f"cannot allocate a {total / 2**20:.1f} MiB KV cache on {dev.name}")
        self.buffers[key] = buf
        for t, off in entries:
            t.buffer, t.offset = buf, off
        dev.clear(buf, 0)  # as llama.cpp does: empty cells must hold finite values

    def realloc(self, backend: Backend) -> None:
        """New (empty) K/V memory on `backend` after its old buffer was lost; the caller resets the cells."""
        if id(backend) not in self.layout:
            return
        old = self.buffers.pop(id(backend), None)
        if old is not None:
            free_quietly(old)
        self._alloc(id(backend))

    @property
    def buffer(self) -> Buffer | None:
        """The first device's K/V buffer (single-device code); None for a cache without layers."""
        return next(iter(self.buffers.values()), None)

    # --- cell bookkeeping ----------------------------------------------------------------------
    def cells_for(self, positions: np.ndarray) -> np.ndarray:
        """Cell index of each position of a ubatch (no state change)."""
        if self.n_swa:
            return positions % self.size
        if positions.size and int(positions.max()) >= self.size:
            raise ContextOverflow(f"context is full: position {int(positions.max())} does not fit "
                                  f"{self.size} cells (use a larger --ctx)")
        return positions.astype(np.int64)

    def apply(self, positions: np.ndarray, cells: np.ndarray) -> None:
        self.pos[cells] = positions

    def n_kv(self) -> int:
        """Cells attention looks at: used cells rounded up to 256, at least 256, at most the size."""
        used = np.flatnonzero(self.pos >= 0)
        used_max_p1 = int(used[-1]) + 1 if used.size else 0
        return min(self.size, max(KV_PAD, pad(used_max_p1)))

    def clear(self) -> None:
        self.pos[:] = -1

    def seq_rm(self, p0: int) -> bool:
        """Forget positions >= p0. False if a sliding-window ring already overwrote cells still needed."""
        if self.n_swa and (self.pos >= 0).any():
            newest = int(self.pos.max())
            if newest >= p0 and newest - self.size >= p0 - self.n_swa:
                return False
        self.pos[self.pos >= p0] = -1
        return True

    def max_pos(self) -> int:
        return int(self.pos.max())

    # --- inputs --------------------------------------------------------------------------------
    def kq_mask(self, n_kv: int, positions: np.ndarray) -> np.ndarray:
        """F16 (n_tokens, n_kv) mask: 0 where token t may attend cell j, -inf elsewhere."""
        cell_pos = self.pos[:n_kv][None, :]
        tok_pos = positions.astype(np.int64)[:, None]
        keep = (cell_pos >= 0) & (cell_pos <= tok_pos)
        if self.n_swa:
            keep &= (tok_pos - cell_pos) < self.n_swa
        return np.where(keep, np.float16(0.0), np.float16(-np.inf))

    # --- graph pieces (llama_kv_cache::get_k / get_v / cpy_k / cpy_v) ---------------------------
    def get_k(self, il: int, n_kv: int) -> Tensor:
        k, spec = self.k[il], self.layers[il]
        return ops.view_4d(k, spec.head_dim_k, spec.n_head_kv, n_kv, 1,
                           row_size(k.type, spec.head_dim_k), row_size(k.type, spec.n_embd_k_gqa),
                           row_size(k.type, spec.n_embd_k_gqa * self.size), 0)

    def get_v(self, il: int, n_kv: int) -> Tensor:
        v, spec = self.v[il], self.layers[il]
        if not self.v_trans:
            return ops.view_4d(v, spec.head_dim_v, spec.n_head_kv, n_kv, 1,
                               row_size(v.type, spec.head_dim_v), row_size(v.type, spec.n_embd_v_gqa),
                               row_size(v.type, spec.n_embd_v_gqa * self.size), 0)
        return ops.view_4d(v, n_kv, spec.n_head_kv, spec.head_dim_v, 1,  # nb[1] > nb[2]: transposed
                           row_size(v.type, self.size * spec.head_dim_v), row_size(v.type, self.size),
                           row_size(v.type, self.size * spec.n_embd_v_gqa), 0)

    def cpy_k(self, k_cur: Tensor, k_idxs: Tensor, il: int) -> Tensor:
        n_embd_gqa = k_cur.ne[0] * k_cur.ne[1]
        k_cur = ops.view_2d(k_cur, n_embd_gqa, k_cur.ne[2], k_cur.nb[2], 0)
        return ops.set_rows(self.k[il], k_cur, k_idxs)

    def cpy_v(self, v_cur: Tensor, v_idxs: Tensor, il: int) -> Tensor:
        n_embd_gqa, n_tokens = v_cur.ne[0] * v_cur.ne[1], v_cur.ne[2]
        if not self.v_trans:
            v_cur = ops.view_2d(v_cur, n_embd_gqa, n_tokens, v_cur.nb[2], 0)
            return ops.set_rows(self.v[il], v_cur, v_idxs)
        if row_size(v_cur.type, n_embd_gqa) == v_cur.nb[2]:
            v_cur = ops.reshape_2d(v_cur, n_embd_gqa, n_tokens)
        else:
            v_cur = ops.cont_2d(v_cur, n_embd_gqa, n_tokens)
        # each index addresses one element of the transposed cache
        v_view = ops.reshape_2d(self.v[il], 1, ops.nelements(self.v[il]))
        v_cur = ops.reshape_2d(v_cur, 1, ops.nelements(v_cur))
        return ops.set_rows(v_view, v_cur, v_idxs)

    def v_idxs(self, cells: np.ndarray) -> np.ndarray:
        """Values of attn_inp_v_idxs: the cells, or for a transposed V one index per element."""
        if not self.v_trans:
            return cells.astype(np.int64)
        n_embd = max(spec.n_embd_v_gqa for spec in self.layers.values())
        j = np.arange(n_embd, dtype=np.int64)[None, :]
        return (j * self.size + cells.astype(np.int64)[:, None]).reshape(-1)

    def n_v_idxs(self, n_tokens: int) -> int:
        if not self.v_trans:
            return n_tokens
        return n_tokens * max(spec.n_embd_v_gqa for spec in self.layers.values())

    def free(self) -> None:
        for buf in self.buffers.values():
            free_quietly(buf)
        self.buffers.clear()


class KVCacheISWA:
    """llama_kv_cache_iswa: a full cache for the global layers and a ring cache for the SWA layers."""

    def __init__(self, base: KVCache, swa: KVCache) -> None:
        self.base, self.swa = base, swa

    @property
    def caches(self) -> tuple[KVCache, ...]:
        return (self.base, self.swa)

    def cache_for(self, il: int) -> KVCache:
        return self.swa if il in self.swa.layers else self.base

    @property
    def nbytes(self) -> int:
        return self.base.nbytes + self.swa.nbytes

    def free(self) -> None:
        self.base.free()
        self.swa.free()


class KVUnified:
    """A single full cache presented with the same interface as KVCacheISWA."""

    def __init__(self, base: KVCache) -> None:
        self.base = base

    @property
    def caches(self) -> tuple[KVCache, ...]:
        return (self.base,)

    def cache_for(self, il: int) -> KVCache:
        return self.base

    @property
    def nbytes(self) -> int:
        return self.base.nbytes

    def free(self) -> None:
        self.base.free()
