"""Prometheus metrics of the HTTP frontend, and the one owner of each request's share of them."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1, 2.5)
ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/completions": "completions", "/v1/models": "models"}


class Metrics:
    """One registry per frontend so several apps (tests) can live in one process."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "zdyn_requests",
            "Finished HTTP requests by endpoint and status (success, error_<http status>, cancelled)",
            ["endpoint", "status"],
            registry=r,
        )
        self.internal_errors = Counter(
            "zdyn_internal_errors", "Requests that failed on a bug in zdyn (HTTP 500)", registry=r
        )
        self.in_flight = Gauge("zdyn_requests_in_flight", "Requests being served", registry=r)
        self.ttft = Histogram(
            "zdyn_time_to_first_token_seconds", "Time to first token", buckets=LATENCY_BUCKETS, registry=r
        )
        self.itl = Histogram(
            "zdyn_inter_token_latency_seconds",
            "Time between streamed outputs",
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "zdyn_request_latency_seconds", "End-to-end request latency", buckets=LATENCY_BUCKETS, registry=r
        )
        self.prompt_tokens = Counter("zdyn_prompt_tokens", "Prompt tokens processed", registry=r)
        self.output_tokens = Counter("zdyn_output_tokens", "Output tokens generated", registry=r)
        self.cached_tokens = Counter("zdyn_cached_tokens", "Prompt tokens served from the prefix cache", registry=r)
        self.live_workers = Gauge("zdyn_live_workers", "Workers currently registered", registry=r)

    def request(self, endpoint: str) -> RequestMetrics:
        return RequestMetrics(self, endpoint)

    def rejected(self, path: str, status: int) -> None:
        """A request refused before it reached an endpoint (a missing API key)."""
        self.requests.labels(ENDPOINTS.get(path, "other"), f"error_{status}").inc()


class RequestMetrics:
    """Everything one request adds to the metrics, each part exactly once, whichever way the request ends."""

    def __init__(self, metrics: Metrics, endpoint: str) -> None:
        self.metrics = metrics
        self.endpoint = endpoint
        self.started = time.perf_counter()
        self.last_output: float | None = None
        self.in_flight = False
        self.finished = False

    def dispatched(self) -> None:
        """The request went to the backend: it is in flight until ``finish``."""
        if not self.in_flight and not self.finished:
            self.in_flight = True
            self.metrics.in_flight.inc()

    def output(self) -> None:
        """A delta arrived: the first gives the time to first token, later ones the inter-token latency."""
        now = time.perf_counter()
        if self.last_output is None:
            self.metrics.ttft.observe(now - self.started)
        else:
            self.metrics.itl.observe(now - self.last_output)
        self.last_output = now

    def finish(self, status: str, usage: dict[str, Any] | None = None) -> None:
        """Count the request once under ``status``; a success also records its latency and tokens."""
        if self.finished:
            return
        self.finished = True
        m = self.metrics
        if self.in_flight:
            m.in_flight.dec()
        m.requests.labels(self.endpoint, status).inc()
        if status == "success" and usage is not None:
            m.e2e.observe(time.perf_counter() - self.started)
            m.prompt_tokens.inc(usage["prompt_tokens"])
            m.output_tokens.inc(usage["completion_tokens"])
            m.cached_tokens.inc(usage["prompt_tokens_details"]["cached_tokens"])


class WorkerDisagg(Collector):
    """The prefill decisions (remote, local, fallback, shared) of the decode workers behind this frontend, as
    their heartbeats report them (``QueueLink.decisions``): disaggregated serving seen from the frontend."""

    def __init__(self, workers: Callable[[], list[dict[str, Any]]]) -> None:
        self.workers = workers

    def collect(self) -> Iterator[Metric]:
        decisions = CounterMetricFamily(
            "zdyn_disagg_decisions", "Prefill decisions of decode workers", labels=["worker", "decision"]
        )
        for worker in self.workers():
            counts: dict[str, int] = {}
            for queue in worker.get("prefill_queues", ()):
                for decision, n in queue.get("decisions", {}).items():
                    counts[decision] = counts.get(decision, 0) + n
            for decision, n in sorted(counts.items()):
                decisions.add_metric([worker["id"], decision], n)
        yield decisions
