"""Continuous batching in `hybridllm serve --parallel N`: the slots' tokens share ubatches and one KV cache.

* concurrent greedy generations give exactly the --parallel 1 answers, and the engine did batch them
  (/slots counts each request's ubatches shared with other slots);
* the cache is taken as used: one request of two slots may use more than half of --ctx, dropping an idle
  slot's cached prompt to make room;
* a full cache ends the generation that finds no free cell (finish_reason length, truncated) while the
  other goes on, and the server stays healthy;
* a slot's prompt-prefix reuse and rewind still work while another slot generates.
"""
from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Iterator

import aiohttp
import pytest

from srv_helpers import Serve, get, metrics, post, start_serve, stream_events

GREEDY = {"temperature": 0.0, "ignore_eos": True, "return_tokens": True}
PROMPTS = [[1, 17, 18, 19, 20], [1, 300, 301, 5, 6, 7, 8, 9, 10], [1, 44, 45]]


@pytest.fixture(scope="module")
def server3(synth_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    srv = start_serve(synth_model, ["--parallel", "3", "--ctx", "1024"], tmp_path_factory.mktemp("logs"))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def small2(synth_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    """Two slots sharing 256 cells."""
    srv = start_serve(synth_model, ["--parallel", "2", "--ctx", "256"], tmp_path_factory.mktemp("logs"))
    yield srv
    srv.stop()


def _concurrent(srv: Serve, bodies: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    async def main() -> list[list[dict[str, Any]]]:
        async with aiohttp.ClientSession() as s:
            return list(await asyncio.gather(*(stream_events(s, srv.url, b) for b in bodies)))
    return asyncio.run(main())


def _tokens(events: list[dict[str, Any]]) -> list[int]:
    return [t for e in events for t in e.get("tokens", [])]


def test_concurrent_streams_batch_and_match_parallel_1(server3: Serve, server: Serve) -> None:
    bodies = [{**GREEDY, "prompt": p, "n_predict": 40, "cache_prompt": False} for p in PROMPTS]
    before = metrics(server3)
    runs = _concurrent(server3, bodies)
    after = metrics(server3)
    for events in runs:
        assert events[-1]["stop"] is True and events[-1]["stop_type"] == "limit"
        assert len(_tokens(events)) == 40
    alone = [post(server, "/completion", b) for b in bodies]   # --parallel 1, one at a time
    assert [_tokens(r) for r in runs] == [a["tokens"] for a in alone]
    assert ["".join(e["content"] for e in r) for r in runs] == [a["content"] for a in alone]
    slots = [s for s in get(server3, "/slots") if "id_task" in s]
    assert len(slots) == 3
    for s in slots:   # each request shared ubatches with the others: the engine batched
        assert 0 < s["n_decode_batched"] <= s["n_decode"], s
    # /metrics counts decode calls, not each request's share of them: fewer than the requests' sum
    n_decode = after["llamacpp:n_decode_total"] - before["llamacpp:n_decode_total"]
    assert max(s["n_decode"] for s in slots) <= n_decode < sum(s["n_decode"] for s in slots)
    assert after["llamacpp:n_busy_slots_per_decode"] > 1


def test_one_request_uses_more_than_its_share(small2: Serve) -> None:
    """256 cells over 2 slots: a 150-token prompt leaves its cache on a slot; a second, different 150-token
    prompt generating 60 tokens (210 cells) needs those cells and gets them."""
    a = post(small2, "/completion", {**GREEDY, "prompt": [1] + [7] * 149, "n_predict": 10})
    assert a["stop_type"] == "limit" and not a["truncated"]
    b = post(small2, "/completion", {**GREEDY, "prompt": [1] + [9] * 149, "n_predict": 60})
    assert b["stop_type"] == "limit" and not b["truncated"] and b["tokens_predicted"] == 60
    assert b["tokens_evaluated"] + b["tokens_predicted"] == 210 > 256 // 2
    assert post(small2, "/completion", {**GREEDY, "prompt": [1] + [7] * 149, "n_predict": 2})["timings"][
        "cache_n"] <= 1   # the first prompt's cache was dropped to make room


def test_full_cache_ends_one_generation_others_go_on(small2: Serve) -> None:
    """Two unbounded generations fill the 256 shared cells: the one that finds no free cell ends with
    finish_reason length (truncated); the other takes the cells it leaves and goes on to the context
    limit. Both answers are complete and the server stays healthy."""
    bodies = [{**GREEDY, "prompt": p, "n_predict": 1000, "cache_prompt": False} for p in PROMPTS[:2]]
    runs = _concurrent(small2, bodies)
    finals = [r[-1] for r in runs]
    for f in finals:
        assert f["stop"] is True and f["stop_type"] == "limit" and f["truncated"] is True
    used = sorted(f["tokens_evaluated"] + f["tokens_predicted"] for f in finals)
    assert used[0] < 200 and used[1] == 256   # one was cut by the full cache, one ran to --ctx
    assert get(small2, "/health") == {"status": "ok"}
    assert post(small2, "/completion", {**GREEDY, "prompt": [1, 2, 3], "n_predict": 3})["tokens_predicted"] == 3


def test_prefix_reuse_and_rewind_beside_another_slot(server3: Serve) -> None:
    """While one slot generates, another slot reuses its cached prefix (cache_n) and rewinds it to a
    shorter common prefix; the answers equal the uncached ones."""
    base = [1] + list(range(100, 140))
    longer = base + [200, 201, 202]
    other = base[:20] + [300, 301]

    async def main() -> list[dict[str, Any]]:
        async with aiohttp.ClientSession() as s:
            holder = asyncio.create_task(stream_events(s, server3.url, {**GREEDY, "prompt": [1, 5], "n_predict": 900,
                                                                 "cache_prompt": False}))
            out = []
            for prompt in (base, longer, other):
                async with s.post(server3.url + "/completion", json={**GREEDY, "prompt": prompt,
                                                                    "n_predict": 6}) as resp:
                    out.append(await resp.json())
            assert not holder.done(), "the other slot finished before the test was over"
            await holder
            return out
    first, second, third = asyncio.run(main())
    assert second["timings"]["cache_n"] == len(base) and third["timings"]["cache_n"] == 20
    mine = next(s for s in get(server3, "/slots") if s["id"] == third["id_slot"])
    assert mine["n_decode_batched"] > 0   # its ubatches held the other slot's tokens too
    for prompt, got in ((base, first), (longer, second), (other, third)):
        fresh = post(server3, "/completion", {**GREEDY, "prompt": prompt, "n_predict": 6, "cache_prompt": False})
        assert got["tokens"] == fresh["tokens"]
    assert all(r["id_slot"] == first["id_slot"] for r in (second, third))


def test_engine_prompts_that_do_not_fit_together(synth_model: Path) -> None:
    """The engine's rounds, driven directly (what its thread does), 256 cells and 2 slots. Slot 0 caches
    a 200-token prompt; then a 100-token prompt on slot 1 and that cached prompt + 40 tokens on slot 0
    arrive in the same round. They cannot both fit: the one that fits beside the other's cells (slot 0's
    40 new tokens) goes first, though it came second, then slot 0's cache is dropped for slot 1's prompt.
    Both complete, nothing truncated, with the tokens each gets alone."""
    from hybridllm.server.engine_api import GenerateRequest, GenStats, SamplingParams, Step
    from hybridllm.server.batching import Job
    from hybridllm.server.local_engine import LocalEngine

    engine = LocalEngine.load(synth_model, n_ctx=256, n_parallel=2)
    cached = [1] + [7] * 199

    def job(slot: int, prompt: list[int]) -> Job:
        req = GenerateRequest(prompt, SamplingParams(temperature=0.0), max_tokens=6, ignore_eos=True)
        return Job(engine._seqs[slot], req, GenStats(), engine._tok, engine._sampler(req))

    def run(*jobs: Job) -> list[list[Step]]:
        steps: dict[Job, list[Step]] = {j: [] for j in jobs}
        while any(not s or s[-1].finish_reason is None for s in steps.values()):
            active = [j for j in jobs if not steps[j] or steps[j][-1].finish_reason is None]
            for j, item in engine._rounds(active, {j.seq.id for j in active}, False)[0]:
                assert isinstance(item, Step), item
                steps[j].append(item)
        return [steps[j] for j in jobs]
    try:
        run(job(0, cached))
        first, second = job(1, [1] + [9] * 99), job(0, cached + [11] * 40)
        got = run(first, second)
        alone = [run(job(1, [1] + [9] * 99))[0], run(job(1, cached + [11] * 40))[0]]
    finally:
        asyncio.run(engine.close())
    assert second.stats.n_cached == 200 and first.stats.n_cached == 0
    for steps, ref in zip(got, alone):
        assert steps[-1].finish_reason == "length" and not steps[-1].truncated
        assert [s.token for s in steps] == [s.token for s in ref] and len(steps) == 6
    assert engine.stats.ubatches_multi_seq == 0   # they never fit the cache at once
