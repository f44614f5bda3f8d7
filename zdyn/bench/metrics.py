"""Benchmark metrics as ``vllm bench serve`` defines them, computed from request records."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from zdyn.bench.records import RequestRecord

SLO_METRICS = ("ttft", "tpot", "e2el")
DEFAULT_PERCENTILES = (50.0, 90.0, 99.0)
CDF_POINTS = 101  # quantiles 0 %, 1 %, ..., 100 %: enough to redraw a CDF without the raw samples


@dataclass(slots=True, frozen=True)
class Stats:
    """Summary of one latency metric, in milliseconds. All zero when ``count`` is 0."""

    count: int = 0
    mean: float = 0.0
    median: float = 0.0
    std: float = 0.0
    min: float = 0.0
    max: float = 0.0
    percentiles: dict[str, float] = field(default_factory=dict)
    cdf: list[float] = field(default_factory=list)


def percentile_key(p: float) -> str:
    return f"p{p:g}"


def summarize(values_s: Sequence[float], percentiles: Sequence[float] = DEFAULT_PERCENTILES) -> Stats:
    """Stats in ms of values given in seconds; percentiles use numpy's linear interpolation (as vLLM)."""
    if len(values_s) == 0:
        return Stats(percentiles={percentile_key(p): 0.0 for p in percentiles})
    ms = np.asarray(values_s, dtype=np.float64) * 1000.0
    return Stats(
        count=int(ms.size),
        mean=float(ms.mean()),
        median=float(np.median(ms)),
        std=float(ms.std()),
        min=float(ms.min()),
        max=float(ms.max()),
        percentiles={percentile_key(p): float(np.percentile(ms, p)) for p in percentiles},
        cdf=[float(v) for v in np.percentile(ms, np.linspace(0.0, 100.0, CDF_POINTS))],
    )


def parse_goodput(items: Iterable[str]) -> dict[str, float]:
    """``["ttft:500", "tpot:50"]`` -> ``{"ttft": 500.0, "tpot": 50.0}`` (milliseconds)."""
    slos: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition(":")
        name = name.strip().lower()
        if not sep or name not in SLO_METRICS:
            raise ValueError(f"goodput SLO {item!r}: expected NAME:MS with NAME one of {', '.join(SLO_METRICS)}")
        try:
            ms = float(value)
        except ValueError:
            raise ValueError(f"goodput SLO {item!r}: {value!r} is not a number of milliseconds") from None
        if ms <= 0:
            raise ValueError(f"goodput SLO {item!r}: must be positive")
        slos[name] = ms
    return slos


def request_tpot(record: RequestRecord) -> float | None:
    """(latency - ttft) / (output_tokens - 1); None for requests with fewer than two output tokens."""
    if record.output_tokens < 2:
        return None
    return (record.latency - record.ttft) / (record.output_tokens - 1)


def max_concurrency(records: Iterable[RequestRecord]) -> int:
    """Most requests in flight at once (a request ending when another starts does not overlap it)."""
    events = sorted([(r.start, 1) for r in records] + [(r.end, -1) for r in records])
    peak = current = 0
    for _, delta in events:
        current += delta
        peak = max(peak, current)
    return peak


@dataclass(slots=True)
class BenchMetrics:
    """Aggregate results of one load point. Throughputs are per second of ``duration_s``."""

    num_requests: int
    completed: int
    failed: int
    errors: dict[str, int]
    duration_s: float
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    goodput_slos_ms: dict[str, float]
    good_requests: int | None
    request_goodput: float | None
    cached_tokens: int | None
    cached_fraction: float | None
    max_concurrency: int
    ttft: Stats
    tpot: Stats
    itl: Stats
    e2el: Stats

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def compute_metrics(
    records: Sequence[RequestRecord],
    goodput_slos_ms: dict[str, float] | None = None,
    percentiles: Sequence[float] = DEFAULT_PERCENTILES,
) -> BenchMetrics:
    """Metrics of the measured (non-warm-up) requests.

    Duration runs from the first request sent to the last one finished, failed ones included. Token counts
    and latencies come from successful requests only; a 1-token request has no TPOT but counts as TPOT 0
    when judged against a goodput SLO, as in vLLM.
    """
    slos = dict(goodput_slos_ms or {})
    ok = [r for r in records if r.success]
    duration = max(r.end for r in records) - min(r.start for r in records) if records else 0.0

    ttfts = [r.ttft for r in ok]
    e2els = [r.latency for r in ok]
    tpots_or_none = [request_tpot(r) for r in ok]
    tpots = [t for t in tpots_or_none if t is not None]
    itls = [gap for r in ok for gap in r.itl]

    input_tokens = sum(r.prompt_tokens for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    reporting_cache = [r for r in ok if r.cached_tokens is not None]
    cached = sum(r.cached_tokens or 0 for r in reporting_cache) if reporting_cache else None
    cache_base = sum(r.prompt_tokens for r in reporting_cache)

    good: int | None = None
    if slos:
        good = 0
        for r, tpot in zip(ok, tpots_or_none, strict=True):
            observed_ms = {"ttft": r.ttft * 1000, "tpot": (tpot or 0.0) * 1000, "e2el": r.latency * 1000}
            if all(observed_ms[name] <= limit for name, limit in slos.items()):
                good += 1

    def per_second(value: float) -> float:
        return value / duration if duration > 0 else 0.0

    return BenchMetrics(
        num_requests=len(records),
        completed=len(ok),
        failed=len(records) - len(ok),
        errors=dict(Counter(r.error or "unknown" for r in records if not r.success)),
        duration_s=duration,
        total_input_tokens=input_tokens,
        total_output_tokens=output_tokens,
        request_throughput=per_second(len(ok)),
        output_throughput=per_second(output_tokens),
        total_token_throughput=per_second(input_tokens + output_tokens),
        goodput_slos_ms=slos,
        good_requests=good,
        request_goodput=None if good is None else per_second(good),
        cached_tokens=cached,
        cached_fraction=None if cached is None or cache_base == 0 else cached / cache_base,
        max_concurrency=max_concurrency(records),
        ttft=summarize(ttfts, percentiles),
        tpot=summarize(tpots, percentiles),
        itl=summarize(itls, percentiles),
        e2el=summarize(e2els, percentiles),
    )
