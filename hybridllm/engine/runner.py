"""Running a GGUF model: load weights onto a backend, keep a KV cache, and evaluate tokens.

A prompt is split into ubatches (default 512 tokens); each ubatch shape gets one graph that is built,
allocated and prepared once and then reused: later calls only write the input tensors (tokens,
positions, KV indices, masks) and run the prepared plan. Decoding one token at a time therefore
re-runs the same graph until the KV view grows by another 256 cells, as llama.cpp's graph reuse does.

    runner = load("model.gguf", n_ctx=4096)    # or hybridllm.load(...)
    logits = runner.decode(prompt_ids)        # (1, n_vocab) for the last token
    logits = runner.decode([next_id])
    text = runner.generate("The capital of France is", n_predict=16)

Several sequences (n_seq_max > 1) share one KV cache; `decode_batch()` evaluates one ubatch holding tokens
of several of them (continuous batching, as llama-server does for its slots):

    runner = load("model.gguf", n_ctx=4096, n_seq_max=2)
    a, b = runner.decode_batch([0, 1], [prompt_a, prompt_b])   # each sequence's last-token logits
"""
from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..backends.base import Backend, Unsupported
from ..ggml.tensor import Tensor
from ..ggml.types import GGMLType
from ..models import model_class
from ..models.blocks import GraphContext, Model
from ..rpc.transport import RpcError
from .gguf_file import GGUFFile
from .kv_cache import ContextOverflow
from .placement import PlacementError, model_costs, place
from .scheduler import Schedule, buffer_lost

__all__ = ["ContextOverflow", "DeviceLost", "EngineError", "ModelRunner", "PlacementError", "RunnerConfig",
           "load", "make_backend"]


class EngineError(RuntimeError):
    """The model cannot run on this backend (an op or type it does not support); one line."""


class DeviceLost(EngineError):
    """A device (an RPC worker) failed or went away; its layers' weights and KV cache are gone until
    `recover()` uploads them again. The message names the device and its layers."""


@dataclass
class RunnerConfig:
    n_ctx: int = 4096
    n_ubatch: int = 512
    type_k: GGMLType = GGMLType.F16
    type_v: GGMLType = GGMLType.F16
    flash_attn: bool = True
    max_graphs: int = 4      # prepared graphs kept (prompt shapes + the decode shape)
    n_seq_max: int = 1       # sequences sharing the KV cache (server slots)


@dataclass
class _Prepared:
    ctx: GraphContext
    logits: Tensor
    compute: Schedule    # the graph's splits and compute buffers (`.free()`)
    plan: object         # the backend's plan for a one-device graph, else the Schedule


@dataclass
class Stats:
    """Where time went (seconds), for `bench` and profiling."""
    build_s: float = 0.0
    inputs_s: float = 0.0
    compute_s: float = 0.0
    read_s: float = 0.0
    graphs_built: int = 0
    ubatches: int = 0
    tokens: int = 0
    ubatches_multi_seq: int = 0   # ubatches that held tokens of more than one sequence
    per_key: dict = field(default_factory=dict)


def make_backend(device: str = "cpu") -> Backend:
    from ..backends import DeviceError
    from ..backends import make_backend as _make
    try:
        return _make(device)
    except DeviceError as exc:
        raise EngineError(str(exc)) from None


