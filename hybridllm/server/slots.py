"""Slots: at most N generations at once (`--parallel N`); further requests wait in a FIFO queue.

A slot is one active generation, a sequence in the engine's shared KV cache (the engine batches the
slots' tokens into common ubatches). An idle request takes the idle slot
whose cache shares the longest prefix with its prompt (so a follow-up chat turn reuses its slot's cache);
a queued request gets the next slot that is released, in arrival order. A request cancelled while
waiting leaves the queue; one cancelled just as it was granted a slot hands the slot on.
"""
from __future__ import annotations

import asyncio
import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from .engine_api import GenerateRequest, GenStats

__all__ = ["Slot", "SlotManager"]


@dataclass
class Slot:
    id: int
    n_ctx: int
    busy: bool = False
    id_task: int = -1
    request: GenerateRequest | None = None     # the current (or last) request, for /slots
    stats: GenStats = field(default_factory=GenStats)
    prompt: str = ""
    generated: str = ""
    extra_params: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """llama-server's /slots entry (server_slot::to_json)."""
        out: dict[str, Any] = {"id": self.id, "n_ctx": self.n_ctx, "speculative": False,
                               "is_processing": self.busy}
        req = self.request
        if req is None:
            return out
        s = req.sampling
        n_remain = -1 if req.max_tokens < 0 else max(req.max_tokens - self.stats.n_predicted, 0)
        out.update({
            "id_task": self.id_task,
            "n_prompt_tokens": self.stats.n_prompt,
            "n_prompt_tokens_processed": self.stats.n_prompt_processed,
            "n_prompt_tokens_cache": self.stats.n_cached,
            "n_decode": self.stats.n_decode,           # ubatches this request took part in,
            "n_decode_batched": self.stats.n_batched,  # of which shared with other slots' tokens
            "params": {"temperature": s.temperature, "top_k": s.top_k, "top_p": s.top_p, "min_p": s.min_p,
                       "repeat_penalty": s.repeat_penalty, "repeat_last_n": s.repeat_last_n,
                       "frequency_penalty": s.frequency_penalty, "presence_penalty": s.presence_penalty,
                       "seed": s.seed, "n_predict": req.max_tokens, "max_tokens": req.max_tokens,
                       "stop": list(req.stop), "ignore_eos": req.ignore_eos, **self.extra_params},
            "next_token": [{"has_next_token": self.busy, "has_new_line": "\n" in self.generated,
                            "n_remain": n_remain, "n_decoded": self.stats.n_predicted}],
            "prompt": self.prompt,
            "generated": self.generated,
        })
        return out


class SlotManager:
    """Hands out slots; `acquire()` waits (FIFO) when all are busy. Single event loop only."""

    def __init__(self, n_slots: int, n_ctx: int) -> None:
        if n_slots < 1:
            raise ValueError("at least one slot is needed")
        self.slots = [Slot(i, n_ctx) for i in range(n_slots)]
        self._waiters: deque[asyncio.Future[Slot]] = deque()
        self._task_ids = itertools.count()

    @property
    def n_busy(self) -> int:
        return sum(s.busy for s in self.slots)

    @property
    def n_idle(self) -> int:
        return len(self.slots) - self.n_busy

    @property
    def n_waiting(self) -> int:
        return sum(not w.done() for w in self._waiters)

    async def acquire(self, score: Callable[[int], int] | None = None) -> Slot:
        """An idle slot (the best by `score(slot_id)`), or the next released one in arrival order."""
        if not self._waiters:
            idle = [s for s in self.slots if not s.busy]
            if idle:
                best = max(idle, key=lambda s: (score(s.id) if score else 0, -s.id))
                return self._take(best)
        fut: asyncio.Future[Slot] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            return await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release(fut.result())  # granted just as we were cancelled: pass it on
            else:
                try:
                    self._waiters.remove(fut)
                except ValueError:
                    pass
            raise

    def _take(self, slot: Slot) -> Slot:
        slot.busy = True
        slot.id_task = next(self._task_ids)
        slot.stats = GenStats()
        slot.generated = ""
        return slot

    def release(self, slot: Slot) -> None:
        slot.busy = False
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(self._take(slot))
                return

    def to_json(self) -> list[dict[str, Any]]:
        return [s.to_json() for s in self.slots]
