"""Adapter from hybridllm's in-process engine (ModelRunner + Tokenizer + ChatTemplate + Sampler) to the
server's `Engine` interface.

Each slot is its own ModelRunner (own KV cache) over one shared set of weights. All model work runs on a
single engine thread, one short step at a time (a prompt ubatch, or one token), so steps of concurrent
slots interleave and the event loop never blocks. Because that thread runs steps in submission order, a
step still in flight when its client went away finishes before any later step touches the same slot.

Layers may live on RPC workers (`--rpc`). A worker that fails makes the step fail at once (503) and the
engine degraded; the next request first recovers every slot (the weights go back once, from the worker's
--cache when it has one), or answers 503 again while the worker is still down.
"""
from __future__ import annotations

import asyncio
import logging
import math
import sys
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import gguf
import numpy as np

from .engine_api import (ContextExceeded, EngineLoadError, EngineRequestError, EngineUnavailable, GenerateRequest,
                         GenStats, Health, HealthState, ModelInfo, SamplingParams, Step)

log = logging.getLogger(__name__)
T = TypeVar("T")

__all__ = ["EngineUnsupported", "LocalEngine", "check_placement"]


_TEMPLATE_ARGS = frozenset({"messages", "add_generation_prompt", "tools", "documents"})


class EngineUnsupported(Exception):
    """A serve option the engine cannot honour yet; one line."""


def check_placement(device: str, rpc: Sequence[str], tensor_split: Sequence[float]) -> None:
    """Fail early, in one line, on placement options that cannot work whatever the workers say."""
    from ..engine.runner import EngineError, make_backend
    from ..rpc.transport import parse_endpoint
    for endpoint in rpc:
        try:
            parse_endpoint(endpoint)
        except ValueError as exc:
            raise EngineUnsupported(f"--rpc: {exc}") from None
    try:
        make_backend(device)
    except EngineError as exc:
        raise EngineUnsupported(f"--device {device}: {exc}") from None
    if tensor_split and not rpc and len(tensor_split) != 1:  # with workers, their device count decides
        raise EngineUnsupported(f"--tensor-split has {len(tensor_split)} values for 1 device ({device}); "
                                f"add workers with --rpc")


@dataclass
class _Seq:
    """One slot's sequence: its runner and the tokens currently held in its KV cache."""
    runner: Any                          # hybridllm.engine.runner.ModelRunner
    tokens: list[int] = field(default_factory=list)
    dirty: bool = False                  # a step failed half-way: reset before the next use
    epoch: int = 0                       # bumped when recovery resets the cache under a running job


