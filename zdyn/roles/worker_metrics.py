"""Prometheus view of a worker process (``zdyn worker --metrics-port``): per worker, its requests by outcome,
the Cancels it heard, what is in flight, the engine's load, and what the engine itself reports."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from zdyn.worker import Worker


class WorkerCollector(Collector):
    def __init__(self, workers: Sequence[Worker]) -> None:
        self.workers = workers

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "zdyn_worker_requests",
            "Requests served, by how they ended: finished, failed, cancelled (by the hub, the hub lost, or stopping)",
            labels=["worker", "outcome"],
        )
        cancels = CounterMetricFamily(
            "zdyn_worker_cancels",
            "Cancels heard: in_flight (the request was stopped and aborted in the engine) or after_end",
            labels=["worker", "when"],
        )
        malformed = CounterMetricFamily(
            "zdyn_worker_malformed_messages", "Malformed messages dropped", labels=["worker"]
        )
        in_flight = GaugeMetricFamily("zdyn_worker_requests_in_flight", "Requests being served", labels=["worker"])
        scheduler = GaugeMetricFamily(
            "zdyn_worker_engine_requests", "The engine scheduler's requests", labels=["worker", "state"]
        )
        kv_usage = GaugeMetricFamily(
            "zdyn_worker_kv_usage", "Fraction of the engine's KV blocks in use", labels=["worker"]
        )
        unfinished = GaugeMetricFamily(
            "zdyn_engine_unfinished_requests",
            "Requests the engine itself still holds (vLLM's own count)",
            labels=["worker"],
        )
        generated = CounterMetricFamily(
            "zdyn_engine_generation_tokens", "Tokens the engine generated (vLLM's iteration stats)", labels=["worker"]
        )
        for worker in self.workers:
            wid, spoke, engine = worker.worker_id, worker.spoke, _inner(worker.engine)
            if spoke is not None:
                for outcome, n in sorted(spoke.outcomes.items()):
                    requests.add_metric([wid, outcome], n)
                for when, n in sorted(spoke.cancels.items()):
                    cancels.add_metric([wid, when], n)
                malformed.add_metric([wid], spoke.malformed.count)
                in_flight.add_metric([wid], spoke.num_requests)
            load = worker.engine.load()
            scheduler.add_metric([wid, "running"], load.num_running)
            scheduler.add_metric([wid, "waiting"], load.num_waiting)
            kv_usage.add_metric([wid], load.kv_usage)
            if hasattr(engine, "num_unfinished"):
                unfinished.add_metric([wid], engine.num_unfinished())
            if hasattr(engine, "generation_tokens"):
                generated.add_metric([wid], engine.generation_tokens)
        yield from (requests, cancels, malformed, in_flight, scheduler, kv_usage, unfinished, generated)


def _inner(engine: Any) -> Any:
    """The engine under a disaggregation wrapper (decode or prefill), which keeps it as ``.engine``."""
    return getattr(engine, "engine", engine)
