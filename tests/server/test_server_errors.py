"""Bad requests get 400 with an OpenAI-style error and never hurt the server; the API key is enforced."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from srv_helpers import Serve, error_of, get, http, http_json, post, start_serve

MSG = [{"role": "user", "content": "hi"}]
CHAT = "/v1/chat/completions"

BAD_REQUESTS: list[tuple[str, Any, str]] = [
    (CHAT, {}, "'messages' is required"),
    (CHAT, {"messages": "hi"}, "array"),
    (CHAT, {"messages": []}, "empty"),
    (CHAT, {"messages": [5]}, "object"),
    (CHAT, {"messages": [{"content": "x"}]}, "role"),
    (CHAT, {"messages": [{"role": "user"}]}, "content"),
    (CHAT, {"messages": [{"role": "user", "content": 5}]}, "string or an array"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "not supported"),
    (CHAT, {"messages": MSG, "temperature": "hot"}, "'temperature' must be a number"),
    (CHAT, {"messages": MSG, "top_p": 1.5}, "'top_p'"),
    (CHAT, {"messages": MSG, "min_p": -0.1}, "'min_p'"),
    (CHAT, {"messages": MSG, "top_k": 2.5}, "'top_k' must be an integer"),
    (CHAT, {"messages": MSG, "max_tokens": -5}, "'max_tokens'"),
    (CHAT, {"messages": MSG, "seed": 1 << 40}, "'seed'"),
    (CHAT, {"messages": MSG, "stop": [1, 2]}, "'stop'"),
    (CHAT, {"messages": MSG, "stream": "yes"}, "'stream' must be a boolean"),
    (CHAT, {"messages": MSG, "n": 2}, "'n' must be 1"),
    (CHAT, {"messages": MSG, "logprobs": True}, "log probabilities"),
    (CHAT, {"messages": MSG, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tool"),
    (CHAT, {"messages": MSG, "response_format": {"type": "json_object"}}, "response_format"),
    (CHAT, {"messages": MSG, "logit_bias": {"99999": 1}}, "outside the vocabulary"),
    (CHAT, {"messages": MSG, "logit_bias": {"x": 1}}, "not an integer"),
    (CHAT, {"messages": MSG, "repeat_penalty": 0}, "'repeat_penalty'"),
    (CHAT, {"messages": [{"role": "user", "content": "a\ud800b"}]}, "surrogate"),
    (CHAT, {"messages": MSG, "chat_template_kwargs": {"messages": []}}, "cannot set messages"),
    (CHAT, {"messages": MSG, "chat_template_kwargs": [1]}, "must be an object"),
    ("/v1/completions", {}, "'prompt' is required"),
    ("/v1/completions", {"prompt": 5}, "'prompt' must be"),
    ("/v1/completions", {"prompt": ["a", "b"]}, "several prompts"),
    ("/v1/completions", {"prompt": [1, 99999]}, "outside the vocabulary"),
    ("/v1/completions", {"prompt": [-1]}, "outside the vocabulary"),
    ("/v1/completions", {"prompt": "x", "echo": True}, "echo"),
    ("/v1/completions", {"prompt": [], "max_tokens": 1}, "empty"),
    ("/completion", {"prompt": [True]}, "'prompt' must be"),
    ("/completion", {"prompt": "x", "n_predict": "many"}, "'n_predict'"),
    ("/tokenize", {"content": {"a": 1}}, "'content'"),
    ("/detokenize", {"tokens": "abc"}, "'tokens'"),
    ("/detokenize", {"tokens": [1, 100000]}, "outside the vocabulary"),
    ("/apply-template", {"messages": None}, "array"),
]


@pytest.mark.parametrize("path,body,needle", BAD_REQUESTS, ids=[f"{p}:{n}" for p, _, n in BAD_REQUESTS])
def test_bad_request(server: Serve, path: str, body: Any, needle: str) -> None:
    status, data = http_json("POST", server.url + path, body)
    err = error_of(data)
    assert status == 400 and err["code"] == 400 and err["type"] == "invalid_request_error", data
    assert needle.lower() in err["message"].lower()


@pytest.mark.parametrize("raw", [b"", b"{", b"not json", b"\xff\xfe\x00", b"[1, 2]", b"null", b"\"str\"",
                                 b"[" * 100000 + b"]" * 100000])
@pytest.mark.parametrize("path", [CHAT, "/v1/completions", "/completion", "/tokenize", "/apply-template"])
def test_malformed_body(server: Serve, path: str, raw: bytes) -> None:
    status, _, data = http("POST", server.url + path, raw, {"Content-Type": "application/json"})
    assert status == 400, data[:200]
    assert error_of(json.loads(data))["type"] == "invalid_request_error"


def test_context_exceeded(server: Serve) -> None:
    status, data = http_json("POST", server.url + "/completion", {"prompt": [5] * 1024, "n_predict": 1})
    err = error_of(data)
    assert status == 400 and err["type"] == "exceed_context_size_error"
    assert err["n_ctx"] == 1024 and err["n_prompt_tokens"] == 1024
    # streamed, the error comes before the stream starts: a plain JSON answer with its status
    status, headers, raw = http("POST", server.url + CHAT, json.dumps(
        {"messages": [{"role": "user", "content": "a " * 2000}], "stream": True}).encode())
    assert status == 400 and headers["Content-Type"].startswith("application/json")
    assert error_of(json.loads(raw))["type"] == "exceed_context_size_error"


def test_context_fills_up(server: Serve) -> None:
    """Without a limit, generation stops when the slot's context is full (finish_reason length)."""
    r = post(server, "/completion", {"prompt": [1] + [7] * 1000, "temperature": 0.0, "ignore_eos": True})
    assert r["truncated"] is True and r["stop_type"] == "limit"
    assert r["tokens_evaluated"] + r["tokens_predicted"] == 1024  # the last token is sampled, not decoded


