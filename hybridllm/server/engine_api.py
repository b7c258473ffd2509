"""The narrow interface between the HTTP server and whatever runs the model.

The server only needs: tokenizer round trips, the chat template, static model facts, a health state and,
per slot, `generate()` -- an async iterator of sampled tokens with their safe-to-send text. Everything
CPU-bound belongs to the engine, which must keep the event loop free (run its steps in a worker thread).

Contract of `generate(slot, request, stats)`:
- one `Step` per sampled token; the last one carries `finish_reason` ("stop" or "length");
- the consumer may stop iterating at any point (client gone: aclose() or cancellation while a step is
  in flight); the engine must then stop generating for that slot and keep the slot usable for the next
  `generate()` call on it, which the server only makes after the previous iterator is done with;
- request errors (prompt too long, bad token id) raise `EngineRequestError` before the first step.
"""
from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = ["ContextExceeded", "Engine", "EngineLoadError", "EngineRequestError", "EngineUnavailable",
           "GenStats", "GenerateRequest", "Health", "HealthState", "ModelInfo", "SamplingParams", "Step"]


class EngineRequestError(ValueError):
    """The request cannot run on this model (the server answers 400); one line."""


class EngineUnavailable(RuntimeError):
    """The model cannot run right now: a device it runs on (an RPC worker) failed or is still down. The
    server answers 503; one line."""


class EngineLoadError(RuntimeError):
    """The model cannot be loaded for a reason the user can fix (file, placement, unreachable worker); one
    line, no traceback."""


class ContextExceeded(EngineRequestError):
    """The prompt does not fit the slot's context (llama-server's exceed_context_size_error)."""

    def __init__(self, n_prompt_tokens: int, n_ctx: int) -> None:
        super().__init__(f"request ({n_prompt_tokens} tokens) exceeds the available context size "
                         f"({n_ctx} tokens), try increasing it")
        self.n_prompt_tokens, self.n_ctx = n_prompt_tokens, n_ctx


@dataclass(frozen=True)
class SamplingParams:
    """llama-server's sampling fields and defaults (common_params_sampling)."""
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int = -1                       # -1: a random seed per request
    logit_bias: Mapping[int, float] = field(default_factory=dict)


@dataclass(frozen=True)
class GenerateRequest:
    prompt: Sequence[int]
    sampling: SamplingParams = SamplingParams()
    stop: Sequence[str] = ()
    max_tokens: int = -1                 # -1: until end of generation or the context is full
    ignore_eos: bool = False
    cache_prompt: bool = True            # reuse the slot's cached prefix of the prompt


@dataclass(frozen=True)
class Step:
    """One sampled token. `text` is what may be sent now: bytes of an incomplete UTF-8 character and text
    that could begin a stop string are held back; a matched stop string and what follows are dropped."""
    token: int | None                    # None only for max_tokens == 0 (nothing sampled)
    text: str
    finish_reason: str | None = None     # "stop" | "length" on the last step
    stop_type: str = "none"              # llama-server's stop_type: eos | word | limit
    stopping_word: str = ""
    truncated: bool = False              # stopped because the context is full


@dataclass
class GenStats:
    """Filled in by the engine while it generates (times in ms, llama-server's slot stats)."""
    n_prompt: int = 0                    # prompt tokens of the request
    n_cached: int = 0                    # of which reused from the slot's cache
    n_predicted: int = 0
    t_prompt_ms: float = 0.0
    t_gen_ms: float = 0.0                # from the end of the prompt to the last token
    n_decode: int = 0                    # decode calls (ubatches)
    n_batched: int = 0                   # of which shared with other requests (continuous batching)

    @property
    def n_prompt_processed(self) -> int:
        return self.n_prompt - self.n_cached

    def timings(self) -> dict[str, float]:
        """llama-server's `timings` object (server_slot_stats::to_json)."""
        n_steps = max(self.n_predicted - 1, 0)  # the first token comes from the prompt's logits
        n_proc = self.n_prompt_processed
        return {
            "cache_n": self.n_cached,
            "prompt_n": n_proc,
            "prompt_ms": self.t_prompt_ms,
            "prompt_per_token_ms": self.t_prompt_ms / n_proc if n_proc else 0.0,
            "prompt_per_second": 1e3 * n_proc / self.t_prompt_ms if self.t_prompt_ms > 0 else 0.0,
            "predicted_n": self.n_predicted,
            "predicted_ms": self.t_gen_ms,
            "predicted_per_token_ms": self.t_gen_ms / n_steps if n_steps else 0.0,
            "predicted_per_second": 1e3 * n_steps / self.t_gen_ms if self.t_gen_ms > 0 else 0.0,
        }


@dataclass(frozen=True)
class ModelInfo:
    name: str                            # what /v1/models reports as the model id
    path: str
    arch: str
    n_ctx: int                           # the KV cache, shared by the slots (each may use all of it)
    n_ctx_train: int
    n_vocab: int
    n_embd: int
    n_params: int
    size: int                            # bytes of weights
    ftype: str                           # e.g. "Q4_K - Medium"
    vocab_type: int                      # llama_vocab_type: 1 SPM, 2 BPE
    bos_token: str
    eos_token: str
    chat_template: str                   # the Jinja source, or the built-in template's name
    device: str = "cpu"


class HealthState(enum.Enum):
    LOADING = "loading"
    OK = "ok"
    DEGRADED = "degraded"                # serving, but something is wrong (a worker lost, ...)
    ERROR = "error"                      # cannot serve


@dataclass(frozen=True)
class Health:
    state: HealthState
    message: str = ""


class Engine(Protocol):
    """What the server calls; `LocalEngine` adapts hybridllm's ModelRunner to it."""

    @property
    def info(self) -> ModelInfo: ...

    @property
    def n_slots(self) -> int: ...

    def health(self) -> Health: ...

    async def probe_health(self) -> Health:
        """The health after a quick check that remote devices still answer (for /health)."""
        ...

    async def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]: ...

    async def detokenize(self, ids: Sequence[int]) -> str: ...

    async def token_pieces(self, ids: Sequence[int]) -> list[bytes]: ...

    async def apply_template(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True,
                             template_kwargs: Mapping[str, Any] | None = None) -> str:
        """The prompt text; template_kwargs become template variables (chat_template_kwargs)."""
        ...

    def cached_prefix(self, slot: int, prompt: Sequence[int]) -> int:
        """Prompt tokens the slot could reuse from its cache (the server prefers the best slot)."""
        ...

    def generate(self, slot: int, request: GenerateRequest, stats: GenStats) -> AsyncIterator[Step]: ...

    async def close(self) -> None: ...
