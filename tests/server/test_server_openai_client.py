"""The official `openai` client against `hybridllm serve`: models, chat (plain and streamed), completions,
and errors mapped to the client's exception classes."""
from __future__ import annotations

import openai
import pytest

from srv_helpers import Serve, post

GREEDY = {"temperature": 0.0}


@pytest.fixture(scope="module")
def client(server: Serve) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_models(client: openai.OpenAI, synth_model) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [synth_model.name]
    assert models[0].object == "model"
    meta = models[0].model_extra["meta"]
    assert meta["n_vocab"] == 512 and meta["n_ctx"] == 1024 and meta["n_embd"] == 256


def test_chat(client: openai.OpenAI, server: Serve) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    r = client.chat.completions.create(model="anything", messages=messages, max_tokens=6,
                                       extra_body={"ignore_eos": True, **GREEDY})
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    choice = r.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason == "length"
    assert r.usage.completion_tokens == 6
    # the prompt is the template's text tokenized with BOS and special tokens, as /apply-template + /tokenize
    prompt = post(server, "/apply-template", {"messages": messages})["prompt"]
    assert prompt.endswith("<|im_start|>assistant\n") and "hello there" in prompt
    ids = post(server, "/tokenize", {"content": prompt, "add_special": True, "parse_special": True})["tokens"]
    assert r.usage.prompt_tokens == len(ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + 6
    assert r.model_extra["timings"]["predicted_n"] == 6


def test_chat_stream_matches_plain(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "count with me"}]
    kw = dict(model="m", messages=messages, max_tokens=8, extra_body={"ignore_eos": True, "cache_prompt": False,
                                                                        **GREEDY})
    plain = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, **kw))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    with_choices = [c for c in chunks if c.choices]
    assert with_choices[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in with_choices[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    text = "".join(c.choices[0].delta.content or "" for c in with_choices)
    assert text == plain.choices[0].message.content


def test_completions(client: openai.OpenAI) -> None:
    kw = dict(model="m", prompt="once upon a time", max_tokens=5, extra_body={"ignore_eos": True,
                                                                             "cache_prompt": False, **GREEDY})
    r = client.completions.create(**kw)
    assert r.object == "text_completion" and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 5
    chunks = list(client.completions.create(stream=True, **kw))
    assert "".join(c.choices[0].text for c in chunks) == r.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == 5


def test_completions_token_prompt(client: openai.OpenAI, server: Serve) -> None:
    ids = post(server, "/tokenize", {"content": "once upon a time", "add_special": True})["tokens"]
    kw = dict(model="m", max_tokens=4, extra_body={"ignore_eos": True, "cache_prompt": False, **GREEDY})
    by_ids = client.completions.create(prompt=ids, **kw)
    by_text = client.completions.create(prompt="once upon a time", **kw)
    assert by_ids.usage.prompt_tokens == len(ids) == by_text.usage.prompt_tokens
    assert by_ids.choices[0].text == by_text.choices[0].text


def test_errors_map_to_client_exceptions(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="m", messages=[])
    assert info.value.status_code == 400
    with pytest.raises(openai.BadRequestError, match="top_p"):
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], top_p=3.0)
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model="m", prompt=[5] * 2000, max_tokens=1)
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="m", input="x")
