"""llama-server's own endpoints: /completion, /health, /tokenize, /detokenize, /apply-template, /props,
/slots, /metrics (tools/server/server-context.cpp `init_routes`)."""
from __future__ import annotations

from typing import Any

from aiohttp import web

from .. import __version__
from .engine_api import HealthState, SamplingParams, Step
from .generation import complete, json_response
from .metrics import CONTENT_TYPE
from .openai_api import gen_request, tokenize_prompt
from .params import ApiError, opt_bool, parse_body, parse_gen_options, parse_messages, tokens_or_text
from .slots import Slot
from .state import STATE, ServerState

__all__ = ["routes"]

routes = web.RouteTableDef()


def _sampling_json(s: SamplingParams, n_predict: int, stop: list[str], ignore_eos: bool) -> dict[str, Any]:
    return {"seed": s.seed, "temperature": s.temperature, "top_k": s.top_k, "top_p": s.top_p, "min_p": s.min_p,
            "repeat_last_n": s.repeat_last_n, "repeat_penalty": s.repeat_penalty,
            "presence_penalty": s.presence_penalty, "frequency_penalty": s.frequency_penalty,
            "max_tokens": n_predict, "n_predict": n_predict, "stop": stop, "ignore_eos": ignore_eos,
            "logit_bias": [[t, b if b != float("-inf") else False] for t, b in s.logit_bias.items()],
            "samplers": ["penalties", "top_k", "top_p", "min_p", "temperature"]}


class NativeFormatter:
    """/completion's objects (server_task_result_cmpl_{partial,final}::to_json_non_oaicompat)."""
    done_marker = False  # llama-server ends a native stream without [DONE]

    def __init__(self, model: str, return_tokens: bool, stream: bool) -> None:
        self.model, self.return_tokens, self.stream = model, return_tokens, stream

    def _base(self, slot: Slot, content: str, tokens: list[int], stop: bool) -> dict[str, Any]:
        return {"index": 0, "content": content, "tokens": tokens if self.return_tokens else [],
                "stop": stop, "id_slot": slot.id, "tokens_predicted": slot.stats.n_predicted,
                "tokens_evaluated": slot.stats.n_prompt}

    def chunks(self, step: Step, slot: Slot, first: bool) -> list[dict[str, Any]]:
        return [self._base(slot, step.text, [] if step.token is None else [step.token], False)]

    def final_chunks(self, last: Step, slot: Slot) -> list[dict[str, Any]]:
        return [self.final("", [], last, slot)]  # the text went out in the chunks

    def final(self, text: str, tokens: list[int], last: Step, slot: Slot) -> dict[str, Any]:
        req = slot.request
        assert req is not None
        out = self._base(slot, text, tokens, True)
        out.update({
            "model": self.model,
            "generation_settings": _sampling_json(req.sampling, req.max_tokens, list(req.stop), req.ignore_eos),
            "prompt": slot.prompt, "has_new_line": "\n" in slot.generated, "truncated": last.truncated,
            "stop_type": last.stop_type, "stopping_word": last.stopping_word,
            "tokens_cached": slot.stats.n_prompt + slot.stats.n_predicted, "timings": slot.stats.timings(),
        })
        return out


@routes.post("/completion")
@routes.post("/completions")
async def completion(request: web.Request) -> web.StreamResponse:
    state: ServerState = request.app[STATE]
    engine = state.ready_engine()
    body = parse_body(await request.read())
    if "prompt" not in body:
        raise ApiError("'prompt' is required")
    opts = parse_gen_options(body, state.config.n_predict, state.config.sampling)
    ids = await tokenize_prompt(state, body["prompt"])
    gen = gen_request(ids, opts)
    fmt = NativeFormatter(engine.info.name, opt_bool(body, "return_tokens", False), opts.stream)
    prompt_text = await engine.detokenize(ids)
    return await complete(request, state, gen, fmt, stream=opts.stream, prompt_text=prompt_text)