class ModelRunner:
    """A loaded model with its KV cache: `decode()` appends tokens and returns their logits."""

    def __init__(self, model: Model, config: RunnerConfig | None = None, metadata: dict | None = None) -> None:
        self.model, self.config = model, config or RunnerConfig()
        self.hp = model.hp
        self.backend = model.backend
        self.metadata = metadata or {}
        if self.config.n_ctx <= 0 or self.config.n_ubatch <= 0:
            raise EngineError("context and ubatch sizes must be positive")
        if self.config.n_seq_max <= 0:
            raise EngineError("n_seq_max must be positive")
        self.kv = model.make_kv(self.config.n_ctx, self.config.n_ubatch, self.config.type_k, self.config.type_v,
                                v_trans=not self.config.flash_attn, n_seq=self.config.n_seq_max)
        self.n_ctx = self.kv.base.size
        self._n_past = [0] * self.config.n_seq_max   # next position of each sequence
        self._graphs: OrderedDict[tuple, _Prepared] = OrderedDict()
        self._tokenizer = None
        self.stats = Stats()
        self.lost: str | None = None   # why a device is unusable, until recover()

    # --- public API ------------------------------------------------------------------------------
    @property
    def n_vocab(self) -> int:
        return self.hp.n_vocab

    @property
    def n_past(self) -> int:
        """Tokens of sequence 0 in the cache (the sequence `decode()` extends)."""
        return self._n_past[0]

    def seq_n_past(self, seq: int) -> int:
        return self._n_past[seq]

    def decode(self, tokens: Sequence[int], *, all_logits: bool = False) -> np.ndarray:
        """Evaluate `tokens` of sequence 0 at positions n_past.. and return float32 logits: the last
        token's row (shape (1, n_vocab)), or every token's (len(tokens), n_vocab) with all_logits."""
        ids = self._check_ids(tokens)
        self._check_room(0, ids.size)
        outs = []
        step = self.config.n_ubatch
        for s in range(0, ids.size, step):
            chunk = ids[s:s + step]
            last = s + step >= ids.size
            out_rows = np.arange(chunk.size, dtype=np.int32) if all_logits else (
                np.array([chunk.size - 1], dtype=np.int32) if last else np.zeros(0, dtype=np.int32))
            logits = self._ubatch(chunk, np.zeros(chunk.size, dtype=np.int32), out_rows)
            if out_rows.size:
                outs.append(logits)
        return np.concatenate(outs) if len(outs) > 1 else outs[0]

    def decode_batch(self, seq_ids: Sequence[int], tokens: Sequence[Sequence[int]],
                     outputs: Sequence[bool] | None = None) -> list[np.ndarray | None]:
        """One ubatch with tokens of several sequences: `tokens[i]` extends sequence `seq_ids[i]` at its
        next positions. Returns, per entry, its last token's logits (n_vocab,) or None where `outputs[i]`
        is False. At most n_ubatch tokens in all; a sequence appears once. Raises ContextOverflow (nothing
        changed) when a sequence passes n_ctx or the cache has too few free cells."""
        outputs = [True] * len(seq_ids) if outputs is None else list(outputs)
        if not (len(seq_ids) == len(tokens) == len(outputs)) or not seq_ids:
            raise ValueError("decode_batch() needs one token list and output flag per sequence")
        if len(set(seq_ids)) != len(seq_ids) or not all(0 <= s < self.config.n_seq_max for s in seq_ids):
            raise ValueError(f"sequence ids must be distinct and in 0..{self.config.n_seq_max - 1}: {list(seq_ids)}")
        ids = [self._check_ids(t) for t in tokens]
        n = sum(t.size for t in ids)
        if n > self.config.n_ubatch:
            raise ValueError(f"decode_batch(): {n} tokens exceed the ubatch of {self.config.n_ubatch}")
        for s, t in zip(seq_ids, ids):
            self._check_room(s, t.size)
        seqs = np.concatenate([np.full(t.size, s, dtype=np.int32) for s, t in zip(seq_ids, ids)])
        ends = np.cumsum([t.size for t in ids]) - 1
        out_rows = ends[np.asarray(outputs, dtype=bool)].astype(np.int32)
        logits = self._ubatch(np.concatenate(ids), seqs, out_rows)
        rows = iter(logits)
        return [next(rows) if want else None for want in outputs]

    def _check_ids(self, tokens: Sequence[int]) -> np.ndarray:
        ids = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if ids.size == 0:
            raise ValueError("decode() needs at least one token")
        if ids.min() < 0 or ids.max() >= self.n_vocab:
            bad = int(ids[(ids < 0) | (ids >= self.n_vocab)][0])
            raise ValueError(f"token id {bad} is outside the vocabulary (0..{self.n_vocab - 1})")
        return ids

    def _check_room(self, seq: int, n: int) -> None:
        if self._n_past[seq] + n > self.n_ctx:
            raise ContextOverflow(f"context overflow: {self._n_past[seq]} + {n} tokens exceed the "
                                  f"context of {self.n_ctx} (use a larger --ctx)")
        if self.lost is not None:
            raise DeviceLost(f"{self.lost} (degraded: recover() once the worker is back)")

    def n_free_cells(self) -> int:
        """Cells of the full cache no sequence holds: how many more tokens fit (all sequences together)."""
        return self.kv.base.n_free()

    @property
    def tokenizer(self):  # type: ignore[no-untyped-def]
        """The model's tokenizer (hybridllm.engine.tokenizer), built on first use."""
        if self._tokenizer is None:
            from .tokenizer import Tokenizer
            self._tokenizer = Tokenizer.from_gguf(self.metadata)
        return self._tokenizer

    def generate(self, prompt: str, n_predict: int = 64, *, temperature: float = 0.0, top_k: int = 40,
                 top_p: float = 0.95, min_p: float = 0.05, seed: int = 0, reset: bool = True) -> str:
        """Text continuation of `prompt` (greedy by default), stopping at an end-of-generation token."""
        from .sampler import Sampler, SamplerParams
        tok = self.tokenizer
        if reset:
            self.reset()
        sampler = Sampler(SamplerParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                        seed=seed), self.n_vocab)
        ids = tok.tokenize(prompt, add_special=self.n_past == 0, parse_special=True)
        sampler.accept_many(ids)
        logits = self.decode(ids)[0]
        out: list[int] = []
        while len(out) < n_predict:
            t = sampler.sample(logits)
            if tok.is_eog(t):
                break
            out.append(t)
            if len(out) == n_predict or self.n_past >= self.n_ctx:
                break
            logits = self.decode([t])[0]
        return tok.detokenize(out).decode("utf-8", errors="replace")

    def reset(self) -> None:
        """Forget every sequence (the cache contents stay; their cells are marked empty)."""
        for cache in self.kv.caches:
            cache.clear()
        self._n_past = [0] * self.config.n_seq_max

    def rewind(self, n_past: int) -> bool:
        """Keep only the first n_past positions of sequence 0 (see seq_rm)."""
        return self.seq_rm(0, n_past)

    def seq_rm(self, seq: int, n_past: int) -> bool:
        """Keep only the first n_past positions of a sequence, freeing its other cells; False (and the
        sequence emptied) if the sliding-window cache no longer holds what its next token must see."""
        if n_past >= self._n_past[seq]:
            return True
        if not all(cache.seq_rm(n_past, seq) for cache in self.kv.caches):
            self.seq_clear(seq)
            return False
        self._n_past[seq] = n_past
        return True

    def seq_clear(self, seq: int) -> None:
        """Forget a sequence: its cells become free for the others."""
        for cache in self.kv.caches:
            cache.seq_rm(0, seq)
        self._n_past[seq] = 0

    def close(self) -> None:
        self.drop_graphs()
        self.kv.free()
        self.model.free()

    def drop_graphs(self) -> None:
        """Free every prepared graph (compute buffers, plans); they are rebuilt on demand."""
        for prep in self._graphs.values():
            prep.compute.free()
        self._graphs.clear()

    # --- health ----------------------------------------------------------------------------------
    def health(self, *, probe: bool = False) -> tuple[str, str]:
        """("ok", "") or ("degraded", why): a device failed (or its connection dropped, losing what it
        held) and recover() has not succeeded since. `probe` also sends each worker one small request,
        to notice a worker that died while idle; call it from the thread that runs decode()."""
        if self.lost is None:
            for b in self.model.placement.devices:
                endpoint = getattr(b, "endpoint", None)
                if endpoint is None:
                    continue   # a local device does not go away
                try:
                    if probe:
                        b.memory()
                    if self._lost_on(b):
                        raise RpcError(endpoint, "the connection dropped; what the worker held is lost")
                except RpcError as exc:
                    self._device_failed(exc)
                    break
        return ("ok", "") if self.lost is None else ("degraded", self.lost)

    def recover(self, *, progress: bool = False) -> None:
        """After a lost worker is back: reconnect, upload its weights again (a worker with --cache takes
        them from its cache), give it fresh KV memory, and start the sequence over (its cache was partly
        on the lost device). Raises RpcError if a device is still unreachable; then try again later."""
        lost = self.model.recover(progress=progress)
        lost += [b for b in self.model.placement.devices if b not in lost and self._lost_on(b)]
        self.drop_graphs()
        for cache in self.kv.caches:
            for b in lost:
                cache.realloc(b)
        self.reset()
        self.lost = None

    def _lost_on(self, b: Backend) -> bool:
        """Whether weights or KV memory of this runner on `b` went with a dropped connection."""
        bufs = [buf for key, buf in self.model.weights.buffers.items() if key == id(b)]
        bufs += [buf for cache in self.kv.caches for key, buf in cache.buffers.items() if key == id(b)]
        return any(buffer_lost(buf) for buf in bufs)

    def _device_failed(self, exc: Exception) -> DeviceLost:
        endpoint = getattr(exc, "endpoint", "")
        where = [b for b in self.model.placement.devices if endpoint and getattr(b, "endpoint", None) == endpoint]
        layers = sorted(il for b in where for il in self.model.placement.layers_of(b))
        held = f" (holding layers {_span(layers)})" if layers else ""
        self.lost = f"{where[0].name if where else 'a device'}{held} failed: {exc}"
        self.drop_graphs()
        return DeviceLost(self.lost)

    # --- one ubatch ------------------------------------------------------------------------------
    def _ubatch(self, tokens: np.ndarray, seqs: np.ndarray, out_rows: np.ndarray) -> np.ndarray:
        """Evaluate one ubatch: tokens[i] of sequence seqs[i] (each sequence's tokens in order, appended
        at its next positions); returns the logits rows `out_rows`."""
        t0 = time.perf_counter()
        n = tokens.size
        positions = self._positions(seqs)
        cells = [cache.find_cells(seqs, positions) for cache in self.kv.caches]  # may raise before any change
        for cache, c in zip(self.kv.caches, cells):
            cache.apply(positions, c, seqs)
        n_kv = tuple(cache.n_kv() for cache in self.kv.caches)
        n_out = max(int(out_rows.size), 1)  # a graph always produces one row; unused when none asked
        try:
            prep = self._prepared((n, n_out, n_kv))
            t1 = time.perf_counter()
            self._set_inputs(prep, tokens, seqs, positions, cells,
                             out_rows if out_rows.size else np.array([n - 1]))
            t2 = time.perf_counter()
            prep.plan.run()  # type: ignore[attr-defined]
            t3 = time.perf_counter()
            lg, buf = prep.logits, prep.logits.buffer
            assert buf is not None
            raw = buf.backend.get(buf, lg.offset, lg.nbytes)
        except RpcError as exc:
            raise self._device_failed(exc) from None
        logits = np.frombuffer(raw, dtype=np.float32).reshape(n_out, self.n_vocab)
        t4 = time.perf_counter()
        for s, count in zip(*np.unique(seqs, return_counts=True)):
            self._n_past[int(s)] += int(count)
        st = self.stats
        st.build_s += t1 - t0
        st.inputs_s += t2 - t1
        st.compute_s += t3 - t2
        st.read_s += t4 - t3
        st.ubatches += 1
        st.tokens += n
        st.ubatches_multi_seq += bool(seqs.size and seqs.min() != seqs.max())
        return logits[:out_rows.size] if out_rows.size else logits[:0]

    def _positions(self, seqs: np.ndarray) -> np.ndarray:
        """Each token's position: its sequence's next one, counting earlier tokens of the ubatch."""
        out = np.empty(seqs.size, dtype=np.int64)
        nxt = dict.fromkeys(seqs.tolist(), 0)
        for s in nxt:
            nxt[s] = self._n_past[s]
        for i, s in enumerate(seqs.tolist()):
            out[i] = nxt[s]
            nxt[s] += 1
        return out

    def _prepared(self, key: tuple) -> _Prepared:
        prep = self._graphs.get(key)
        if prep is not None:
            self._graphs.move_to_end(key)
            return prep
        while len(self._graphs) >= self.config.max_graphs:
            _, old = self._graphs.popitem(last=False)
            old.compute.free()
        n, n_out, n_kv = key
        ctx = GraphContext(self.model, self.kv, n, n_out, n_kv, flash_attn=self.config.flash_attn)
        logits = self.model.build(ctx)
        sched = Schedule(ctx.graph, self.backend, layer_backend=self.model.layer_backend,
                         replicas=self.model.weights.replicas)
        try:
            sched.prepare()
        except Unsupported as exc:
            names = ", ".join(b.name for b in sched.devices)
            raise EngineError(f"{Path(self.model.path).name}: cannot run on {names}: {exc}") from None
        plan = sched.splits[0].plan if sched.single else sched
        prep = _Prepared(ctx, logits, sched, plan)
        self._graphs[key] = prep
        self.stats.graphs_built += 1
        return prep

    def _set_inputs(self, prep: _Prepared, tokens: np.ndarray, seqs: np.ndarray, positions: np.ndarray,
                    cells: list[np.ndarray], out_rows: np.ndarray) -> None:
        ctx, sched = prep.ctx, prep.compute

        def put(t: Tensor, values: np.ndarray) -> None:
            data = np.ascontiguousarray(values)
            if data.nbytes != t.nbytes:
                raise AssertionError(f"input {t.name!r}: {data.nbytes} bytes for a {t.nbytes}-byte tensor")
            sched.put(t, memoryview(data).cast("B"))  # type: ignore[arg-type]  # each device reading it

        inp = ctx.inputs
        put(inp["tokens"], tokens.astype(np.int32))
        put(inp["pos"], self.model.positions(positions).astype(np.int32))
        put(inp["out_ids"], out_rows.astype(np.int32))
        if "scale_rows" in inp:
            put(inp["scale_rows"], np.full(tokens.size, ctx.tok_scale, dtype=np.float32))
        cells_of = {id(cache): c for cache, c in zip(self.kv.caches, cells)}
        for a in ctx.attn_inputs:
            idx = cells_of[id(a.cache)].astype(np.int64)
            put(a.k_idxs, idx)
            put(a.v_idxs, a.cache.v_idxs(idx))
            mask = a.cache.kq_mask(a.n_kv, positions, seqs)
            put(a.kq_mask, mask if ctx.flash_attn else mask.astype(np.float32))


