"""What the running server knows: its configuration, the engine (None while loading), slots and metrics."""
from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from .engine_api import Engine, GenerateRequest, Health, HealthState, SamplingParams, Step
from .metrics import ServerMetrics
from .params import ApiError
from .slots import Slot, SlotManager

log = logging.getLogger(__name__)

__all__ = ["STATE", "ServerConfig", "ServerState"]


@dataclass(frozen=True)
class ServerConfig:
    model_path: str = ""
    n_parallel: int = 1
    n_ctx: int = 4096
    n_predict: int = -1                  # default generation limit (-1: until EOS or context full)
    api_key: str | None = None
    sampling: SamplingParams = SamplingParams()


class ServerState:
    """Shared by the handlers as `request.app[STATE]`."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.engine: Engine | None = None
        self.load_error: str | None = None
        self.slots: SlotManager | None = None
        self.metrics = ServerMetrics()
        self.registry = self.metrics.registry(lambda: self.slots.n_busy if self.slots else 0,
                                              lambda: self.slots.n_waiting if self.slots else 0,
                                              self._engine_decodes)
        self.t_start = time.time()

    def _engine_decodes(self) -> int | None:
        """Decode calls the engine made, when it counts them (one call may serve several slots)."""
        stats = getattr(self.engine, "stats", None)
        return getattr(stats, "ubatches", None)

    def set_engine(self, engine: Engine) -> None:
        self.slots = SlotManager(engine.n_slots, engine.info.n_ctx)
        self.engine = engine

    def set_load_error(self, message: str) -> None:
        self.load_error = message

    def health(self) -> Health:
        if self.load_error is not None:
            return Health(HealthState.ERROR, self.load_error)
        if self.engine is None:
            return Health(HealthState.LOADING, "Loading model")
        return self.engine.health()

    async def probe_health(self) -> Health:
        """health(), after the engine checked that its remote devices still answer (for /health)."""
        if self.load_error is None and self.engine is not None:
            return await self.engine.probe_health()
        return self.health()

    def ready_engine(self) -> Engine:
        """The engine, or the 503 llama-server answers before the model is ready."""
        if self.engine is None:
            raise ApiError(self.load_error or "Loading model", 503, "unavailable_error")
        return self.engine

    @asynccontextmanager
    async def generation(self, request: GenerateRequest, prompt_text: str = "",
                         extra_params: dict[str, Any] | None = None) -> AsyncIterator[tuple[Slot, AsyncIterator[Step]]]:
        """A slot (waiting in the FIFO queue if all are busy) and the engine's step iterator on it. Leaving
        the block -- normally, by error, or by cancellation when the client goes away -- stops the
        generation, records its metrics and frees the slot."""
        engine = self.ready_engine()
        assert self.slots is not None
        slot = await self.slots.acquire(lambda i: engine.cached_prefix(i, request.prompt))
        slot.request, slot.prompt, slot.extra_params = request, prompt_text, dict(extra_params or {})
        steps = engine.generate(slot.id, request, slot.stats)
        tracked = _tracked(slot, steps)
        failed = True
        try:
            yield slot, tracked
            failed = False
        finally:
            try:
                await tracked.aclose()  # type: ignore[attr-defined]
                await steps.aclose()  # type: ignore[attr-defined]
            finally:
                self.metrics.requests += 1
                self.metrics.requests_failed += failed
                self.metrics.record(slot.stats, self.slots.n_busy)
                self.slots.release(slot)


async def _tracked(slot: Slot, steps: AsyncIterator[Step]) -> AsyncIterator[Step]:
    async for step in steps:
        slot.generated += step.text
        yield step


STATE = web.AppKey("state", ServerState)
