"""Server-sent events as llama-server writes them: `data: <json>\\n\\n` per event, `data: [DONE]` to end an
OpenAI stream, `data: {"error": ...}` for an error after the stream started."""
from __future__ import annotations

import json
from typing import Any

from aiohttp import web

__all__ = ["SSEStream", "encode_event", "dumps"]


def dumps(obj: Any) -> str:
    """Compact JSON, non-ASCII kept as UTF-8 (as llama-server's safe_json_to_str)."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def encode_event(obj: Any) -> bytes:
    return f"data: {dumps(obj)}\n\n".encode("utf-8")


class SSEStream:
    """An event-stream response; `open()` sends the headers (only once the first event is ready, so that an
    error before it can still be answered with a plain JSON status)."""

    def __init__(self, request: web.Request) -> None:
        self.request = request
        self.response = web.StreamResponse(status=200, headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",  # proxies must not buffer tokens
        })
        self.opened = False

    async def open(self) -> None:
        if not self.opened:
            self.response.enable_chunked_encoding()
            await self.response.prepare(self.request)
            self.opened = True

    async def send(self, obj: Any) -> None:
        await self.open()
        await self.response.write(encode_event(obj))

    async def send_raw(self, text: str) -> None:
        await self.open()
        await self.response.write(text.encode("utf-8"))

    async def done(self) -> None:
        await self.send_raw("data: [DONE]\n\n")

    async def close(self) -> web.StreamResponse:
        await self.open()
        await self.response.write_eof()
        return self.response
