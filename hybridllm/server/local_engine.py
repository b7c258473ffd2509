"""Adapter from hybridllm's in-process engine (ModelRunner + Tokenizer + ChatTemplate + Sampler) to the
server's `Engine` interface.

Each slot is its own ModelRunner (own KV cache) over one shared set of weights. All model work runs on a
single engine thread, one short step at a time (a prompt ubatch, or one token), so steps of concurrent
slots interleave and the event loop never blocks. Because that thread runs steps in submission order, a
step still in flight when its client went away finishes before any later step touches the same slot.
"""
from __future__ import annotations

import asyncio
import logging
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Mapping, Sequence, TypeVar

import gguf
import numpy as np

from .engine_api import (ContextExceeded, EngineRequestError, GenerateRequest, GenStats, Health, HealthState,
                         ModelInfo, SamplingParams, Step)

log = logging.getLogger(__name__)
T = TypeVar("T")

__all__ = ["LocalEngine", "EngineUnsupported", "check_placement"]


_TEMPLATE_ARGS = frozenset({"messages", "add_generation_prompt", "tools", "documents"})


class EngineUnsupported(Exception):
    """A serve option the engine cannot honour yet; one line."""


def check_placement(device: str, rpc: Sequence[str], tensor_split: Sequence[float]) -> None:
    """Fail early, in one line, on placement options the in-process engine does not implement."""
    from ..engine.runner import EngineError, make_backend
    if rpc:
        raise EngineUnsupported(f"--rpc {','.join(rpc)}: the engine cannot place layers on RPC workers yet")
    if tensor_split:
        raise EngineUnsupported("--tensor-split: the engine has a single device and cannot split layers yet")
    try:
        make_backend(device)
    except EngineError as exc:
        raise EngineUnsupported(f"--device {device}: {exc}") from None


@dataclass
class _Seq:
    """One slot's sequence: its runner and the tokens currently held in its KV cache."""
    runner: Any                          # hybridllm.engine.runner.ModelRunner
    tokens: list[int] = field(default_factory=list)
    dirty: bool = False                  # a step failed half-way: reset before the next use


class LocalEngine:
    """`Engine` over in-process ModelRunners; build it with `LocalEngine.load()` (blocking)."""

    def __init__(self, runners: Sequence[Any], tokenizer: Any, template: Any, info: ModelInfo) -> None:
        self._seqs = [_Seq(r) for r in runners]
        self._tok = tokenizer
        self._template = template
        self._info = info
        self._health = Health(HealthState.OK)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="hybridllm-engine")
        self._closed = False

    # --- construction ------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path, *, n_ctx: int = 4096, n_parallel: int = 1, device: str = "cpu",
             name: str | None = None) -> "LocalEngine":
        """Load the model once and give each of n_parallel slots n_ctx // n_parallel cells of KV cache
        (llama-server's per-slot context split)."""
        from ..engine.chat_template import ChatTemplate
        from ..engine.runner import ModelRunner, load
        from ..engine.tokenizer import Tokenizer
        if n_parallel < 1:
            raise ValueError("--parallel must be at least 1")
        # --ctx 0 means the training context, which is known only once the model is open
        first = load(path, device=device, n_ctx=max(n_ctx // n_parallel, 8) if n_ctx > 0 else 256)
        n_ctx_total = n_ctx if n_ctx > 0 else first.hp.n_ctx_train
        slot_ctx = n_ctx_total // n_parallel
        if slot_ctx < 8:
            first.close()
            raise ValueError(f"--ctx {n_ctx_total} over --parallel {n_parallel} leaves {slot_ctx} tokens a slot")
        if n_ctx_total > first.hp.n_ctx_train:
            log.warning("--ctx %d is beyond the model's training context of %d tokens", n_ctx_total,
                        first.hp.n_ctx_train)
        runners = [_with_ctx(first, slot_ctx, ModelRunner)]
        if runners[0] is not first:
            _free_runner(first, with_model=False)
        runners += [ModelRunner(first.model, replace(runners[0].config), first.metadata)
                    for _ in range(n_parallel - 1)]
        tok = Tokenizer.from_gguf(first.metadata)
        template = ChatTemplate.for_model(first.metadata, tok)
        info = _model_info(path, runners[0], tok, template, name, device)
        return cls(runners, tok, template, info)

    # --- Engine: facts and state --------------------------------------------------------------------
    @property
    def info(self) -> ModelInfo:
        return self._info

    @property
    def n_slots(self) -> int:
        return len(self._seqs)

    def health(self) -> Health:
        return self._health

    def mark_degraded(self, message: str) -> None:
        """Something (a lost worker, a failed step) makes the engine serve in a degraded way."""
        self._health = Health(HealthState.DEGRADED, message)

    def mark_ok(self) -> None:
        self._health = Health(HealthState.OK)

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
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, guarded)
        except (EngineRequestError, asyncio.CancelledError):
            raise
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

    def start(self) -> None:
        seq, runner, prompt = self.seq, self.seq.runner, list(self.req.prompt)
        self.t0 = _now()
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


def _with_ctx(runner: Any, n_ctx: int, runner_cls: Any) -> Any:
    """The runner with a KV cache of n_ctx cells (a new runner over the same weights if it differs)."""
    if runner.config.n_ctx == n_ctx:
        return runner
    return runner_cls(runner.model, replace(runner.config, n_ctx=n_ctx), runner.metadata)


def _free_runner(runner: Any, *, with_model: bool) -> None:
    """ModelRunner.close() also frees the weights, which the slots share; free only what is its own."""
    if with_model:
        runner.close()
        return
    for prep in runner._graphs.values():  # gap: ModelRunner has no close(free_model=False)
        prep.compute.free()
    runner._graphs.clear()
    runner.kv.free()


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

