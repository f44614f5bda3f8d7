"""Prometheus view of who was kept out: READYs hubs refused, and CURVE clients whose key a socket does not admit.

Read at scrape time from the hubs' and the context's own counters.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import zmq
import zmq.asyncio
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from zdyn.rpc.hub import Hub
from zdyn.security import curve_of


class RefusalCollector(Collector):
    def __init__(self, hubs: Sequence[Hub], ctx: zmq.Context[Any] | None = None) -> None:
        self.hubs = hubs
        self.ctx = ctx or zmq.asyncio.Context.instance()

    def collect(self) -> Iterator[Metric]:
        ready = CounterMetricFamily(
            "zdyn_refused_registrations",
            "READYs a hub refused (protocol, role, model, an id a live peer holds, more than --max-peers)",
            labels=["hub", "reason"],
        )
        for hub in self.hubs:
            ready.add_metric([hub.endpoint, "id_in_use"], hub.num_hijacks)
            ready.add_metric([hub.endpoint, "other"], hub.num_refused - hub.num_hijacks)
        yield ready
        curve = curve_of(self.ctx)
        keys = CounterMetricFamily(
            "zdyn_refused_keys", "CURVE clients refused: a key the socket does not admit", labels=["admits"]
        )
        for domain, n in sorted(curve.refused.items() if curve is not None else []):
            keys.add_metric([domain], n)
        yield keys
