"""Prometheus metrics with llama-server's names (`llamacpp:*`, server_task_result_metrics::to_metrics).

Counters accumulate over the process; the two throughput gauges average over the window since the
previous scrape, as llama-server's do. Each app has its own registry, so several servers in one process
(tests) never share counts.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .engine_api import GenStats

__all__ = ["ServerMetrics", "CONTENT_TYPE"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass
class _Bucket:
    """Tokens and busy time since the last scrape (for the per-second gauges)."""
    n_prompt: int = 0
    t_prompt_s: float = 0.0
    n_predicted: int = 0
    t_predicted_s: float = 0.0


@dataclass
class ServerMetrics:
    prompt_tokens: int = 0
    prompt_tokens_cached: int = 0
    prompt_seconds: float = 0.0
    tokens_predicted: int = 0
    tokens_predicted_seconds: float = 0.0
    n_decode: int = 0
    n_busy_slots: int = 0            # sum over decode calls of the slots busy at that time
    n_tokens_max: int = 0
    requests: int = 0
    requests_failed: int = 0
    bucket: _Bucket = field(default_factory=_Bucket)
    t_start: float = field(default_factory=time.time)

    def record(self, stats: GenStats, busy_slots: int) -> None:
        """Account one finished (or abandoned) generation. With continuous batching one decode call serves
        several requests: the engine's own count (`decodes` of `registry`) then replaces their sum."""
        self.prompt_tokens += stats.n_prompt_processed
        self.prompt_tokens_cached += stats.n_cached
        self.prompt_seconds += stats.t_prompt_ms / 1e3
        self.tokens_predicted += stats.n_predicted
        self.tokens_predicted_seconds += stats.t_gen_ms / 1e3
        self.n_decode += stats.n_decode
        self.n_busy_slots += stats.n_decode * max(busy_slots, 1)
        self.n_tokens_max = max(self.n_tokens_max, stats.n_prompt + stats.n_predicted)
        b = self.bucket
        b.n_prompt += stats.n_prompt_processed
        b.t_prompt_s += stats.t_prompt_ms / 1e3
        b.n_predicted += stats.n_predicted
        b.t_predicted_s += stats.t_gen_ms / 1e3

    def registry(self, processing: Callable[[], int], deferred: Callable[[], int],
                 decodes: Callable[[], int | None] = lambda: None) -> CollectorRegistry:
        """`decodes`: the engine's count of decode calls (ubatches), when it keeps one."""
        reg = CollectorRegistry(auto_describe=False)
        reg.register(_Collector(self, processing, deferred, decodes))
        return reg

    def render(self, registry: CollectorRegistry) -> bytes:
        out = generate_latest(registry)
        self.bucket = _Bucket()  # the gauges average over the window between two scrapes
        return out


class _Collector(Collector):
    def __init__(self, m: ServerMetrics, processing: Callable[[], int], deferred: Callable[[], int],
                 decodes: Callable[[], int | None]) -> None:
        self.m, self.processing, self.deferred, self.decodes = m, processing, deferred, decodes

    def collect(self) -> Iterator[Metric]:
        m, b = self.m, self.m.bucket
        n_decode, busy = self.decodes(), m.n_busy_slots / max(m.n_decode, 1)
        if n_decode is None:
            n_decode = m.n_decode
        else:  # each request counted the decode calls it took part in: their sum over the calls made
            busy = m.n_decode / max(n_decode, 1)
        counters = [
            ("prompt_tokens_total", "Number of prompt tokens processed, excluding cached tokens", m.prompt_tokens),
            ("prompt_tokens_cached_total", "Number of prompt tokens reused from the cache",
             m.prompt_tokens_cached),
            ("prompt_seconds_total", "Total time spent processing prompts", m.prompt_seconds),
            ("tokens_predicted_total", "Number of generation tokens processed", m.tokens_predicted),
            ("tokens_predicted_seconds_total", "Total time spent generating tokens", m.tokens_predicted_seconds),
            ("n_decode_total", "Total number of decode calls", n_decode),
            ("requests_total", "Generation requests answered", m.requests),
            ("requests_failed_total", "Generation requests that failed or whose client went away",
             m.requests_failed),
        ]
        gauges = [
            ("n_tokens_max", "Largest observed sequence length (prompt + generation)", m.n_tokens_max),
            ("prompt_tokens_seconds", "Average prompt throughput in tokens/s",
             b.n_prompt / b.t_prompt_s if b.t_prompt_s > 0 else 0.0),
            ("predicted_tokens_seconds", "Average generation throughput in tokens/s",
             b.n_predicted / b.t_predicted_s if b.t_predicted_s > 0 else 0.0),
            ("requests_processing", "Number of requests processing", self.processing()),
            ("requests_deferred", "Number of requests deferred", self.deferred()),
            ("n_busy_slots_per_decode", "Average number of busy slots per decode call", busy),
        ]
        for name, doc, value in counters:
            yield CounterMetricFamily(f"llamacpp:{name}", doc, value=value)
        for name, doc, value in gauges:
            yield GaugeMetricFamily(f"llamacpp:{name}", doc, value=value)