class LocalEngine:
    """`Engine` over in-process ModelRunners; build it with `LocalEngine.load()` (blocking)."""

    def __init__(self, runners: Sequence[Any], tokenizer: Any, template: Any, info: ModelInfo) -> None:
        self._seqs = [_Seq(r) for r in runners]
        self._tok = tokenizer
        self._template = template
        self._info = info
        self._health = Health(HealthState.OK)
        self._lost_reason = ""               # the failure that made the engine degraded
        self._probe: asyncio.Future[None] | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="hybridllm-engine")
        self._closed = False

    # --- construction ------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path, *, n_ctx: int = 4096, n_parallel: int = 1, device: str = "cpu",
             name: str | None = None, rpc: Sequence[str] = (), tensor_split: Sequence[float] | None = None,
             rpc_token: str | None = None, rpc_timeout: float = 300.0) -> LocalEngine:
        """Load the model once, its layers placed over `rpc` workers' devices and then `device`, and give
        each of n_parallel slots n_ctx // n_parallel cells of KV cache (llama-server's per-slot split).
        Raises EngineLoadError (one line) for what the user can fix."""
        from ..engine.alloc import AllocError
        from ..engine.gguf_file import GGUFError
        from ..engine.placement import PlacementError
        from ..engine.chat_template import ChatTemplateError
        from ..engine.runner import EngineError
        from ..engine.tokenizer_vocab import VocabError
        from ..rpc.transport import RpcError
        if n_parallel < 1:
            raise ValueError("--parallel must be at least 1")
        try:
            return cls._load(path, n_ctx, n_parallel, device, name, list(rpc), list(tensor_split or []) or None,
                             rpc_token, rpc_timeout)
        except (PlacementError, RpcError, AllocError, GGUFError, EngineError, MemoryError, VocabError,
                ChatTemplateError) as exc:
            raise EngineLoadError(_one_line(exc)) from exc

    @classmethod
    def _load(cls, path: str | Path, n_ctx: int, n_parallel: int, device: str, name: str | None,
              rpc: list[str], tensor_split: list[float] | None, rpc_token: str | None,
              rpc_timeout: float) -> LocalEngine:
        from ..engine.chat_template import ChatTemplate
        from ..engine.runner import ModelRunner, load
        from ..engine.tokenizer import Tokenizer
        n_ctx_train = _train_ctx(path)
        n_ctx_total = n_ctx if n_ctx > 0 else n_ctx_train  # --ctx 0: the training context
        slot_ctx = n_ctx_total // n_parallel
        if slot_ctx < 8:
            raise EngineLoadError(f"--ctx {n_ctx_total} over --parallel {n_parallel} leaves {slot_ctx} tokens "
                                  f"a slot")
        if n_ctx_total > n_ctx_train:
            log.warning("--ctx %d is beyond the model's training context of %d tokens", n_ctx_total, n_ctx_train)
        mine = _connect(rpc, rpc_token, rpc_timeout) if rpc_token else []  # load() takes no token
        try:
            first = load(path, device=device, n_ctx=slot_ctx, rpc=mine or rpc, tensor_split=tensor_split,
                         kv_slots=n_parallel, rpc_timeout=rpc_timeout,
                         progress=sys.stderr.isatty() or bool(rpc), log=log.info)
        except BaseException:
            for b in mine:
                b.close()
            raise
        first.model.owned.extend(mine)  # closed with the model, after the last slot
        runners = [first]
        try:
            for _ in range(n_parallel - 1):  # over the same weights; each KV cache goes where its layers are
                runners.append(ModelRunner(first.model, replace(first.config), first.metadata))
            tok = Tokenizer.from_gguf(first.metadata)
            template = ChatTemplate.for_model(first.metadata, tok)
        except BaseException:
            for r in runners[1:]:
                _free_runner(r, with_model=False)
            first.close()
            raise
        devices = "+".join(b.name for b in first.model.placement.devices)
        return cls(runners, tok, template, _model_info(path, first, tok, template, name, devices))

    # --- Engine: facts and state --------------------------------------------------------------------
    @property
    def info(self) -> ModelInfo:
        return self._info

    @property
    def n_slots(self) -> int:
        return len(self._seqs)

    def health(self) -> Health:
        return self._health

    async def probe_health(self, wait: float = 2.0) -> Health:
        """Ask each worker for its memory on the engine thread, to notice one that died while idle. One
        probe at a time; the last known health if the thread stays busy longer than `wait` seconds (a
        hung worker holds it until the RPC timeout)."""
        if self._closed or self._health.state is not HealthState.OK:
            return self._health
        if self._probe is None:
            self._probe = asyncio.get_running_loop().run_in_executor(self._executor, self._probe_devices)
            self._probe.add_done_callback(self._probe_done)
        try:
            await asyncio.wait_for(asyncio.shield(self._probe), wait)
        except asyncio.TimeoutError:
            pass
        return self._health

    def _probe_done(self, fut: asyncio.Future[None]) -> None:
        self._probe = None
        if not fut.cancelled() and fut.exception() is not None:
            log.warning("health probe failed: %s", _one_line(fut.exception()))  # type: ignore[arg-type]

    def _probe_devices(self) -> None:
        """Engine thread. The slots share the workers' connections: one probe covers them all."""
        for i, seq in enumerate(self._seqs):
            state, why = seq.runner.health(probe=i == 0)
            if state != "ok":
                self.mark_degraded(why)
                return

    def mark_degraded(self, message: str) -> None:
        """Something (a lost worker, a failed step) makes the engine serve in a degraded way."""
        if self._health.state is not HealthState.DEGRADED:
            self._lost_reason = message
        self._health = Health(HealthState.DEGRADED, message)

    def mark_ok(self) -> None:
        self._health = Health(HealthState.OK)
        self._lost_reason = ""

    def _recover(self) -> None:
        """Engine thread, before a job: if degraded, reconnect and re-upload what a lost worker held (the
        weights once; each slot its KV cache) and start every slot's sequence over."""
        from ..rpc.transport import RpcError
        if self._health.state is not HealthState.DEGRADED:
            return
        reason = self._lost_reason or self._health.message
        where = reason.split(" failed: ", 1)[0] if " failed: " in reason else "a device"
        log.info("recovering %s", where)
        try:
            for seq in self._seqs:
                seq.runner.recover()
                seq.tokens.clear()
                seq.dirty = False
                seq.epoch += 1   # a job still running on that slot must not continue on a reset cache
        except Exception as exc:  # stay degraded: each request tries again
            if not isinstance(exc, RpcError):   # e.g. the worker came back with less memory
                log.exception("recovering %s failed", where)
            what = "still down" if isinstance(exc, RpcError) else "recovery failed"
            message = f"{what}: {_one_line(exc)} ({where} failed earlier; each request retries)"
            self._health = Health(HealthState.DEGRADED, message)
            raise EngineUnavailable(message) from None
        self.mark_ok()
        log.info("recovered: every device is back")

    # --- Engine: text ------------------------------------------------------------------------------
    async def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        try:
            return await asyncio.to_thread(self._tok.tokenize, text, add_special, parse_special)
        except ValueError as exc:  # e.g. an unpaired surrogate escaped in the JSON
            raise EngineRequestError(str(exc)) from None

    async def detokenize(self, ids: Sequence[int]) -> str:
        self._check_ids(ids)
        pieces = await self.token_pieces(ids)  # llama-server: token_to_piece(special=True) per token
        return b"".join(pieces).decode("utf-8", "replace")

    async def token_pieces(self, ids: Sequence[int]) -> list[bytes]:
        self._check_ids(ids)
        return [self._tok.token_to_piece(int(t), special=True) for t in ids]

    async def apply_template(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True,
                             template_kwargs: Mapping[str, Any] | None = None) -> str:
        from ..engine.chat_template import ChatTemplateError
        kwargs = dict(template_kwargs or {})
        taken = sorted(set(kwargs) & _TEMPLATE_ARGS)
        if taken:
            raise EngineRequestError(f"chat_template_kwargs cannot set {', '.join(taken)}")
        try:
            return await asyncio.to_thread(self._template.render, messages, add_generation_prompt, None, **kwargs)
        except ChatTemplateError as exc:
            raise EngineRequestError(str(exc)) from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as exc:
            # a template tripping over unusual messages is the request's problem, not the server's
            raise EngineRequestError(f"chat template error: {type(exc).__name__}: {exc}") from None

    def _check_ids(self, ids: Sequence[int]) -> None:
        n = self._info.n_vocab
        for t in ids:
            if not 0 <= t < n:
                raise EngineRequestError(f"token id {t} is outside the vocabulary (0..{n - 1})")

    # --- Engine: generation ------------------------------------------------------------------------
    def cached_prefix(self, slot: int, prompt: Sequence[int]) -> int:
        return _common_prefix(self._seqs[slot].tokens, prompt)

    async def generate(self, slot: int, request: GenerateRequest, stats: GenStats) -> AsyncIterator[Step]:
        if self._closed:
            raise RuntimeError("engine is closed")
        if not request.prompt:
            raise EngineRequestError("the prompt is empty")
        self._check_ids(request.prompt)
        seq = self._seqs[slot]
        if len(request.prompt) >= seq.runner.n_ctx:
            raise ContextExceeded(len(request.prompt), seq.runner.n_ctx)
        job = _Job(seq, request, stats, self._tok, self._sampler(request))
        await asyncio.get_running_loop().run_in_executor(self._executor, self._recover)
        await self._run(seq, job.start)
        while job.pending:
            await self._run(seq, job.prefill_chunk)
        while True:
            step = await self._run(seq, job.next_step)
            yield step
            if step.finish_reason is not None:
                return

    def _sampler(self, request: GenerateRequest) -> Any:
        from ..engine.sampler import DEFAULT_SEED, Sampler, SamplerParams
        s: SamplingParams = request.sampling
        bias = {int(k): float(v) for k, v in s.logit_bias.items()}
        self._check_ids(list(bias))
        if request.ignore_eos:  # llama-server: ignore_eos biases every end-of-generation token to -inf
            bias.update({t: -math.inf for t in self._tok.eog_ids})
        params = SamplerParams(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, min_p=s.min_p,
                               repeat_penalty=s.repeat_penalty, repeat_last_n=s.repeat_last_n,
                               frequency_penalty=s.frequency_penalty, presence_penalty=s.presence_penalty,
                               seed=DEFAULT_SEED if s.seed < 0 else s.seed, logit_bias=bias)
        try:
            return Sampler(params, self._info.n_vocab)
        except ValueError as exc:
            raise EngineRequestError(str(exc)) from None

    async def _run(self, seq: _Seq, fn: Callable[[], T]) -> T:
        def guarded() -> T:
            try:
                return fn()
            except BaseException:
                seq.dirty = True  # the cache may hold half a step: reset it before the next request
                raise
        from ..engine.runner import DeviceLost
        from ..rpc.transport import RpcError
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, guarded)
        except (EngineRequestError, EngineUnavailable, asyncio.CancelledError):
            raise
        except (DeviceLost, RpcError) as exc:  # the message names the device and its layers
            self.mark_degraded(_one_line(exc))
            raise EngineUnavailable(_one_line(exc)) from None
        except Exception as exc:
            self.mark_degraded(f"a generation failed: {type(exc).__name__}: {exc}")
            raise

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await asyncio.to_thread(self._executor.shutdown, True)
        for i, seq in enumerate(self._seqs):
            _free_runner(seq.runner, with_model=(i == len(self._seqs) - 1))


