"""Helpers shared by the tests: waiting without sleeping blindly, fast heartbeats, reading counters."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

import pytest
from _pytest.mark import ParameterSet
from prometheus_client import CollectorRegistry
from prometheus_client.registry import Collector

from zdyn.bench import procs
from zdyn.transport import Liveness

FAST = Liveness(interval_s=0.1, misses=3)  # peers are declared dead within ~0.3 s


T = TypeVar("T")


def wait_until(check: Callable[[], T], timeout_s: float, what: str) -> T:
    """Poll ``check`` until it returns something truthy (returned); TimeoutError(``what``) after ``timeout_s``."""
    return procs.wait_until(check, what, timeout_s, interval_s=0.05)


async def eventually(check: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """``wait_until`` for asyncio tests: the event loop keeps running while it waits."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def sample(source: CollectorRegistry | Collector, name: str, **labels: str) -> float:
    """One sample of a Prometheus registry or collector (0 when it was never touched)."""
    registry = source
    if not isinstance(source, CollectorRegistry):
        registry = CollectorRegistry()
        registry.register(source)
    return registry.get_sample_value(name, labels) or 0.0


def examples(quick: int, thorough: int) -> list[ParameterSet]:
    """Hypothesis example budgets as a test parameter: ``quick`` in every run, ``thorough`` in the full suite."""
    return [pytest.param(quick, id="quick"), pytest.param(thorough, id="thorough", marks=pytest.mark.slow)]
