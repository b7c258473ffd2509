"""Request bodies -> validated parameters. Every problem is an `ApiError` (400, OpenAI-style error JSON).

Field names and defaults follow llama-server (tools/server/server-schema.cpp, server-common.cpp): sampling
fields at the top level, `n_predict` with the aliases `max_tokens` / `max_completion_tokens`, `stop` as a
string or a list of strings, `logit_bias` as an OpenAI object or llama.cpp's list of [token, bias] pairs.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from .engine_api import SamplingParams

__all__ = ["ApiError", "parse_body", "parse_sampling", "parse_n_predict", "parse_stop", "GenOptions",
           "parse_gen_options", "parse_messages", "tokens_or_text", "opt_bool", "opt_int", "opt_float"]

_MISSING = object()


class ApiError(Exception):
    """An error answered as {"error": {"code", "message", "type"}} with HTTP status `status`."""

    def __init__(self, message: str, status: int = 400, type: str = "invalid_request_error",
                 extra: Mapping[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message, self.status, self.type = message, status, type
        self.extra = dict(extra or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.status, "message": self.message, "type": self.type, **self.extra}}


def parse_body(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object."""
    if not raw.strip():
        raise ApiError("the request body is empty; expected a JSON object")
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(f"invalid JSON in the request body: {exc}") from None
    except RecursionError:
        raise ApiError("invalid JSON in the request body: nested too deeply") from None
    if not isinstance(data, dict):
        raise ApiError(f"the request body must be a JSON object, got {_kind(data)}")
    return data


def _kind(v: Any) -> str:
    if v is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
            dict: "an object"}.get(type(v), type(v).__name__)


# --- typed getters --------------------------------------------------------------------------------------
def opt_bool(body: Mapping[str, Any], name: str, default: bool) -> bool:
    v = body.get(name, _MISSING)
    if v is _MISSING or v is None:
        return default
    if not isinstance(v, bool):
        raise ApiError(f"'{name}' must be a boolean, got {_kind(v)}")
    return v


def opt_int(body: Mapping[str, Any], name: str, default: int, lo: int | None = None,
            hi: int | None = None) -> int:
    v = body.get(name, _MISSING)
    if v is _MISSING or v is None:
        return default
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise ApiError(f"'{name}' must be an integer, got {_kind(v)}")
    _check_range(name, v, lo, hi)
    return v


def opt_float(body: Mapping[str, Any], name: str, default: float, lo: float | None = None,
              hi: float | None = None) -> float:
    v = body.get(name, _MISSING)
    if v is _MISSING or v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ApiError(f"'{name}' must be a number, got {_kind(v)}")
    v = float(v)
    if not math.isfinite(v):
        raise ApiError(f"'{name}' must be finite")
    _check_range(name, v, lo, hi)
    return v


def _check_range(name: str, v: float, lo: float | None, hi: float | None) -> None:
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        span = f"[{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"
        raise ApiError(f"'{name}' must be in {span}, got {v}")


# --- generation options ---------------------------------------------------------------------------------
def parse_sampling(body: Mapping[str, Any], defaults: SamplingParams = SamplingParams()) -> SamplingParams:
    d = defaults
    seed = opt_int(body, "seed", d.seed, hi=0xFFFFFFFF)
    return SamplingParams(
        temperature=opt_float(body, "temperature", d.temperature),
        top_k=opt_int(body, "top_k", d.top_k),
        top_p=opt_float(body, "top_p", d.top_p, 0.0, 1.0),
        min_p=opt_float(body, "min_p", d.min_p, 0.0, 1.0),
        repeat_penalty=opt_float(body, "repeat_penalty", d.repeat_penalty, lo=1e-6),
        repeat_last_n=opt_int(body, "repeat_last_n", d.repeat_last_n, lo=-1),
        frequency_penalty=opt_float(body, "frequency_penalty", d.frequency_penalty, -2.0, 2.0),
        presence_penalty=opt_float(body, "presence_penalty", d.presence_penalty, -2.0, 2.0),
        seed=-1 if seed < 0 else seed,
        logit_bias=parse_logit_bias(body.get("logit_bias")),
    )


def parse_logit_bias(v: Any) -> dict[int, float]:
    """OpenAI {"123": -5} or llama.cpp [[123, -5], [456, false]] (false: never sample)."""
    if v is None:
        return {}
    pairs: list[tuple[Any, Any]]
    if isinstance(v, dict):
        pairs = list(v.items())
    elif isinstance(v, list) and all(isinstance(p, list) and len(p) == 2 for p in v):
        pairs = [(p[0], p[1]) for p in v]
    else:
        raise ApiError("'logit_bias' must be an object {token id: bias} or a list of [token id, bias] pairs")
    out: dict[int, float] = {}
    for k, b in pairs:
        try:
            tok = int(k)
        except (TypeError, ValueError):
            raise ApiError(f"'logit_bias': token id {k!r} is not an integer") from None
        if b is False:
            out[tok] = -math.inf
        elif isinstance(b, (int, float)) and not isinstance(b, bool) and math.isfinite(b):
            out[tok] = float(b)
        else:
            raise ApiError(f"'logit_bias': the bias of token {tok} must be a finite number or false")
    return out


