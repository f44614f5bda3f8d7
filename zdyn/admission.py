"""Admission control: how many requests a processor lets through to its workers, and how long others wait.

Beyond the workers' capacity (the sum of their ``max_num_seqs`` from READY, times an overcommit factor) a
request waits in a bounded FIFO queue. A full queue, or a wait longer than the queue-time limit, is a 503
``overloaded`` at once (the frontend adds ``Retry-After``): at 10x overload the admitted requests keep their
latency and memory stays bounded, instead of every request waiting behind an unbounded backlog.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from zdyn.errors import RequestError

OVERLOADED = "overloaded"


@dataclass(slots=True)
class AdmissionConfig:
    overcommit: float = 1.0  # requests in flight per unit of the workers' max_num_seqs; 0 = no admission control
    max_queued: int = 512  # requests waiting for a slot beyond that
    max_queue_time_s: float = 10.0  # a request that waited this long for a slot fails

    def __post_init__(self) -> None:
        if self.overcommit < 0 or self.max_queued < 0 or self.max_queue_time_s <= 0:
            raise ValueError(f"admission settings must be >= 0 (queue time > 0), got {self}")


def overloaded(message: str) -> RequestError:
    return RequestError(message, 503, OVERLOADED)


class Admission:
    """Counts requests in flight against a capacity the caller gives each time (it changes as workers come
    and go); FIFO waiting beyond it."""

    def __init__(self, config: AdmissionConfig | None = None) -> None:
        self.config = config or AdmissionConfig()
        self.in_flight = 0
        self.admitted = 0
        self.rejected_full = 0
        self.rejected_timeout = 0
        self._limit = 1
        self._waiting: deque[asyncio.Future[None]] = deque()

    @property
    def queued(self) -> int:
        return len(self._waiting)

    def limit(self, capacity: int) -> int:
        """Requests allowed in flight for workers whose ``max_num_seqs`` add up to ``capacity``."""
        return max(1, int(capacity * self.config.overcommit))

    @contextlib.asynccontextmanager
    async def slot(self, capacity: int) -> AsyncIterator[None]:
        """Hold one slot for the body of the ``async with``; raises a 503 ``overloaded`` when none is free in
        time. ``capacity`` 0 (no worker known yet) admits: the request then waits for a worker instead."""
        if self.config.overcommit and capacity:
            self._limit = self.limit(capacity)
            await self._acquire()
        else:
            self.in_flight += 1
        self.admitted += 1
        try:
            yield
        finally:
            self.in_flight -= 1
            self._wake()

    async def _acquire(self) -> None:
        if self.in_flight < self._limit and not self._waiting:
            self.in_flight += 1
            return
        if len(self._waiting) >= self.config.max_queued:
            self.rejected_full += 1
            raise overloaded(f"the server is at capacity ({self.in_flight} in flight, {self.queued} queued)")
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter), self.config.max_queue_time_s)
        except TimeoutError:
            if waiter.done() and not waiter.cancelled():  # granted just as the wait ended: keep it
                return
            self.rejected_timeout += 1
            raise overloaded(f"no capacity within {self.config.max_queue_time_s:.0f}s") from None
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():  # granted, but the client left: give it on
                self.in_flight -= 1
                self._wake()
            raise
        finally:
            if not waiter.done():
                waiter.cancel()
            with contextlib.suppress(ValueError):
                self._waiting.remove(waiter)

    def _wake(self) -> None:
        """Hand free slots to waiters, oldest first (a slot passes from the one leaving to the next)."""
        while self._waiting and self.in_flight < self._limit:
            waiter = self._waiting.popleft()
            if not waiter.done():
                self.in_flight += 1
                waiter.set_result(None)


class AdmissionCollector(Collector):
    """``zdyn_admission_*`` for Prometheus: in flight, queued, admitted and rejected (by reason)."""

    def __init__(self, admission: Admission, role: str) -> None:
        self.admission = admission
        self.role = role

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        a = self.admission
        for name, doc, value in (
            ("zdyn_admission_in_flight", "Requests admitted and not yet finished", a.in_flight),
            ("zdyn_admission_queued", "Requests waiting for capacity", a.queued),
        ):
            gauge = GaugeMetricFamily(name, doc, labels=["role"])
            gauge.add_metric([self.role], value)
            yield gauge
        admitted = CounterMetricFamily("zdyn_admission_admitted", "Requests admitted", labels=["role"])
        admitted.add_metric([self.role], a.admitted)
        yield admitted
        rejected = CounterMetricFamily(
            "zdyn_admission_rejected", "Requests refused with a 503 for lack of capacity", labels=["role", "reason"]
        )
        rejected.add_metric([self.role, "queue_full"], a.rejected_full)
        rejected.add_metric([self.role, "queue_time"], a.rejected_timeout)
        yield rejected