class _Job:
    """One request on one slot, as engine-thread steps: start, prompt ubatches, then one token per step."""

    def __init__(self, seq: _Seq, req: GenerateRequest, stats: GenStats, tok: Any, sampler: Any) -> None:
        from ..engine.sampler import StopChecker
        from ..engine.tokenizer import StreamDecoder
        self.seq, self.req, self.stats, self.tok, self.sampler = seq, req, stats, tok, sampler
        self.decoder = StreamDecoder(tok)
        self.stop = StopChecker(() if req.ignore_eos else tok.eog_ids, list(req.stop))
        self.pending: list[int] = []
        self.logits: np.ndarray | None = None
        self.last: int | None = None     # sampled, not yet in the cache
        self.t0 = self.t_prompt_end = 0.0
        self.epoch = seq.epoch

    def _check_epoch(self) -> None:
        if self.seq.epoch != self.epoch:
            raise EngineUnavailable("the model was reloaded after a worker failed; retry the request")

    def start(self) -> None:
        seq, runner, prompt = self.seq, self.seq.runner, list(self.req.prompt)
        self.t0 = _now()
        self.epoch = seq.epoch
        if seq.dirty:
            runner.reset()
            seq.tokens.clear()
        n_keep = _common_prefix(seq.tokens, prompt) if self.req.cache_prompt else 0
        n_keep = min(n_keep, len(prompt) - 1)  # re-evaluate at least one token: its logits are needed
        if n_keep < runner.n_past and not runner.rewind(n_keep):
            n_keep = 0  # a sliding-window cache cannot go back: rewind() reset it
        del seq.tokens[n_keep:]
        self.pending = prompt[n_keep:]
        self.stats.n_prompt, self.stats.n_cached = len(prompt), n_keep
        self.sampler.accept_many(prompt)  # llama-server fills the penalty window with the prompt

    def prefill_chunk(self) -> None:
        self._check_epoch()
        runner = self.seq.runner
        chunk, self.pending = self.pending[:runner.config.n_ubatch], self.pending[runner.config.n_ubatch:]
        logits = runner.decode(chunk)
        self.seq.tokens.extend(chunk)
        self.stats.n_decode += 1
        if not self.pending:
            self.logits = logits[0]
            self.t_prompt_end = _now()
            self.stats.t_prompt_ms = (self.t_prompt_end - self.t0) * 1e3

    def next_step(self) -> Step:
        self._check_epoch()
        runner, req, st = self.seq.runner, self.req, self.stats
        if req.max_tokens == 0:
            return Step(None, "", "length", "limit")
        if self.last is not None:
            self.logits = runner.decode([self.last])[0]
            self.seq.tokens.append(self.last)
            st.n_decode += 1
        assert self.logits is not None
        token = self.sampler.sample(self.logits)
        self.last = token
        st.n_predicted += 1
        st.t_gen_ms = (_now() - self.t_prompt_end) * 1e3
        return self._finish_or_continue(token)

    def _finish_or_continue(self, token: int) -> Step:
        piece = self.decoder.feed([token])
        if self.stop.is_eog(token):
            return Step(token, self.stop.flush() + piece + self.decoder.flush(), "stop", "eos")
        text, hit = self.stop.feed_text(piece)
        if hit:
            return Step(token, text, "stop", "word", stopping_word=self.stop.stopped_by or "")
        if 0 < self.req.max_tokens <= self.stats.n_predicted:
            return Step(token, text + self._drain(), "length", "limit")
        if self.seq.runner.n_past + 1 >= self.seq.runner.n_ctx:  # no room to decode this token
            return Step(token, text + self._drain(), "length", "limit", truncated=True)
        return Step(token, text)

    def _drain(self) -> str:
        """Held-back text at a stop that is not a stop string: what's left of the decoder and checker."""
        tail, _ = self.stop.feed_text(self.decoder.flush())
        return tail + self.stop.flush()


