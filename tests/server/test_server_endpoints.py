"""The utility endpoints: /health, /props, /slots, /metrics, /tokenize, /detokenize, /apply-template,
unknown routes; the synthetic vocabulary is checked against its GGUF metadata, not against our tokenizer."""
from __future__ import annotations

from pathlib import Path

import gguf
import pytest

from srv_helpers import Serve, error_of, get, http, http_json, metrics, post


@pytest.fixture(scope="module")
def vocab(synth_model: Path) -> list[str]:
    reader = gguf.GGUFReader(synth_model)
    field = reader.fields["tokenizer.ggml.tokens"]
    return [bytes(field.parts[i]).decode() for i in field.data]


def test_health(server: Serve) -> None:
    assert get(server, "/health") == {"status": "ok"}
    assert get(server, "/v1/health") == {"status": "ok"}


def test_props(server: Serve, synth_model: Path) -> None:
    p = get(server, "/props")
    assert p["total_slots"] == 1 and p["model_path"] == str(synth_model)
    assert p["default_generation_settings"]["n_ctx"] == 1024
    params = p["default_generation_settings"]["params"]
    assert params["temperature"] == 0.8 and params["top_k"] == 40 and params["n_predict"] == -1
    assert p["bos_token"] == "<s>" and p["eos_token"] == "</s>"
    assert p["chat_template"]


def test_slots(server2: Serve) -> None:
    slots = get(server2, "/slots")
    assert [s["id"] for s in slots] == [0, 1]
    assert all(s["n_ctx"] == 1024 and s["is_processing"] is False for s in slots)  # the shared cache
    post(server2, "/completion", {"prompt": "hi", "n_predict": 2, "temperature": 0.0, "ignore_eos": True})
    used = [s for s in get(server2, "/slots") if "id_task" in s]
    assert used and used[0]["next_token"][0]["n_decoded"] == 2 and used[0]["params"]["n_predict"] == 2


def test_tokenize_roundtrip(server: Serve, vocab: list[str]) -> None:
    text = "hello world"
    plain = post(server, "/tokenize", {"content": text})["tokens"]
    with_bos = post(server, "/tokenize", {"content": text, "add_special": True})["tokens"]
    assert with_bos == [vocab.index("<s>")] + plain
    # SPM pieces: the vocab's own strings with the word-boundary mark
    assert "".join(vocab[t] for t in plain).replace("\u2581", " ").strip() == text
    pieces = post(server, "/tokenize", {"content": text, "with_pieces": True})["tokens"]
    assert [p["id"] for p in pieces] == plain
    assert [p["piece"] for p in pieces] == [vocab[t].replace("\u2581", " ") for t in plain]
    assert post(server, "/detokenize", {"tokens": plain})["content"].strip() == text
    # special tokens are parsed from text by default, and kept as text when asked
    parsed = post(server, "/tokenize", {"content": "</s>"})["tokens"]
    assert parsed == [vocab.index("</s>")]
    literal = post(server, "/tokenize", {"content": "</s>", "parse_special": False})["tokens"]
    assert len(literal) > 1
    assert post(server, "/tokenize", {}) == {"tokens": []}


def test_apply_template(server: Serve) -> None:
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": [{"type": "text", "text": "U"}]}]
    # chatml (the template llama.cpp uses for a model without one), written out from its definition
    expect = "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"
    assert post(server, "/apply-template", {"messages": msgs})["prompt"] == expect
    no_gen = post(server, "/apply-template", {"messages": msgs, "add_generation_prompt": False})["prompt"]
    assert no_gen == expect[:-len("<|im_start|>assistant\n")]


def test_metrics(server: Serve) -> None:
    before = metrics(server)
    r = post(server, "/v1/completions", {"prompt": "measure me", "max_tokens": 5, "temperature": 0.0,
                                         "ignore_eos": True, "cache_prompt": False})
    after = metrics(server)
    assert after["llamacpp:tokens_predicted_total"] - before["llamacpp:tokens_predicted_total"] == 5
    n_prompt = r["usage"]["prompt_tokens"]
    assert after["llamacpp:prompt_tokens_total"] - before["llamacpp:prompt_tokens_total"] == n_prompt
    assert after["llamacpp:requests_total"] - before["llamacpp:requests_total"] == 1
    # one decode for the prompt (it fits one ubatch), one per generated token after the first
    assert after["llamacpp:n_decode_total"] - before["llamacpp:n_decode_total"] == 1 + 4
    assert after["llamacpp:tokens_predicted_seconds_total"] > before["llamacpp:tokens_predicted_seconds_total"]
    assert after["llamacpp:predicted_tokens_seconds"] > 0  # averaged since the previous scrape
    assert after["llamacpp:requests_processing"] == 0 and after["llamacpp:requests_deferred"] == 0
    assert after["llamacpp:n_tokens_max"] >= n_prompt + 5
    assert metrics(server)["llamacpp:predicted_tokens_seconds"] == 0  # a new window: nothing since


def test_unknown_route_and_method(server: Serve) -> None:
    status, data = http_json("GET", server.url + "/no/such/route")
    assert status == 404 and error_of(data)["type"] == "not_found_error"
    status, data = http_json("POST", server.url + "/v1/embeddings", {"input": "x"})
    assert status == 404 and error_of(data)["code"] == 404
    status, data = http_json("GET", server.url + "/v1/chat/completions")
    assert status == 405 and error_of(data)["code"] == 405
    status, headers, body = http("GET", server.url + "/health")
    assert status == 200 and headers["Content-Type"].startswith("application/json")
