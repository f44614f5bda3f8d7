"""Prometheus view of a KV router: decisions, index size, KV events applied and dropped, fallbacks.

Read at scrape time from the objects' own counters, so the routing path updates nothing but plain ints.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry


class RouterCollector(Collector):
    def __init__(self, selector: Any = None, service: Any = None) -> None:
        self.selector = selector  # a LocalSelector or RemoteSelector
        self.service = service  # a RouterService

    def collect(self) -> Iterator[Metric]:
        feed = getattr(self.service, "feed", None) or getattr(self.selector, "feed", None)
        if feed is not None:
            router = feed.router
            workers = GaugeMetricFamily("zdyn_router_workers", "Workers the KV router knows")
            workers.add_metric([], len(feed.peers))
            yield workers
            blocks = GaugeMetricFamily(
                "zdyn_router_indexed_blocks", "KV blocks in the router's index", labels=["worker"]
            )
            for worker in feed.peers:
                blocks.add_metric([worker], router.indexer.num_blocks(worker))
            yield blocks
            index = CounterMetricFamily(
                "zdyn_router_index_events", "KV events by outcome in the index", labels=["kind"]
            )
            for kind, n in sorted(router.indexer.stats.items()):
                index.add_metric([kind], n)
            yield index
            subs = CounterMetricFamily(
                "zdyn_router_event_batches", "KV-event batches per worker by outcome", labels=["worker", "outcome"]
            )
            for worker, sub in feed.subscribers.items():
                for outcome, n in sorted(sub.stats.items()):
                    subs.add_metric([worker, outcome], n)
            yield subs
            in_flight = GaugeMetricFamily("zdyn_router_active_requests", "Requests the router counts as in flight")
            in_flight.add_metric([], len(router.active))
            yield in_flight
            expired = CounterMetricFamily(
                "zdyn_router_expired_requests",
                "Routed requests forgotten after --router-request-ttl without a finish (processor gone)",
            )
            expired.add_metric([], router.expired_requests)
            yield expired
        if self.service is not None:
            decisions = CounterMetricFamily("zdyn_router_decisions", "Route queries answered", labels=["outcome"])
            decisions.add_metric(["routed"], self.service.decisions)
            decisions.add_metric(["no_decision"], self.service.no_decision)
            yield decisions
            malformed = CounterMetricFamily("zdyn_router_malformed_messages", "Malformed messages dropped")
            malformed.add_metric([], self.service.malformed.count)
            yield malformed
        client = getattr(self.selector, "client", None)
        if client is not None:
            failures = CounterMetricFamily(
                "zdyn_router_client_failures", "Route queries that timed out (routed round-robin instead)"
            )
            failures.add_metric([], client.failures)
            yield failures
            fallbacks = CounterMetricFamily(
                "zdyn_router_client_fallbacks", "Requests routed round-robin: the router did not answer, or backing off"
            )
            fallbacks.add_metric([], self.selector.fallbacks)
            yield fallbacks


def register(registry: CollectorRegistry, selector: Any = None, service: Any = None) -> None:
    registry.register(RouterCollector(selector, service))
