"""OpenAI-compatible endpoints: /v1/chat/completions, /v1/completions, /v1/models (llama-server's formats,
tools/server/server-task.cpp `to_json_oaicompat*`)."""
from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from .. import __version__
from .engine_api import GenerateRequest, Step
from .generation import complete, json_response
from .params import (ApiError, GenOptions, opt_bool, parse_body, parse_gen_options, parse_messages,
                     tokens_or_text)
from .slots import Slot
from .state import STATE, ServerState

__all__ = ["routes", "tokenize_prompt", "gen_request", "FINGERPRINT"]

FINGERPRINT = f"hybridllm-{__version__}"
routes = web.RouteTableDef()


def _finish_reason(last: Step) -> str:
    return "stop" if last.stop_type in ("eos", "word") else "length"


def _usage(slot: Slot) -> dict[str, Any]:
    st = slot.stats
    return {"completion_tokens": st.n_predicted, "prompt_tokens": st.n_prompt,
            "total_tokens": st.n_predicted + st.n_prompt,
            "prompt_tokens_details": {"cached_tokens": st.n_cached}}


@dataclass
class _Envelope:
    """Fields every OpenAI object of one response shares."""
    model: str
    object: str
    id: str
    created: int = field(default_factory=lambda: int(time.time()))

    def wrap(self, **body: Any) -> dict[str, Any]:
        return {**body, "created": self.created, "id": self.id, "model": self.model,
                "system_fingerprint": FINGERPRINT, "object": self.object}


class ChatFormatter:
    done_marker = True

    def __init__(self, model: str, include_usage: bool) -> None:
        self.env = _Envelope(model, "chat.completion.chunk", "chatcmpl-" + secrets.token_hex(16))
        self.include_usage = include_usage

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return self.env.wrap(choices=[{"finish_reason": finish, "index": 0, "delta": delta}])

    def chunks(self, step: Step, slot: Slot, first: bool) -> list[dict[str, Any]]:
        out = [self._chunk({"role": "assistant", "content": None})] if first else []
        if step.text:
            out.append(self._chunk({"content": step.text}))
        return out

    def final_chunks(self, last: Step, slot: Slot) -> list[dict[str, Any]]:
        out = [self._chunk({}, _finish_reason(last))]
        if self.include_usage:  # OpenAI: the usage chunk has an empty `choices`
            out.append(self.env.wrap(choices=[], usage=_usage(slot)))
        out[-1]["timings"] = slot.stats.timings()
        return out

    def final(self, text: str, tokens: list[int], last: Step, slot: Slot) -> dict[str, Any]:
        env = _Envelope(self.env.model, "chat.completion", self.env.id)
        choice = {"finish_reason": _finish_reason(last), "index": 0,
                  "message": {"role": "assistant", "content": text}}
        return env.wrap(choices=[choice], usage=_usage(slot), timings=slot.stats.timings())


class CompletionFormatter:
    done_marker = True

    def __init__(self, model: str) -> None:
        self.env = _Envelope(model, "text_completion", "cmpl-" + secrets.token_hex(16))

    def _choice(self, text: str, finish: str | None) -> dict[str, Any]:
        return {"text": text, "index": 0, "logprobs": None, "finish_reason": finish}

    def chunks(self, step: Step, slot: Slot, first: bool) -> list[dict[str, Any]]:
        return [self.env.wrap(choices=[self._choice(step.text, None)])]

    def final_chunks(self, last: Step, slot: Slot) -> list[dict[str, Any]]:
        return [self.env.wrap(choices=[self._choice("", _finish_reason(last))], usage=_usage(slot),
                              timings=slot.stats.timings())]

    def final(self, text: str, tokens: list[int], last: Step, slot: Slot) -> dict[str, Any]:
        return self.env.wrap(choices=[self._choice(text, _finish_reason(last))], usage=_usage(slot),
                             timings=slot.stats.timings())


def gen_request(prompt: list[int], opts: GenOptions) -> GenerateRequest:
    return GenerateRequest(prompt=prompt, sampling=opts.sampling, stop=opts.stop, max_tokens=opts.n_predict,
                           ignore_eos=opts.ignore_eos, cache_prompt=opts.cache_prompt)


async def tokenize_prompt(state: ServerState, prompt: Any, name: str = "prompt") -> list[int]:
    """llama-server's tokenize_input_prompts: text pieces with BOS (first piece only) and special tokens
    parsed; token ids as given."""
    engine = state.ready_engine()
    ids: list[int] = []
    for i, piece in enumerate(tokens_or_text(prompt, name)):
        if isinstance(piece, str):
            ids += await engine.tokenize(piece, add_special=(i == 0), parse_special=True)
        else:
            ids.append(piece)
    return ids


@routes.post("/v1/chat/completions")
@routes.post("/chat/completions")
async def chat_completions(request: web.Request) -> web.StreamResponse:
    state: ServerState = request.app[STATE]
    engine = state.ready_engine()
    body = parse_body(await request.read())
    messages = parse_messages(body)
    if body.get("tools"):
        raise ApiError("tool calling is not supported yet ('tools')")
    opts = parse_gen_options(body, state.config.n_predict, state.config.sampling)
    kwargs = body.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise ApiError("'chat_template_kwargs' must be an object")
    prompt_text = await engine.apply_template(
        messages, add_generation_prompt=opt_bool(body, "add_generation_prompt", True), template_kwargs=kwargs)
    ids = await engine.tokenize(prompt_text, add_special=True, parse_special=True)
    fmt = ChatFormatter(engine.info.name, opts.include_usage)
    return await complete(request, state, gen_request(ids, opts), fmt, stream=opts.stream,
                          prompt_text=prompt_text)


@routes.post("/v1/completions")
async def completions(request: web.Request) -> web.StreamResponse:
    state: ServerState = request.app[STATE]
    engine = state.ready_engine()
    body = parse_body(await request.read())
    if "prompt" not in body:
        raise ApiError("'prompt' is required")
    if opt_bool(body, "echo", False):
        raise ApiError("'echo' is not supported yet")
    if body.get("suffix"):
        raise ApiError("'suffix' is not supported yet")
    opts = parse_gen_options(body, state.config.n_predict, state.config.sampling)
    ids = await tokenize_prompt(state, body["prompt"])
    fmt = CompletionFormatter(engine.info.name)
    prompt_text = body["prompt"] if isinstance(body["prompt"], str) else ""
    return await complete(request, state, gen_request(ids, opts), fmt, stream=opts.stream,
                          prompt_text=prompt_text)


@routes.get("/v1/models")
@routes.get("/models")
async def models(request: web.Request) -> web.Response:
    state: ServerState = request.app[STATE]
    info = state.ready_engine().info
    model = {
        "id": info.name, "object": "model", "created": int(state.t_start), "owned_by": "hybridllm",
        "aliases": [], "tags": [],
        "meta": {"vocab_type": info.vocab_type, "n_vocab": info.n_vocab, "n_ctx": info.n_ctx,
                 "n_ctx_train": info.n_ctx_train, "n_embd": info.n_embd, "n_params": info.n_params,
                 "size": info.size, "ftype": info.ftype},
    }
    legacy = {"name": info.name, "model": info.name, "modified_at": "", "size": "", "digest": "",
              "type": "model", "description": "", "tags": [""], "capabilities": ["completion"],
              "parameters": "", "details": {"parent_model": "", "format": "gguf", "family": info.arch,
                                            "families": [info.arch], "parameter_size": "",
                                            "quantization_level": info.ftype}}
    return json_response({"models": [legacy], "object": "list", "data": [model]})
