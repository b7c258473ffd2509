"""The KV cache, laid out and addressed like llama.cpp's unified cache (llama-kv-cache.cpp, llama-kv-cells.h).

Each attention layer owns a K and a V tensor of shape (n_embd_k_gqa, kv_size) in one backend buffer
(F16 by default). A ubatch's K/V rows are written by SET_ROWS nodes at cell indices passed as I64 inputs
(`attn_inp_k_idxs` / `attn_inp_v_idxs`), attention reads a view of the first n_kv cells (n_kv padded to
256 so that decode graphs can be reused), and an F16 mask (`attn_inp_kq_mask`, 0 or -inf) hides empty
cells, future positions and, in a sliding-window cache, positions older than the window. V is stored
untransposed for flash attention; without it (`v_trans`) V is stored transposed, one element per index,
as llama.cpp does so that KQ*V needs no copy.

Cells: each cell holds (position, sequence id) or is empty. Several sequences (server slots) share the
cells: a sequence takes cells as its tokens are written and gives them back when it is removed or rewound
(`seq_rm`), so one sequence may use the whole cache while the others are idle. The mask lets token t of
sequence s see cell j only if j belongs to s and pos_j <= pos_t (and, in a sliding-window cache, is within
the window).

Placement: a sequence's next tokens take the free cells that follow the cell of its last position,
wrapping around. A lone sequence therefore gets position p in cell p, or in a sliding-window cache (a
ring) cell p mod size -- what llama.cpp chooses for one sequence -- and with several sequences each one's
cells stay in position order. A sliding-window cell also counts as free once no future token of its
sequence can see it (llama.cpp's find_slot does the same), and the ring is sized n_swa * n_seq + n_ubatch
rounded up to 256, so that every sequence keeps its window and a ubatch never overwrites a cell still in a
window.
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
    """K/V tensors for a set of layers, and which (position, sequence) each cell holds (-1 = empty)."""

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
        self.seq = np.full(size, -1, dtype=np.int32)

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
        """The cell a lone sequence puts each position in (no state change): p, or p mod size in a ring."""
        if self.n_swa:
            return positions % self.size
        if positions.size and int(positions.max()) >= self.size:
            raise ContextOverflow(f"context is full: position {int(positions.max())} does not fit "
                                  f"{self.size} cells (use a larger --ctx)")
        return positions.astype(np.int64)

    def find_cells(self, seq_ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Cells for a ubatch's tokens (no state change). Each sequence continues after the cell of its
        last position (a new one at its own cell, `cells_for`) with the next free cells, wrapping around:
        a lone sequence so gets exactly `cells_for`, and each sequence's cells stay in position order
        (attention sums them in cell order). ContextOverflow when there are not enough free cells."""
        usable = self._usable()
        out = np.empty(positions.size, dtype=np.int64)
        for s in dict.fromkeys(seq_ids.tolist()):
            rows = np.flatnonzero(seq_ids == s)
            mine = np.flatnonzero(self.seq == s)
            start = (int(mine[np.argmax(self.pos[mine])]) + 1 if mine.size
                     else int(self.cells_for(positions[rows[:1]])[0]))
            free = np.flatnonzero(usable)
            if free.size < rows.size:
                raise ContextOverflow(f"the KV cache is full: {rows.size} cells needed, {free.size} free of "
                                      f"{self.size} (use a larger --ctx)")
            k = int(np.searchsorted(free, start))
            cells = np.concatenate([free[k:k + rows.size], free[:max(0, rows.size - (free.size - k))]])
            out[rows] = cells
            usable[cells] = False
        return out

    def _usable(self) -> np.ndarray:
        """Cells a new token may take: empty ones, and in a sliding-window cache those that no future token
        of their sequence can see (position <= next position - n_swa)."""
        usable = self.pos < 0
        if self.n_swa:
            for s in np.unique(self.seq[~usable]):
                mine = self.seq == s
                nxt = int(self.pos[mine].max()) + 1
                usable |= mine & (self.pos <= nxt - self.n_swa)
        return usable

    def apply(self, positions: np.ndarray, cells: np.ndarray, seq_ids: np.ndarray | int = 0) -> None:
        self.pos[cells] = positions
        self.seq[cells] = seq_ids

    def n_kv(self) -> int:
        """Cells attention looks at: used cells rounded up to 256, at least 256, at most the size."""
        used = np.flatnonzero(self.pos >= 0)
        used_max_p1 = int(used[-1]) + 1 if used.size else 0
        return min(self.size, max(KV_PAD, pad(used_max_p1)))

    def n_free(self) -> int:
        """Empty cells (a sliding-window cache may reuse more: see find_cells)."""
        return int(np.count_nonzero(self.pos < 0))

    def clear(self) -> None:
        self.pos[:] = -1
        self.seq[:] = -1

    def seq_rm(self, p0: int, seq: int = 0) -> bool:
        """Forget positions >= p0 of a sequence. False (nothing changed) if a sliding-window cache no longer
        holds the n_swa positions before p0 that the next tokens need (llama-server's reuse test)."""
        mine = self.seq == seq
        drop = mine & (self.pos >= p0)
        if self.n_swa and p0 > 0 and drop.any():
            lo = max(0, p0 - self.n_swa)
            if np.count_nonzero(mine & (self.pos >= lo) & (self.pos < p0)) < p0 - lo:
                return False
        self.pos[drop] = -1
        self.seq[drop] = -1
        return True

    def max_pos(self, seq: int | None = None) -> int:
        """Largest position held (by one sequence, or any); -1 when none."""
        if seq is None:
            return int(self.pos.max())
        mine = self.pos[self.seq == seq]
        return int(mine.max()) if mine.size else -1

    # --- inputs --------------------------------------------------------------------------------
    def kq_mask(self, n_kv: int, positions: np.ndarray, seq_ids: np.ndarray | None = None) -> np.ndarray:
        """F16 (n_tokens, n_kv) mask: 0 where token t may attend cell j, -inf elsewhere. Without seq_ids
        every token and cell is taken to be of one sequence."""
        cell_pos = self.pos[:n_kv][None, :]
        tok_pos = positions.astype(np.int64)[:, None]
        keep = (cell_pos >= 0) & (cell_pos <= tok_pos)
        if seq_ids is not None:
            keep &= self.seq[:n_kv][None, :] == np.asarray(seq_ids)[:, None]
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
