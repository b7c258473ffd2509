"""Adapter from hybridllm's in-process engine (ModelRunner + Tokenizer + ChatTemplate + Sampler) to the
server's `Engine` interface, with continuous batching (llama-server's update_slots).

One ModelRunner holds the model and one KV cache of --ctx cells shared by the slots: slot i is sequence
i, which takes cells as its tokens are written (a slot may use the whole context while the others are
idle; idle slots' cached prompts are dropped, least recently used first, when cells run out). All model
work runs on one engine thread in rounds: each round gathers every running request's next token and
chunks of pending prompts (decodes first, at most n_ubatch tokens), runs them as ONE ubatch, and samples
each request's next token (`batching.Rounds`). The event loop hands each request its Step and never
blocks; a request takes part in a round only while its consumer waits for its next Step, and one whose
client went away is dropped between rounds.

Layers may live on RPC workers (`--rpc`). A worker that fails makes the step fail at once (503) and the
engine degraded; the next request first recovers (the weights go back, from the worker's --cache when it
has one, and every slot starts over), or answers 503 again while the worker is still down.
"""
from __future__ import annotations

import asyncio
import logging
import math
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import gguf

from .batching import Job, Rounds, Seq, common_prefix
from .engine_api import (ContextExceeded, EngineLoadError, EngineRequestError, EngineUnavailable, GenerateRequest,
                         GenStats, Health, HealthState, ModelInfo, SamplingParams, Step)

log = logging.getLogger(__name__)
MAX_GRAPHS = 12   # prepared graphs kept: batching makes more ubatch shapes (a graph per token count)

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


