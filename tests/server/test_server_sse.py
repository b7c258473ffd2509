"""Raw event streams read with aiohttp's client and parsed by hand: the chunk sequence of a chat stream,
llama-server's native /completion (stream and not), stop strings, and prompt-cache reuse."""
from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp

from srv_helpers import Serve, parse_sse, post, sse_post

BASE = {"temperature": 0.0, "ignore_eos": True, "cache_prompt": False}
CHAT = {"messages": [{"role": "user", "content": "tell me a story"}]}


async def _read_stream(url: str, body: dict[str, Any]) -> tuple[int, str, list[str], list[bytes]]:
    """The events and the raw network chunks as they arrived."""
    async with aiohttp.ClientSession() as s:
        async with s.post(url, json=body) as resp:
            raw: list[bytes] = []
            async for data in resp.content.iter_any():
                raw.append(data)
            return resp.status, resp.headers.get("Content-Type", ""), parse_sse(b"".join(raw)), raw


def test_chat_stream_sequence(server: Serve) -> None:
    status, ctype, events, _ = asyncio.run(_read_stream(server.url + "/v1/chat/completions",
                                                        {**CHAT, **BASE, "max_tokens": 6, "stream": True}))
    assert status == 200 and ctype.startswith("text/event-stream")
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    first, finish, usage = chunks[0], chunks[-2], chunks[-1]
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": None}
    for c in chunks[1:-2]:  # content deltas only, no finish reason yet
        assert set(c["choices"][0]["delta"]) == {"content"} and c["choices"][0]["finish_reason"] is None
    assert finish["choices"][0] == {"finish_reason": "length", "index": 0, "delta": {}}
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 6
    t = usage["timings"]
    assert t["predicted_n"] == 6 and t["prompt_n"] == usage["usage"]["prompt_tokens"] and t["cache_n"] == 0
    assert t["predicted_ms"] > 0 and t["prompt_ms"] > 0
    assert abs(t["predicted_per_second"] - 1e3 * 5 / t["predicted_ms"]) < 1e-6 * t["predicted_per_second"]
    assert {c["id"] for c in chunks} == {first["id"]}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)


def test_native_completion(server: Serve) -> None:
    body = {**BASE, "prompt": "the quick brown fox", "n_predict": 7, "return_tokens": True}
    plain = post(server, "/completion", body)
    assert plain["stop"] is True and plain["stop_type"] == "limit" and plain["tokens_predicted"] == 7
    assert len(plain["tokens"]) == 7
    ids = post(server, "/tokenize", {"content": "the quick brown fox", "add_special": True})["tokens"]
    assert plain["tokens_evaluated"] == len(ids)
    # the text is the detokenized tokens (no stop string, no EOS here)
    assert post(server, "/detokenize", {"tokens": plain["tokens"]})["content"] == plain["content"]
    assert plain["generation_settings"]["n_predict"] == 7 and plain["timings"]["predicted_n"] == 7

    status, ctype, events = sse_post(server, "/completion", {**body, "stream": True})
    assert status == 200 and ctype.startswith("text/event-stream")
    assert "[DONE]" not in events  # llama-server's native stream just ends
    chunks = [json.loads(e) for e in events]
    assert [c["stop"] for c in chunks] == [False] * 7 + [True]
    assert [t for c in chunks[:-1] for t in c["tokens"]] == plain["tokens"]
    assert "".join(c["content"] for c in chunks) == plain["content"]
    assert [c["tokens_predicted"] for c in chunks[:-1]] == list(range(1, 8))
    assert chunks[-1]["timings"]["predicted_n"] == 7 and chunks[-1]["stop_type"] == "limit"


def test_token_prompt_and_mixed_prompt(server: Serve) -> None:
    ids = post(server, "/tokenize", {"content": "hello world", "add_special": True})["tokens"]
    a = post(server, "/completion", {**BASE, "prompt": ids, "n_predict": 3, "return_tokens": True})
    b = post(server, "/completion", {**BASE, "prompt": "hello world", "n_predict": 3, "return_tokens": True})
    assert a["tokens"] == b["tokens"] and a["tokens_evaluated"] == b["tokens_evaluated"] == len(ids)
    tail = post(server, "/tokenize", {"content": " again"})["tokens"]
    c = post(server, "/completion", {**BASE, "prompt": ["hello world", *tail], "n_predict": 1})
    assert c["tokens_evaluated"] == len(ids) + len(tail)


