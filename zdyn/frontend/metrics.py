"""Prometheus metrics of the HTTP frontend."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1, 2.5)


class Metrics:
    """One registry per frontend so several apps (tests) can live in one process."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "zdyn_requests",
            "Finished HTTP requests by endpoint and status",
            ["endpoint", "status"],
            registry=r,
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