class LocalEngine:
    """`Engine` over one in-process ModelRunner shared by the slots; build it with `LocalEngine.load()`."""

    def __init__(self, runner: Any, n_slots: int, tokenizer: Any, template: Any, info: ModelInfo) -> None:
        self._runner = runner
        self._seqs = [Seq(i) for i in range(n_slots)]
        self._rounds = Rounds(runner, self._seqs)   # used on the engine thread only
        self._tok = tokenizer
        self._template = template
        self._info = info
        self._health = Health(HealthState.OK)
        self._lost_reason = ""               # the failure that made the engine degraded
        self._probe: asyncio.Future[None] | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="hybridllm-engine")
        self._jobs: list[Job] = []          # submitted and not finished, in arrival order (event loop)
        self._driver: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()         # a consumer asks for a Step, a job comes or goes
        self._closed = False

    # --- construction ------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path, *, n_ctx: int = 4096, n_parallel: int = 1, device: str = "cpu",
             name: str | None = None, rpc: Sequence[str] = (), tensor_split: Sequence[float] | None = None,
             rpc_token: str | None = None, rpc_timeout: float = 300.0) -> LocalEngine:
        """Load the model once, its layers placed over `rpc` workers' devices and then `device`, with one
        KV cache of n_ctx cells shared by n_parallel slots (llama-server's unified cache: a slot may use
        all of it). Raises EngineLoadError (one line) for what the user can fix."""
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
        from ..engine.runner import load
        from ..engine.tokenizer import Tokenizer
        n_ctx_train = _train_ctx(path)
        n_ctx_total = n_ctx if n_ctx > 0 else n_ctx_train  # --ctx 0: the training context
        if n_ctx_total < 8:
            raise EngineLoadError(f"--ctx {n_ctx_total} is too small")
        if n_ctx_total > n_ctx_train:
            log.warning("--ctx %d is beyond the model's training context of %d tokens", n_ctx_total, n_ctx_train)
        mine = _connect(rpc, rpc_token, rpc_timeout) if rpc_token else []  # load() takes no token
        try:
            runner = load(path, device=device, n_ctx=n_ctx_total, rpc=mine or rpc, tensor_split=tensor_split,
                          n_seq_max=n_parallel, rpc_timeout=rpc_timeout,
                          progress=sys.stderr.isatty() or bool(rpc), log=log.info)
        except BaseException:
            for b in mine:
                b.close()
            raise
        runner.model.owned.extend(mine)  # closed with the model
        runner.config.max_graphs = MAX_GRAPHS
        try:
            tok = Tokenizer.from_gguf(runner.metadata)
            template = ChatTemplate.for_model(runner.metadata, tok)
        except BaseException:
            runner.close()
            raise
        devices = "+".join(b.name for b in runner.model.placement.devices)
        return cls(runner, n_parallel, tok, template, _model_info(path, runner, tok, template, name, devices))

    # --- Engine: facts and state --------------------------------------------------------------------
    @property
    def info(self) -> ModelInfo:
        return self._info

    @property
    def n_slots(self) -> int:
        return len(self._seqs)

    @property
    def stats(self) -> Any:
        """The runner's counters (ubatches, ubatches_multi_seq, ...)."""
        return self._runner.stats

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
        """Engine thread."""
        state, why = self._runner.health(probe=True)
        if state != "ok":
            self.mark_degraded(why)

    def mark_degraded(self, message: str) -> None:
        """Something (a lost worker, a failed step) makes the engine serve in a degraded way."""
        if self._health.state is not HealthState.DEGRADED:
            self._lost_reason = message
        self._health = Health(HealthState.DEGRADED, message)

    def mark_ok(self) -> None:
        self._health = Health(HealthState.OK)
        self._lost_reason = ""

    def _recover(self) -> None:
        """Engine thread, before a job: if degraded, reconnect and re-upload what a lost worker held (its
        weights and KV memory) and start every slot's sequence over."""
        from ..rpc.transport import RpcError
        if self._health.state is not HealthState.DEGRADED:
            return
        reason = self._lost_reason or self._health.message
        where = reason.split(" failed: ", 1)[0] if " failed: " in reason else "a device"
        log.info("recovering %s", where)
        try:
            self._runner.recover()
        except Exception as exc:  # stay degraded: each request tries again
            if not isinstance(exc, RpcError):   # e.g. the worker came back with less memory
                log.exception("recovering %s failed", where)
            what = "still down" if isinstance(exc, RpcError) else "recovery failed"
            message = f"{what}: {_one_line(exc)} ({where} failed earlier; each request retries)"
            self._health = Health(HealthState.DEGRADED, message)
            raise EngineUnavailable(message) from None
        for seq in self._seqs:
            seq.tokens.clear()
            seq.dirty = False
            seq.epoch += 1   # a job still running on that slot must not continue on a reset cache
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
        seq = self._seqs[slot]
        return 0 if seq.dirty else common_prefix(seq.tokens, prompt)

    async def generate(self, slot: int, request: GenerateRequest, stats: GenStats) -> AsyncIterator[Step]:
        """The slot's job joins the batch loop, which works on it whenever its consumer asks for the next
        Step (a slow client is not run ahead of, and `stats` change only while it waits). Leaving the
        iterator early (client gone) drops the job before the next ubatch."""
        if self._closed:
            raise RuntimeError("engine is closed")
        if not request.prompt:
            raise EngineRequestError("the prompt is empty")
        self._check_ids(request.prompt)
        if len(request.prompt) >= self._runner.n_ctx:
            raise ContextExceeded(len(request.prompt), self._runner.n_ctx)
        job = Job(self._seqs[slot], request, stats, self._tok, self._sampler(request))
        await asyncio.get_running_loop().run_in_executor(self._executor, self._recover)
        self._jobs.append(job)
        if self._driver is None or self._driver.done():
            self._wake = asyncio.Event()     # of this event loop
            self._driver = asyncio.ensure_future(self._drive())
        try:
            while True:
                job.wanted = True
                self._wake.set()
                item = await job.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            job.cancelled = True
            self._wake.set()

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

    # --- the batch loop ------------------------------------------------------------------------------
    async def _drive(self) -> None:
        """Event loop side: while jobs are active, run a round on the engine thread with those whose
        consumer waits for a Step, and hand out what each got; sleep while no round can do anything."""
        loop = asyncio.get_running_loop()
        while True:
            self._jobs = [j for j in self._jobs if not (j.cancelled or j.finished)]
            if not self._jobs:
                return
            if self._closed:
                for job in self._jobs:
                    job.deliver(RuntimeError("engine is closed"))
                return
            await asyncio.sleep(0)   # consumers just handed a Step ask for the next one: batch them too
            self._wake.clear()
            jobs = [j for j in self._jobs if j.wanted and not j.cancelled]
            busy = {j.seq.id for j in self._jobs if not j.cancelled}
            if not jobs:
                await self._wake.wait()
                continue
            try:
                results, moved = await loop.run_in_executor(self._executor, self._rounds, jobs, busy,
                                                            len(jobs) < len(self._jobs))
            except Exception as exc:  # the executor is gone (closing), or a bug in the loop itself
                log.exception("the batch loop failed")
                results, moved = [(j, exc) for j in jobs], True
            for job, item in results:
                job.deliver(self._translate(item) if isinstance(item, BaseException) else item)
            if not moved:   # e.g. a prompt waits for cells that running requests hold: wait for a change
                await self._wake.wait()

    def _translate(self, exc: BaseException) -> BaseException:
        """What a failed ubatch means to each of its requests (the old per-step rules)."""
        from ..engine.runner import DeviceLost
        from ..rpc.transport import RpcError
        if isinstance(exc, (EngineRequestError, EngineUnavailable)):
            return exc
        if isinstance(exc, (DeviceLost, RpcError)):  # the message names the device and its layers
            self.mark_degraded(_one_line(exc))
            return EngineUnavailable(_one_line(exc))
        self.mark_degraded(f"a generation failed: {type(exc).__name__}: {exc}")
        return exc

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await asyncio.to_thread(self._executor.shutdown, True)
        self._runner.close()


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