def _greedy(server: Serve, n: int, **extra: Any) -> dict[str, Any]:
    return post(server, "/completion", {**BASE, "prompt": "a b c d e f", "n_predict": n, "return_tokens": True,
                                        **extra})


def test_stop_string(server: Serve) -> None:
    full = _greedy(server, 24)
    text = full["content"]
    # a stop string taken from the middle of what greedy decoding produces anyway
    start = len(text) // 2
    stop = text[start:start + 2]
    assert stop, f"generation too short: {text!r}"
    cut = text.index(stop)
    res = _greedy(server, 24, stop=[stop, "never-occurs"])
    assert res["content"] == text[:cut]
    assert res["stop_type"] == "word" and res["stopping_word"] == stop
    assert res["tokens"] == full["tokens"][:len(res["tokens"])]
    # streamed, the held-back partial match must not leak either
    _, _, events = sse_post(server, "/completion", {**BASE, "prompt": "a b c d e f", "n_predict": 24,
                                                    "stop": stop, "stream": True})
    chunks = [json.loads(e) for e in events]
    assert "".join(c["content"] for c in chunks) == text[:cut]
    assert chunks[-1]["stop_type"] == "word"
    chat = post(server, "/v1/chat/completions", {**CHAT, **BASE, "max_tokens": 16})
    chat_text = chat["choices"][0]["message"]["content"]
    if len(chat_text) >= 2:
        stop = chat_text[len(chat_text) // 2:len(chat_text) // 2 + 1]
        chat2 = post(server, "/v1/chat/completions", {**CHAT, **BASE, "max_tokens": 16, "stop": stop})
        assert chat2["choices"][0]["message"]["content"] == chat_text[:chat_text.index(stop)]
        assert chat2["choices"][0]["finish_reason"] == "stop"


def test_prompt_cache_reuse(server: Serve) -> None:
    body = {"temperature": 0.0, "ignore_eos": True, "prompt": "the same prompt twice, the same prompt",
            "n_predict": 2}
    post(server, "/completion", body)
    again = post(server, "/completion", body)
    n = again["tokens_evaluated"]
    assert again["timings"]["cache_n"] == n - 1 and again["timings"]["prompt_n"] == 1
    fresh = post(server, "/completion", {**body, "cache_prompt": False})
    assert fresh["timings"]["cache_n"] == 0 and fresh["timings"]["prompt_n"] == n
    usage = post(server, "/v1/completions", {**body, "max_tokens": 2})["usage"]
    assert usage["prompt_tokens_details"]["cached_tokens"] == n - 1


def test_n_predict_zero_and_default(server: Serve) -> None:
    r = post(server, "/completion", {**BASE, "prompt": "x", "n_predict": 0})
    assert r["content"] == "" and r["tokens_predicted"] == 0 and r["stop_type"] == "limit"


def test_seeded_sampling_repeats(server: Serve) -> None:
    body = {"prompt": "x y z", "n_predict": 12, "temperature": 1.0, "ignore_eos": True, "cache_prompt": False,
            "return_tokens": True}
    a = post(server, "/completion", {**body, "seed": 1234})["tokens"]
    assert post(server, "/completion", {**body, "seed": 1234})["tokens"] == a
    others = [post(server, "/completion", {**body, "seed": s})["tokens"] for s in (1, 2, 3)]
    assert any(o != a for o in others)


def test_logit_bias_false_bans_token(server: Serve) -> None:
    body = {**BASE, "prompt": "x y z", "n_predict": 1, "return_tokens": True}
    first = post(server, "/completion", body)["tokens"][0]
    banned = post(server, "/completion", {**body, "logit_bias": [[first, False]]})["tokens"][0]
    assert banned != first
    assert post(server, "/completion", {**body, "logit_bias": {str(banned): 100.0}})["tokens"][0] == banned
