"""The engine thread's half of continuous batching: slot sequences, requests as jobs, and one round.

A round (`Rounds.__call__`) starts new jobs (reusing each slot's cached prompt prefix), packs every running
job's next token and chunks of pending prompts into ONE ubatch of at most n_ubatch tokens (decodes first,
like llama-server's update_slots), runs it with `ModelRunner.decode_batch`, and samples each job whose
logits came back. Cells are taken as used from the runner's one KV cache: idle slots' cached prompts are
dropped (least recently used first) when cells run out; when running requests hold every cell, the
newest one ends (finish_reason length, truncated) and the others go on. `LocalEngine` drives the rounds
from the event loop.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .engine_api import ContextExceeded, EngineRequestError, EngineUnavailable, GenerateRequest, GenStats, Step

log = logging.getLogger("hybridllm.server.local_engine")

__all__ = ["Job", "Rounds", "Seq", "common_prefix"]


@dataclass
class Seq:
    """One slot's sequence in the shared KV cache (sequence id = slot id) and the tokens it holds there."""
    id: int
    tokens: list[int] = field(default_factory=list)
    dirty: bool = False                  # a ubatch failed half-way: clear it before the next use
    epoch: int = 0                       # bumped when recovery resets the cache under a running job
    last_used: int = 0                   # engine round of its last ubatch, to evict idle caches LRU first

    def clear(self, runner: Any) -> None:
        """Engine thread: free its cells for the other slots and forget what it held."""
        runner.seq_clear(self.id)
        self.tokens.clear()
        self.dirty = False


class Rounds:
    """Engine thread: the rounds of one runner whose sequence i is slot i (`seqs[i]`)."""

    def __init__(self, runner: Any, seqs: list[Seq]) -> None:
        self.runner, self.seqs = runner, seqs
        self.n_round = 0

    def __call__(self, jobs: list[Job], busy: set[int], others: bool
                  ) -> tuple[list[tuple[Job, Step | BaseException]], bool]:
        """Engine thread: start new jobs, then one ubatch holding every running job's next token (decodes
        first, so generation does not stall behind a long prompt) and prompt chunks in arrival order, up
        to n_ubatch tokens; then sample each job whose logits came back. `busy`: the slots of every active
        job (their cells stay); `others`: active jobs not in this round exist. Returns what each job gets,
        and whether anything happened."""
        runner, out = self.runner, []
        self.n_round += 1
        live: list[Job] = []
        for job in jobs:
            if job.cancelled:
                continue
            try:
                if not job.started:
                    job.start(runner)
                job.check_epoch()
            except (EngineRequestError, EngineUnavailable) as exc:
                out.append((job, exc))
                continue
            if not job.pending and job.last is None:   # max_tokens 0: the prompt was all it asked for
                out.append((job, Step(None, "", "length", "limit")))
                continue
            live.append(job)
        plan = self._plan(live, out, busy, others)
        if plan:
            self._run_plan(plan, out)
        return out, bool(plan or out)

    def _plan(self, live: list[Job], out: list[tuple[Job, Step | BaseException]], busy: set[int],
              others: bool) -> list[tuple[Job, list[int]]]:
        """Which tokens of which jobs go into this round's ubatch, within n_ubatch tokens and the free cells.

        Running generations come first, one token each; when they hold every cell, the newest ends
        (finish_reason length, truncated) and its cells go to the others. A prompt starts only once all
        of it fits the cells no started prompt still needs (in arrival order while anything else moves,
        so a long prompt is not overtaken for ever), then goes in chunks. Idle slots' cached prompts are
        dropped, least recently used first, when more cells are needed."""
        runner = self.runner
        budget = runner.config.n_ubatch
        decoders = [j for j in live if j.last is not None]
        prompts = [j for j in live if j.pending]
        prompts.sort(key=lambda j: not j.admitted)   # started prompts first, each group in arrival order
        committed = sum(len(j.pending) for j in prompts if j.admitted)
        waiting = [j for j in prompts if not j.admitted]
        wanted = len(decoders) + committed + (len(waiting[0].pending) if waiting else 0)
        free = self._make_room(wanted, busy)
        decoders = decoders[:budget]
        while free < len(decoders):   # running requests hold every cell: the newest ends, the others go on
            job = decoders.pop()
            out.append((job, job.out_of_cells()))
            job.seq.clear(runner)
            free = runner.n_free_cells()
        plan: list[tuple[Job, list[int]]] = [(job, [job.last]) for job in decoders]  # type: ignore[misc]
        budget, free = budget - len(plan), free - len(plan)
        moving = others or bool(decoders) or len(waiting) < len(prompts)   # FIFO while others go on
        for job in prompts:
            if not job.admitted:
                if len(job.pending) > free - committed:
                    if moving:
                        break
                    continue
                job.admitted = True
                committed += len(job.pending)
            n = min(len(job.pending), budget, free)
            if n > 0:
                plan.append((job, job.pending[:n]))
                budget, free, committed = budget - n, free - n, committed - n
        stuck = [j for j in prompts if j.admitted] or prompts
        if not plan and not out and stuck and not others:   # prompts hold all cells: fail the newest
            job = stuck[-1]
            out.append((job, ContextExceeded(len(job.req.prompt), len(job.seq.tokens) + runner.n_free_cells())))
        return plan

    def _make_room(self, wanted: int, busy: set[int]) -> int:
        """Free cells, after clearing idle slots' sequences (LRU first) until `wanted` fit or none is left."""
        runner = self.runner
        while runner.n_free_cells() < wanted:
            idle = [s for s in self.seqs if s.id not in busy and (s.dirty or runner.seq_n_past(s.id) > 0)]
            if not idle:
                break
            victim = min(idle, key=lambda s: s.last_used)
            log.info("slot %d: dropping its cached %d tokens to make room in the KV cache", victim.id,
                     runner.seq_n_past(victim.id))
            victim.clear(runner)
        return runner.n_free_cells()

    def _run_plan(self, plan: list[tuple[Job, list[int]]], out: list[tuple[Job, Step | BaseException]]) -> None:
        runner = self.runner
        seqs = [job.seq.id for job, _ in plan]
        wants = [job.last is not None or len(toks) == len(job.pending) for job, toks in plan]
        try:
            rows = runner.decode_batch(seqs, [toks for _, toks in plan], wants)
        except Exception as exc:
            for job, _ in plan:
                job.seq.dirty = True   # the cache may hold half a ubatch: clear it before the next request
                out.append((job, exc))
            return
        shared = len(plan) > 1
        for (job, toks), row in zip(plan, rows):
            job.seq.tokens.extend(toks)
            job.seq.last_used = self.n_round
            job.stats.n_decode += 1
            job.stats.n_batched += shared
            step = job.advance(toks, row, runner)
            if step is not None:
                out.append((job, step))


