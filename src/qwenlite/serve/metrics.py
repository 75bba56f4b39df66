"""Prometheus metrics for GET /metrics (serve/app.py routes it), in a registry of the app's own, so several apps in
one process count apart.

Measured on the serving side: `OpenAIServer` opens a `Trace` when a request to /v1/chat/completions or
/v1/completions arrives, marks each token it consumes and closes it once with the HTTP status (499 for a client
that went away). The engine's queue depth, active rows and decode steps, and with speculative decoding its drafts
and how many were kept, are read at scrape time."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from qwenlite.serve.engine import Engine, Usage

TRACED = ("/v1/chat/completions", "/v1/completions")
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class EngineCollector:
    """The engine's own numbers, read when Prometheus scrapes."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def collect(self):
        yield GaugeMetricFamily("qwenlite_requests_waiting", "Requests queued for a cache row", self.engine.waiting)
        yield GaugeMetricFamily("qwenlite_requests_active", "Requests holding a cache row", self.engine.active)
        yield CounterMetricFamily("qwenlite_decode_steps", "Batched decode steps run", self.engine.decode_steps)
        e = self.engine
        if e.speculate:  # a verification: one row's drafts checked by a decode step
            yield CounterMetricFamily("qwenlite_speculative_verifications", "Rows whose drafts a step verified",
                                      e.verifications)  # fmt: skip
            yield CounterMetricFamily("qwenlite_speculative_drafted_tokens", "Tokens drafted", e.drafted_tokens)
            yield CounterMetricFamily("qwenlite_speculative_accepted_tokens",
                                      "Drafts kept: tokens a verified row took beyond the model's own next one",
                                      e.accepted_tokens)  # fmt: skip
            per = (e.accepted_tokens + e.verifications) / e.verifications if e.verifications else 0.0
            yield GaugeMetricFamily("qwenlite_speculative_tokens_per_verification",
                                    "Tokens a verified row takes from one forward, its kept drafts and the model's own",
                                    per)  # fmt: skip


class Metrics:
    def __init__(self, engine: Engine):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("qwenlite_requests", "Finished requests", ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("qwenlite_prompt_tokens", "Prompt tokens of requests the engine took", registry=r)
        self.generated_tokens = Counter("qwenlite_generated_tokens", "Tokens generated for responses", registry=r)
        self.cached_tokens = Counter("qwenlite_cached_tokens", "Prompt tokens restored, not prefilled", registry=r)
        self.ttft = Histogram("qwenlite_time_to_first_token_seconds", "From the request's arrival to its first token",
                              buckets=TTFT_BUCKETS, registry=r)  # fmt: skip
        self.itl = Histogram("qwenlite_inter_token_latency_seconds", "Between successive tokens of one choice",
                             buckets=ITL_BUCKETS, registry=r)  # fmt: skip
        r.register(EngineCollector(engine))

    def trace(self, endpoint: str) -> Trace:
        return Trace(self, endpoint)

    def refused(self, endpoint: str, status: int) -> None:
        """A request to a traced endpoint that was refused before its handler ran (no key, an invalid body)."""
        if endpoint in TRACED:
            self.requests.labels(endpoint, str(status)).inc()


class Trace:
    """One HTTP request: its token times, and its counts once it finishes."""

    def __init__(self, metrics: Metrics, endpoint: str):
        self.metrics, self.endpoint = metrics, endpoint
        self.start = time.perf_counter()
        self.last: dict[int, float] = {}  # choice index -> time of its latest token
        self.usages: Callable[[], Sequence[Usage]] = list  # set once the engine has the request
        self.done = False

    def token(self, index: int = 0) -> None:
        now = time.perf_counter()
        if not self.last:
            self.metrics.ttft.observe(now - self.start)
        if index in self.last:
            self.metrics.itl.observe(now - self.last[index])
        self.last[index] = now

    def finish(self, status: int) -> None:
        """Counts the request and its tokens; only the first call counts."""
        if self.done:
            return
        self.done = True
        m = self.metrics
        m.requests.labels(self.endpoint, str(status)).inc()
        for u in self.usages():
            m.prompt_tokens.inc(u.prompt_tokens)
            m.generated_tokens.inc(u.completion_tokens)
            m.cached_tokens.inc(u.cached_tokens)
