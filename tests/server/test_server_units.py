"""Pieces without a server: the slot queue's ordering and cancellation, request parsing, timings."""
from __future__ import annotations

import asyncio
import math

import pytest

from hybridllm.server.engine_api import GenStats
from hybridllm.server.params import ApiError, parse_gen_options, parse_logit_bias, parse_n_predict, tokens_or_text
from hybridllm.server.slots import SlotManager


def test_slots_fifo_and_cancellation() -> None:
    async def main() -> list[str]:
        m = SlotManager(1, 64)
        first = await m.acquire()
        order: list[str] = []

        async def waiter(tag: str) -> None:
            slot = await m.acquire()
            order.append(tag)
            await asyncio.sleep(0)
            m.release(slot)
        tasks = {t: asyncio.create_task(waiter(t)) for t in "abcd"}
        await asyncio.sleep(0)
        assert m.n_waiting == 4 and m.n_busy == 1
        tasks["b"].cancel()  # leaves the queue
        await asyncio.sleep(0)
        assert m.n_waiting == 3
        m.release(first)
        tasks["c"].cancel()  # cancelled while a's slot is being handed on
        await asyncio.gather(*tasks.values(), return_exceptions=True)
        assert m.n_busy == 0 and m.n_waiting == 0
        return order
    assert asyncio.run(main()) == ["a", "d"]


def test_slot_granted_then_cancelled_is_passed_on() -> None:
    async def main() -> None:
        m = SlotManager(1, 64)
        first = await m.acquire()
        t1 = asyncio.create_task(m.acquire())
        t2 = asyncio.create_task(m.acquire())
        await asyncio.sleep(0)
        m.release(first)  # granted to t1, which has not run yet
        t1.cancel()
        slot = await t2
        assert slot.id == 0 and m.n_busy == 1
    asyncio.run(main())


def test_idle_slot_choice_prefers_cached_prefix() -> None:
    async def main() -> int:
        m = SlotManager(3, 64)
        return (await m.acquire(score=lambda i: {0: 1, 1: 7, 2: 3}[i])).id
    assert asyncio.run(main()) == 1


def test_parse_options() -> None:
    o = parse_gen_options({"max_tokens": 5, "stop": "x", "temperature": 0, "seed": -1}, n_predict_default=-1)
    assert o.n_predict == 5 and o.stop == ["x"] and o.sampling.temperature == 0.0 and o.sampling.seed == -1
    assert parse_n_predict({"n_predict": 3, "max_tokens": 9}, -1) == 3
    assert parse_n_predict({}, 17) == 17
    assert parse_logit_bias([[5, False], [6, -1.5]]) == {5: -math.inf, 6: -1.5}
    assert parse_logit_bias({"7": 2}) == {7: 2.0}
    assert tokens_or_text(["ab", 5, "c"], "prompt") == ["ab", 5, "c"]
    assert tokens_or_text([[1, 2]], "prompt") == [1, 2]
    for bad in ({"temperature": float("inf")}, {"top_k": True}, {"stream_options": []}, {"best_of": 2}):
        with pytest.raises(ApiError):
            parse_gen_options(bad, -1)


def test_timings_follow_llama_server_formulas() -> None:
    st = GenStats(n_prompt=10, n_cached=4, n_predicted=5, t_prompt_ms=30.0, t_gen_ms=80.0)
    t = st.timings()
    assert t["prompt_n"] == 6 and t["cache_n"] == 4
    assert t["prompt_per_token_ms"] == 5.0 and t["prompt_per_second"] == 200.0
    # the first token is free (it comes from the prompt's logits): 4 decode steps in 80 ms
    assert t["predicted_per_token_ms"] == 20.0 and t["predicted_per_second"] == 50.0