@routes.get("/health")
@routes.get("/v1/health")
async def health(request: web.Request) -> web.Response:
    state: ServerState = request.app[STATE]
    h = await state.probe_health()
    if h.state is HealthState.OK:
        return json_response({"status": "ok"})
    if h.state is HealthState.DEGRADED:  # still serving: 200, so balancers keep it, with the reason
        return json_response({"status": "degraded", "message": h.message})
    status, kind = (503, "unavailable_error") if h.state is HealthState.LOADING else (500, "server_error")
    return json_response(ApiError(h.message or h.state.value, status, kind).body(), status=status)


@routes.post("/tokenize")
async def tokenize(request: web.Request) -> web.Response:
    state: ServerState = request.app[STATE]
    engine = state.ready_engine()
    body = parse_body(await request.read())
    if "content" not in body:
        return json_response({"tokens": []})
    add_special = opt_bool(body, "add_special", False)
    parse_special = opt_bool(body, "parse_special", True)
    ids: list[int] = []
    for i, piece in enumerate(tokens_or_text(body["content"], "content")):
        if isinstance(piece, str):
            ids += await engine.tokenize(piece, add_special=add_special and i == 0, parse_special=parse_special)
        else:
            ids.append(piece)
    if not opt_bool(body, "with_pieces", False):
        return json_response({"tokens": ids})
    out = []
    for tid, raw in zip(ids, await engine.token_pieces(ids)):
        try:
            shown: Any = raw.decode("utf-8")
        except UnicodeDecodeError:  # llama-server: invalid UTF-8 pieces as a list of byte values
            shown = list(raw)
        out.append({"id": tid, "piece": shown})
    return json_response({"tokens": out})


@routes.post("/detokenize")
async def detokenize(request: web.Request) -> web.Response:
    state: ServerState = request.app[STATE]
    engine = state.ready_engine()
    body = parse_body(await request.read())
    tokens = body.get("tokens", [])
    if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
        raise ApiError("'tokens' must be an array of token ids")
    return json_response({"content": await engine.detokenize(tokens)})


@routes.post("/apply-template")
async def apply_template(request: web.Request) -> web.Response:
    state: ServerState = request.app[STATE]
    engine = state.ready_engine()
    body = parse_body(await request.read())
    messages = parse_messages(body)
    kwargs = body.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise ApiError("'chat_template_kwargs' must be an object")
    prompt = await engine.apply_template(messages, add_generation_prompt=opt_bool(body, "add_generation_prompt",
                                                                                    True), template_kwargs=kwargs)
    return json_response({"prompt": prompt})


@routes.get("/props")
async def props(request: web.Request) -> web.Response:
    state: ServerState = request.app[STATE]
    info = state.ready_engine().info
    cfg = state.config
    return json_response({
        "default_generation_settings": {"params": _sampling_json(cfg.sampling, cfg.n_predict, [], False),
                                        "n_ctx": info.n_ctx},
        "total_slots": len(state.slots.slots) if state.slots else cfg.n_parallel,
        "model_alias": info.name, "model_path": info.path, "model_ftype": info.ftype,
        "modalities": {"vision": False, "video": False, "audio": False},
        "endpoint_slots": True, "endpoint_props": False, "endpoint_metrics": True,
        "chat_template": info.chat_template, "bos_token": info.bos_token, "eos_token": info.eos_token,
        "build_info": f"hybridllm {__version__}", "is_sleeping": False, "device": info.device,
    })


@routes.get("/slots")
async def slots(request: web.Request) -> web.Response:
    state: ServerState = request.app[STATE]
    state.ready_engine()
    assert state.slots is not None
    if request.query.get("fail_on_no_slot") and state.slots.n_idle == 0:
        raise ApiError("no slot available", 503, "unavailable_error")
    return json_response(state.slots.to_json())


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    state: ServerState = request.app[STATE]
    data = state.metrics.render(state.registry)
    return web.Response(body=data, headers={"Content-Type": CONTENT_TYPE,
                                            "Process-Start-Time-Unix": str(int(state.metrics.t_start))})
