"""Running one generation for an HTTP request, streamed (SSE) or not; endpoints differ only in a Formatter."""
from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any, Protocol

from aiohttp import web

from .engine_api import ContextExceeded, EngineRequestError, EngineUnavailable, GenerateRequest, Step
from .params import ApiError
from .slots import Slot
from .sse import SSEStream, dumps
from .state import ServerState

log = logging.getLogger(__name__)

__all__ = ["Formatter", "complete", "json_response", "to_api_error"]


class Formatter(Protocol):
    done_marker: bool                    # end the stream with `data: [DONE]` (OpenAI endpoints)

    def chunks(self, step: Step, slot: Slot, first: bool) -> list[dict[str, Any]]:
        """Events for one step (the last step's events come before `final_chunks`)."""
        ...

    def final_chunks(self, last: Step, slot: Slot) -> list[dict[str, Any]]: ...

    def final(self, text: str, tokens: list[int], last: Step, slot: Slot) -> dict[str, Any]:
        """The whole non-streamed answer."""
        ...


def json_response(obj: Any, status: int = 200) -> web.Response:
    return web.json_response(obj, status=status, dumps=dumps)


def to_api_error(exc: BaseException) -> ApiError:
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, ContextExceeded):
        return ApiError(str(exc), 400, "exceed_context_size_error",
                        {"n_prompt_tokens": exc.n_prompt_tokens, "n_ctx": exc.n_ctx})
    if isinstance(exc, EngineRequestError):
        return ApiError(str(exc), 400)
    if isinstance(exc, EngineUnavailable):  # a worker failed: retry later (the server stays up)
        return ApiError(str(exc), 503, "unavailable_error")
    return ApiError(f"{type(exc).__name__}: {exc}", 500, "server_error")


async def complete(request: web.Request, state: ServerState, gen: GenerateRequest, fmt: Formatter, *,
                   stream: bool, prompt_text: str = "", extra_params: dict[str, Any] | None = None,
                   ) -> web.StreamResponse:
    async with state.generation(gen, prompt_text, extra_params) as (slot, steps):
        if stream:
            return await _stream(request, steps, slot, fmt)
        parts: list[str] = []
        tokens: list[int] = []
        last: Step | None = None
        async for step in steps:
            parts.append(step.text)
            if step.token is not None:
                tokens.append(step.token)
            last = step
        assert last is not None, "the engine ended a generation without a final step"
        return json_response(fmt.final("".join(parts), tokens, last, slot))


async def _stream(request: web.Request, steps: AsyncIterator[Step], slot: Slot, fmt: Formatter) -> web.StreamResponse:
    sse = SSEStream(request)
    # like llama-server, an error before the first token is a plain JSON error with its status
    step = await steps.__anext__()
    try:
        first = True
        while True:
            for event in fmt.chunks(step, slot, first):
                await sse.send(event)
            first = False
            if step.finish_reason is not None:
                break
            step = await steps.__anext__()
        for event in fmt.final_chunks(step, slot):
            await sse.send(event)
        if fmt.done_marker:
            await sse.done()
    except ConnectionResetError:
        log.info("slot %d: client went away, generation stopped", slot.id)
        return sse.response
    except Exception as exc:  # the headers are out: report it in the stream, as llama-server does
        err = to_api_error(exc)
        unexpected = err.status >= 500 and err.status != 503   # 503: a worker failed, not a bug here
        level = logging.ERROR if unexpected else logging.WARNING if err.status >= 500 else logging.INFO
        log.log(level, "slot %d: %s", slot.id, err.message, exc_info=unexpected)
        try:
            await sse.send(err.body())
        except ConnectionResetError:
            return sse.response
    try:
        return await sse.close()
    except ConnectionResetError:
        return sse.response