def parse_n_predict(body: Mapping[str, Any], default: int) -> int:
    """n_predict, or its aliases max_tokens / max_completion_tokens; -1: no limit but the context."""
    for name in ("n_predict", "max_completion_tokens", "max_tokens"):
        if body.get(name) is not None:
            return opt_int(body, name, default, lo=-1)
    return default


def parse_stop(body: Mapping[str, Any]) -> list[str]:
    v = body.get("stop")
    if v is None:
        return []
    if isinstance(v, str):
        return [v] if v else []
    if isinstance(v, list) and all(isinstance(s, str) for s in v):
        return [s for s in v if s]
    raise ApiError("'stop' must be a string or an array of strings")


@dataclass(frozen=True)
class GenOptions:
    sampling: SamplingParams
    n_predict: int
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    stream: bool = False
    include_usage: bool = True
    cache_prompt: bool = True


def parse_gen_options(body: Mapping[str, Any], n_predict_default: int,
                      sampling_defaults: SamplingParams = SamplingParams()) -> GenOptions:
    """The fields every generation endpoint shares; rejects what we do not implement instead of ignoring it."""
    n = opt_int(body, "n", 1)
    if n != 1 or opt_int(body, "n_cmpl", 1) != 1:
        raise ApiError("only one completion per request is supported ('n' must be 1)")
    if opt_int(body, "best_of", 1) != 1:
        raise ApiError("'best_of' is not supported (must be 1)")
    if body.get("logprobs") not in (None, False, 0) or opt_int(body, "n_probs", 0) != 0:
        raise ApiError("log probabilities are not supported yet ('logprobs' / 'n_probs')")
    for name in ("grammar", "json_schema"):
        if body.get(name):
            raise ApiError(f"'{name}' (constrained sampling) is not supported yet")
    fmt = body.get("response_format")
    if fmt is not None:
        if not isinstance(fmt, dict) or fmt.get("type", "text") != "text":
            raise ApiError("'response_format' other than {\"type\": \"text\"} is not supported yet")
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise ApiError("'stream_options' must be an object")
    return GenOptions(
        sampling=parse_sampling(body, sampling_defaults),
        n_predict=parse_n_predict(body, n_predict_default),
        stop=parse_stop(body),
        ignore_eos=opt_bool(body, "ignore_eos", False),
        stream=opt_bool(body, "stream", False),
        # the brief (and older llama-server) always ends a chat stream with a usage chunk
        include_usage=opt_bool(opts or {}, "include_usage", True),
        cache_prompt=opt_bool(body, "cache_prompt", True),
    )


# --- chat messages --------------------------------------------------------------------------------------
def parse_messages(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Validate OpenAI chat messages (as llama-server's oaicompat_chat_params_parse does)."""
    if "messages" not in body:
        raise ApiError("'messages' is required")
    msgs = body["messages"]
    if not isinstance(msgs, list):
        raise ApiError("Expected 'messages' to be an array")
    if not msgs:
        raise ApiError("'messages' must not be empty")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise ApiError(f"messages[{i}] must be an object, got {_kind(m)}")
        role = m.get("role")
        if not isinstance(role, str) or not role:
            raise ApiError(f"messages[{i}] needs a string 'role'")
        if role == "assistant":
            if "content" not in m and "tool_calls" not in m:
                raise ApiError("Assistant message must contain either 'content' or 'tool_calls'!")
        elif "content" not in m:
            raise ApiError("All non-assistant messages must contain 'content'")
        _check_content(i, m.get("content"))
        out.append(dict(m))
    return out


def _check_content(i: int, content: Any) -> None:
    if content is None or isinstance(content, str):
        return
    if not isinstance(content, list):
        raise ApiError("Expected 'content' to be a string or an array")
    for part in content:
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise ApiError(f"messages[{i}].content: every part must be an object with a 'type'")
        if part["type"] != "text":
            raise ApiError(f"messages[{i}].content: '{part['type']}' parts are not supported (text only)")
        if not isinstance(part.get("text"), str):
            raise ApiError(f"messages[{i}].content: a text part needs a string 'text'")


def tokens_or_text(v: Any, name: str) -> list[str | int]:
    """A prompt given as a string, a token list, or llama.cpp's mix of strings and token ids."""
    if isinstance(v, str):
        return [v]
    if isinstance(v, list):
        if len(v) == 1 and isinstance(v[0], (str, list)):
            return tokens_or_text(v[0], name)  # a batch of one prompt
        if v and all(isinstance(p, (str, list)) for p in v):  # llama.cpp: a list of prompts
            raise ApiError(f"'{name}': several prompts in one request are not supported; send one per request")
        if all(isinstance(p, str) or (isinstance(p, int) and not isinstance(p, bool)) for p in v):
            return list(v)  # token ids, possibly mixed with text pieces
    raise ApiError(f"'{name}' must be a string, an array of token ids, or an array of strings and token ids")