def _span(items: list[int]) -> str:
    return f"{items[0]}-{items[-1]}" if len(items) > 1 else str(items[0])


def load(path: str | Path, *, device: str | Backend = "cpu", n_ctx: int = 4096, n_ubatch: int = 512,
         type_k: GGMLType = GGMLType.F16, type_v: GGMLType = GGMLType.F16, flash_attn: bool = True,
         rpc: Sequence[str | Backend] = (), tensor_split: Sequence[float] | None = None,
         rpc_timeout: float | None = 300.0, kv_slots: int = 1, n_seq_max: int = 1, progress: bool = False,
         log: Callable[[str], None] | None = None) -> ModelRunner:
    """Open a GGUF model, upload its weights to the device(s) and return a ready ModelRunner.

    `rpc` adds devices that hold layers: "host:port" endpoints (every device of each worker) or Backend
    objects (tests use local ones). The layers are placed over the workers' devices and then `device`
    (the master, which also keeps the input and output layers) by free memory or `tensor_split`
    (one proportion per device, in that order); `log` gets the placement table. `rpc_timeout` bounds
    each wait for a worker's reply (a hung worker fails the step after it); `kv_slots` counts the KV
    caches the caller will create over these weights in the placement's budget; `n_seq_max` sequences
    share the runner's one cache (decode_batch).

    Raises GGUFError/ModelError (one line) for files that cannot be used, PlacementError when the model
    does not fit (before anything is uploaded), RpcError when a worker cannot be reached.
    """
    master = make_backend(device) if isinstance(device, str) else device
    owned: list[Backend] = []
    try:
        workers = _connect(rpc, owned, rpc_timeout)
        with GGUFFile(path) as f:
            cls = model_class(f.arch, f.path)
            placement = None
            if workers or tensor_split is not None:
                hp = cls.hparams_cls.from_gguf(f)
                costs = model_costs(f, hp, n_ctx=n_ctx, n_ubatch=n_ubatch, type_k=type_k, type_v=type_v,
                                    flash_attn=flash_attn, kv_slots=kv_slots, n_seq=n_seq_max)
                placement = place(costs, [*workers, master], master, tensor_split,
                                  master_layers=not _is_host(master))
                if log is not None:
                    log(placement.describe())
            model = cls(f, master, placement, progress=progress)
            metadata = f.metadata
    except BaseException:
        for b in owned:
            b.close()  # type: ignore[attr-defined]
        raise
    model.owned = owned
    config = RunnerConfig(n_ctx=n_ctx, n_ubatch=n_ubatch, type_k=type_k, type_v=type_v, flash_attn=flash_attn,
                          n_seq_max=n_seq_max)
    try:
        return ModelRunner(model, config, metadata)
    except BaseException:
        model.free()
        raise


def _is_host(backend: Backend) -> bool:
    from ..backends.numpy_backend import NumpyBackend
    return isinstance(backend, NumpyBackend)


def _connect(rpc: Sequence[str | Backend], owned: list[Backend], timeout: float | None) -> list[Backend]:
    """Backends for --rpc entries: every device of each worker endpoint, in order (llama.cpp adds them
    all), or Backend objects as given."""
    from ..rpc.client_backend import RpcBackend
    out: list[Backend] = []
    for entry in rpc:
        if isinstance(entry, Backend):
            out.append(entry)
            continue
        first = RpcBackend(entry, timeout=timeout)
        owned.append(first)
        out.append(first)
        for dev in range(1, first.link.device_count):
            be = RpcBackend(entry, dev, timeout=timeout)
            owned.append(be)
            out.append(be)
    return out