def _now() -> float:
    import time
    return time.perf_counter()


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _free_runner(runner: Any, *, with_model: bool) -> None:
    """ModelRunner.close() also frees the weights, which the slots share; free only what is its own."""
    if with_model:
        runner.close()
        return
    for prep in runner._graphs.values():  # gap: ModelRunner has no close(free_model=False)
        prep.compute.free()
    runner._graphs.clear()
    runner.kv.free()


def _train_ctx(path: str | Path) -> int:
    """The model's training context, read from the file's header."""
    from ..engine.gguf_file import GGUFFile
    from ..models import model_class
    with GGUFFile(path) as f:
        return int(model_class(f.arch, f.path).hparams_cls.from_gguf(f).n_ctx_train)


def _connect(rpc: Sequence[str], token: str, timeout: float) -> list[Any]:
    """Every device of each worker, over connections that prove `token` (what load() does for
    endpoints, which it connects without a token)."""
    from ..rpc.client_backend import RpcBackend
    out: list[Any] = []
    try:
        for endpoint in rpc:
            out.append(RpcBackend(endpoint, token=token, timeout=timeout))
            out += [RpcBackend(endpoint, dev, token=token, timeout=timeout)
                    for dev in range(1, out[-1].link.device_count)]
    except BaseException:
        for b in out:
            b.close()
        raise
    return out


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _model_info(path: str | Path, runner: Any, tok: Any, template: Any, name: str | None,
                device: str) -> ModelInfo:
    weights = list(runner.model.weights.items().values())
    meta = runner.metadata
    ftype = meta.get("general.file_type")
    try:
        ftype_name = gguf.LlamaFileType(int(ftype)).name.removeprefix("MOSTLY_") if ftype is not None else "?"
    except ValueError:
        ftype_name = f"ftype {ftype}"
    v = tok.vocab

    def special(t: int) -> str:
        return tok.token_to_piece(t, special=True).decode("utf-8", "replace") if t >= 0 else ""
    return ModelInfo(
        name=name or Path(path).name, path=str(path), arch=runner.hp.arch, n_ctx=runner.n_ctx,
        n_ctx_train=runner.hp.n_ctx_train, n_vocab=runner.n_vocab, n_embd=runner.hp.n_embd,
        n_params=int(sum(math.prod(w.ne) for w in weights)), size=int(sum(w.nbytes for w in weights)),
        ftype=ftype_name, vocab_type=1 if v.model == "llama" else 2, bos_token=special(v.bos),
        eos_token=special(v.eos), chat_template=template.source or template.builtin or "", device=device)

