"""Slots and the queue: with --parallel 1 requests run one at a time in arrival order; with --parallel 2 two
generations interleave; a client that disconnects (streaming, waiting, or queued) stops its generation and
frees its place."""
from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp

from srv_helpers import Serve, get, metrics, post, stream_events, wait_until

LONG = {"temperature": 0.0, "ignore_eos": True, "cache_prompt": False}


async def _stream_events(session: aiohttp.ClientSession, url: str, body: dict[str, Any],
                         log: list[tuple[str, float]], tag: str) -> list[dict[str, Any]]:
    """Read a native /completion stream, logging (tag, time) per event."""
    return await stream_events(session, url, body, lambda _: log.append((tag, time.monotonic())))


async def _plain(session: aiohttp.ClientSession, url: str, body: dict[str, Any], done: list[str], tag: str
                 ) -> dict[str, Any]:
    async with session.post(url + "/completion", json=body) as resp:
        data = await resp.json()
        assert resp.status == 200, data
    done.append(tag)
    return data


class _SlotHolder:
    """A streamed generation of 900 tokens that occupies a slot until `release()` drops its connection (the
    synthetic model is fast enough that a fixed-length request could end before the test looks)."""

    def __init__(self, session: aiohttp.ClientSession, url: str) -> None:
        self.session, self.url = session, url
        self.events = 0

    async def start(self) -> None:
        self.resp = await self.session.post(self.url + "/completion", json={
            **LONG, "prompt": "hold", "n_predict": 900, "stream": True})
        assert self.resp.status == 200
        await self.resp.content.readuntil(b"\n\n")  # generating now

    def release(self) -> None:
        self.resp.close()


def test_parallel_1_queues_in_fifo_order(server: Serve) -> None:
    async def main() -> tuple[list[str], dict[str, float], dict[str, float]]:
        done: list[str] = []
        async with aiohttp.ClientSession() as s:
            holder = _SlotHolder(s, server.url)
            await holder.start()
            tasks = []
            for tag in "BCD":
                tasks.append(asyncio.create_task(_plain(s, server.url, {**LONG, "prompt": tag, "n_predict": 3},
                                                        done, tag)))
                await asyncio.sleep(0.1)  # a definite arrival order
            waiting = await asyncio.to_thread(metrics, server)
            assert not done, "a request ran while the only slot was busy"
            holder.release()
            await asyncio.gather(*tasks)
            return done, waiting, await asyncio.to_thread(metrics, server)
    done, waiting, after = asyncio.run(main())
    assert waiting["llamacpp:requests_processing"] == 1 and waiting["llamacpp:requests_deferred"] == 3
    assert done == ["B", "C", "D"]
    assert after["llamacpp:requests_deferred"] == 0 and after["llamacpp:requests_processing"] == 0


def test_parallel_2_interleaves(server2: Serve) -> None:
    async def main() -> list[tuple[str, float]]:
        log: list[tuple[str, float]] = []
        async with aiohttp.ClientSession() as s:
            body = {**LONG, "n_predict": 300}
            await asyncio.gather(_stream_events(s, server2.url, {**body, "prompt": "x y"}, log, "A"),
                                 _stream_events(s, server2.url, {**body, "prompt": "z w"}, log, "B"))
        return log
    log = asyncio.run(main())
    order = [tag for tag, _ in log]
    # both were generating at once: each produced events before the other finished
    assert order.index("B") < len(order) - 1 - order[::-1].index("A")
    assert order.index("A") < len(order) - 1 - order[::-1].index("B")
    assert {s["id"] for s in get(server2, "/slots") if "id_task" in s} == {0, 1}


def _slot_idle(srv: Serve) -> bool:
    return not any(s["is_processing"] for s in get(srv, "/slots"))


def test_stream_disconnect_stops_generation(server: Serve) -> None:
    before = metrics(server)["llamacpp:tokens_predicted_total"]

    async def main() -> int:
        n = 0
        async with aiohttp.ClientSession() as s:
            async with s.post(server.url + "/v1/chat/completions", json={
                    **LONG, "messages": [{"role": "user", "content": "go on forever"}], "max_tokens": 900,
                    "stream": True}) as resp:
                async for _ in resp.content.iter_any():
                    n += 1
                    if n >= 3:
                        break
                resp.close()  # drop the connection mid-stream
        return n
    assert asyncio.run(main()) == 3
    assert wait_until(lambda: _slot_idle(server), timeout=10), get(server, "/slots")
    produced = metrics(server)["llamacpp:tokens_predicted_total"] - before
    assert 1 <= produced < 900
    r = post(server, "/completion", {**LONG, "prompt": "next", "n_predict": 2})
    assert r["tokens_predicted"] == 2


def test_plain_disconnect_stops_generation(server: Serve) -> None:
    before = metrics(server)["llamacpp:tokens_predicted_total"]

    async def main() -> None:
        timeout = aiohttp.ClientTimeout(total=0.5)
        async with aiohttp.ClientSession(timeout=timeout) as s:
            try:
                await _plain(s, server.url, {**LONG, "prompt": "long", "n_predict": 1000}, [], "X")
            except asyncio.TimeoutError:
                return
        raise AssertionError("a 1000-token answer came back within 0.5 s; the test cannot see a disconnect")
    asyncio.run(main())
    assert wait_until(lambda: _slot_idle(server), timeout=10), get(server, "/slots")
    assert metrics(server)["llamacpp:tokens_predicted_total"] - before < 1000


def test_queued_request_disconnect_leaves_queue(server: Serve) -> None:
    async def main() -> dict[str, Any]:
        async with aiohttp.ClientSession() as s:
            holder = _SlotHolder(s, server.url)
            await holder.start()
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.3)) as s2:
                try:
                    await _plain(s2, server.url, {**LONG, "prompt": "b", "n_predict": 5}, [], "B")
                    raise AssertionError("B should have been queued behind the holder")
                except asyncio.TimeoutError:
                    pass
            await asyncio.sleep(0.1)
            m = await asyncio.to_thread(metrics, server)
            assert m["llamacpp:requests_deferred"] == 0, "the abandoned request is still queued"
            assert m["llamacpp:requests_processing"] == 1
            holder.release()
            return await _plain(s, server.url, {**LONG, "prompt": "c", "n_predict": 2}, [], "C")
    assert asyncio.run(main())["tokens_predicted"] == 2


def test_event_loop_stays_responsive(server: Serve) -> None:
    """Generation runs on the engine thread: /health answers at once while a slot is generating."""
    async def main() -> list[float]:
        async with aiohttp.ClientSession() as s:
            holder = _SlotHolder(s, server.url)
            await holder.start()
            latencies = []
            for _ in range(5):
                t0 = time.monotonic()
                async with s.get(server.url + "/health") as r:
                    assert r.status == 200
                latencies.append(time.monotonic() - t0)
            slots = await asyncio.to_thread(get, server, "/slots")
            assert slots[0]["is_processing"], "the generation ended before the measurements did"
            holder.release()
            return latencies
    assert max(asyncio.run(main())) < 0.5