JSONISH = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True)
                       | st.text(max_size=8), lambda c: st.lists(c, max_size=3)
                       | st.dictionaries(st.text(max_size=6), c, max_size=3), max_leaves=8)
FIELDS = ["messages", "prompt", "content", "tokens", "temperature", "top_k", "top_p", "min_p", "seed", "stop",
          "stream", "logit_bias", "repeat_penalty", "repeat_last_n", "presence_penalty", "frequency_penalty",
          "n", "stream_options", "add_special", "with_pieces", "chat_template_kwargs", "response_format"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from([CHAT, "/v1/completions", "/completion", "/tokenize", "/detokenize",
                             "/apply-template"]),
       body=st.dictionaries(st.sampled_from(FIELDS), JSONISH, max_size=5))
def test_fuzzed_bodies_never_500(server: Serve, path: str, body: dict[str, Any]) -> None:
    body.update(n_predict=1, max_tokens=1, max_completion_tokens=1)  # keep accepted ones short
    raw = json.dumps(body, allow_nan=True).encode()
    status, _, data = http("POST", server.url + path, raw, {"Content-Type": "application/json"})
    assert status in (200, 400), (status, data[:300])
    if status == 400:
        error_of(json.loads(data))


def test_server_survives(server: Serve) -> None:
    """After every bad request above, the server is healthy and generates."""
    assert get(server, "/health") == {"status": "ok"}
    r = post(server, CHAT, {"messages": MSG, "max_tokens": 2, "ignore_eos": True})
    assert r["usage"]["completion_tokens"] == 2


@pytest.fixture(scope="module")
def auth_server(synth_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    srv = start_serve(synth_model, ["--token", "s3cret", "--ctx", "256"], tmp_path_factory.mktemp("logs"))
    yield srv
    srv.stop()


def test_api_key(auth_server: Serve) -> None:
    url = auth_server.url
    assert http_json("GET", url + "/health")[0] == 200  # public, like llama-server
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cretx"}):
        status, data = http_json("GET", url + "/v1/models", headers=headers)
        assert status == 401 and error_of(data)["type"] == "authentication_error"
    assert http_json("GET", url + "/v1/models", headers={"Authorization": "Bearer s3cret"})[0] == 200
    assert http_json("GET", url + "/props", headers={"X-Api-Key": "s3cret"})[0] == 200
    status, data = http_json("POST", url + CHAT, {"messages": MSG, "max_tokens": 1},
                             headers={"Authorization": "Bearer s3cret"})
    assert status == 200 and data["usage"]["completion_tokens"] == 1