class Job:
    """One request on one slot, advanced by the batch loop: start (prefix reuse), prompt chunks, then
    one sampled token per round."""

    def __init__(self, seq: Seq, req: GenerateRequest, stats: GenStats, tok: Any, sampler: Any) -> None:
        from ..engine.sampler import StopChecker
        from ..engine.tokenizer import StreamDecoder
        self.seq, self.req, self.stats, self.tok, self.sampler = seq, req, stats, tok, sampler
        self.decoder = StreamDecoder(tok)
        self.stop = StopChecker(() if req.ignore_eos else tok.eog_ids, list(req.stop))
        self.queue: asyncio.Queue[Step | BaseException] = asyncio.Queue()
        self.started = self.cancelled = self.finished = False
        self.wanted = False              # its consumer waits for the next Step
        self.admitted = False            # its prompt has cells to go into
        self.pending: list[int] = []
        self.last: int | None = None     # sampled, not yet in the cache
        self.t0 = self.t_prompt_end = 0.0
        self.epoch = seq.epoch

    def deliver(self, item: Step | BaseException) -> None:
        """Event loop."""
        if isinstance(item, BaseException) or item.finish_reason is not None:
            self.finished = True
        self.wanted = False
        self.queue.put_nowait(item)

    def check_epoch(self) -> None:
        if self.seq.epoch != self.epoch:
            raise EngineUnavailable("the model was reloaded after a worker failed; retry the request")

    def start(self, runner: Any) -> None:
        """Engine thread: keep the slot's cached prefix of the prompt (cache_prompt), drop the rest."""
        seq, prompt = self.seq, list(self.req.prompt)
        self.started, self.t0, self.epoch = True, _now(), seq.epoch
        if seq.dirty or len(seq.tokens) != runner.seq_n_past(seq.id):
            seq.clear(runner)
        n_keep = common_prefix(seq.tokens, prompt) if self.req.cache_prompt else 0
        n_keep = min(n_keep, len(prompt) - 1)  # re-evaluate at least one token: its logits are needed
        if n_keep < runner.seq_n_past(seq.id) and not runner.seq_rm(seq.id, n_keep):
            n_keep = 0  # a sliding-window cache cannot go back: seq_rm() cleared the sequence
        del seq.tokens[n_keep:]
        self.pending = prompt[n_keep:]
        self.stats.n_prompt, self.stats.n_cached = len(prompt), n_keep
        self.sampler.accept_many(prompt)  # llama-server fills the penalty window with the prompt

    def advance(self, toks: list[int], logits: np.ndarray | None, runner: Any) -> Step | None:
        """Engine thread, after the ubatch: the Step this job gets, if any."""
        if self.last is not None:
            self.last = None
        else:
            self.pending = self.pending[len(toks):]
            if self.pending:
                return None
            self.t_prompt_end = _now()
            self.stats.t_prompt_ms = (self.t_prompt_end - self.t0) * 1e3
            if self.req.max_tokens == 0:
                return Step(None, "", "length", "limit")
        assert logits is not None
        return self._sample(logits, runner)

    def _sample(self, logits: np.ndarray, runner: Any) -> Step:
        token = self.sampler.sample(logits)
        st = self.stats
        st.n_predicted += 1
        st.t_gen_ms = (_now() - self.t_prompt_end) * 1e3
        step = self._finish_or_continue(token, runner)
        self.last = token if step.finish_reason is None else None
        return step

    def out_of_cells(self) -> Step:
        """The last Step of a generation whose next token finds no free cell."""
        self.last = None
        return Step(None, self._drain(), "length", "limit", truncated=True)

    def _finish_or_continue(self, token: int, runner: Any) -> Step:
        piece = self.decoder.feed([token])
        if self.stop.is_eog(token):
            return Step(token, self.stop.flush() + piece + self.decoder.flush(), "stop", "eos")
        text, hit = self.stop.feed_text(piece)
        if hit:
            return Step(token, text, "stop", "word", stopping_word=self.stop.stopped_by or "")
        if 0 < self.req.max_tokens <= self.stats.n_predicted:
            return Step(token, text + self._drain(), "length", "limit")
        if runner.seq_n_past(self.seq.id) + 1 >= runner.n_ctx:  # no room to decode this token
            return Step(token, text + self._drain(), "length", "limit", truncated=True)
        return Step(token, text)

    def _drain(self) -> str:
        """Held-back text at a stop that is not a stop string: what's left of the decoder and checker."""
        tail, _ = self.stop.feed_text(self.decoder.flush())
        return tail + self.stop.flush()


def _now() -> float:
    import time
    return time.perf_counter()


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
