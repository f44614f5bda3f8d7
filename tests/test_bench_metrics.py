"""Metric arithmetic and arrival schedules of zdyn.bench, checked against hand-computed values."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from zdyn.bench.arrivals import gamma_offsets, trace_offset
from zdyn.bench.datasets import RandomDataset, TraceDataset
from zdyn.bench.metrics import compute_metrics, max_concurrency, parse_goodput, request_tpot, summarize
from zdyn.bench.prompts import RequestOptions
from zdyn.bench.records import RequestRecord
from zdyn.bench.report import format_summary
from zdyn.bench.runner import LoadPoint, RunSettings, schedule
from zdyn.bench.traces import TraceEntry


def rec(
    index: int,
    start: float,
    end: float,
    *,
    ttft: float = 0.0,
    itl: list[float] | None = None,
    out: int = 0,
    prompt: int = 0,
    cached: int | None = None,
    error: str | None = None,
) -> RequestRecord:
    return RequestRecord(
        index=index,
        success=error is None,
        error=error,
        start=start,
        end=end,
        ttft=ttft,
        itl=itl or [],
        output_tokens=out,
        prompt_tokens=prompt,
        cached_tokens=cached,
    )


@pytest.fixture
def records() -> list[RequestRecord]:
    return [
        rec(0, 0.00, 0.20, ttft=0.10, itl=[0.02, 0.03], out=3, prompt=10, cached=5),
        rec(1, 0.05, 0.30, ttft=0.20, out=1, prompt=20),
        rec(2, 0.10, 0.50, ttft=0.05, itl=[0.01, 0.01, 0.01, 0.05], out=5, prompt=30, cached=15),
        rec(3, 0.20, 1.00, error="http_500"),
        rec(4, 0.30, 0.60, error="timeout"),
    ]


def test_counts_duration_and_throughputs(records: list[RequestRecord]) -> None:
    m = compute_metrics(records)
    assert (m.num_requests, m.completed, m.failed) == (5, 3, 2)
    assert m.errors == {"http_500": 1, "timeout": 1}
    assert m.duration_s == pytest.approx(1.0)  # first send (0.0) to last end (1.0, a failed request)
    assert m.total_input_tokens == 60
    assert m.total_output_tokens == 9
    assert m.request_throughput == pytest.approx(3.0)
    assert m.output_throughput == pytest.approx(9.0)
    assert m.total_token_throughput == pytest.approx(69.0)
    assert m.cached_tokens == 20
    assert m.cached_fraction == pytest.approx(20 / 40)  # only requests reporting cached tokens count
    assert m.max_concurrency == 3
    assert m.good_requests is None and m.request_goodput is None


def test_latency_stats(records: list[RequestRecord]) -> None:
    m = compute_metrics(records, percentiles=(50, 90, 99))
    # TTFT ms [100, 200, 50]
    assert m.ttft.count == 3
    assert m.ttft.mean == pytest.approx(350 / 3)
    assert m.ttft.median == pytest.approx(100)
    assert m.ttft.std == pytest.approx(
        math.sqrt(((100 - 350 / 3) ** 2 + (200 - 350 / 3) ** 2 + (50 - 350 / 3) ** 2) / 3)
    )
    assert m.ttft.percentiles["p90"] == pytest.approx(180)  # 100 + 0.8 * (200 - 100)
    assert m.ttft.percentiles["p99"] == pytest.approx(198)
    # TPOT ms: (200-100)/2 = 50 and (400-50)/4 = 87.5; the 1-token request has none
    assert m.tpot.count == 2
    assert m.tpot.mean == pytest.approx(68.75)
    assert m.tpot.percentiles["p90"] == pytest.approx(83.75)
    # ITL pooled over requests: [20, 30, 10, 10, 10, 50]
    assert m.itl.count == 6
    assert m.itl.mean == pytest.approx(130 / 6)
    assert m.itl.median == pytest.approx(15)
    assert m.itl.percentiles["p90"] == pytest.approx(40)
    assert m.itl.percentiles["p99"] == pytest.approx(49)
    # E2EL ms [200, 250, 400]
    assert m.e2el.mean == pytest.approx(850 / 3)
    assert m.e2el.median == pytest.approx(250)
    assert m.e2el.max == pytest.approx(400)


@pytest.mark.parametrize(
    ("slos", "good"),
    [
        (["ttft:150", "tpot:60"], 1),  # r0 only; r1 TTFT 200, r2 TPOT 87.5
        (["e2el:300"], 2),  # r0 200, r1 250
        (["tpot:10"], 1),  # only the 1-token request (TPOT counted as 0)
        (["ttft:1000", "tpot:1000", "e2el:1000"], 3),
        (["ttft:10"], 0),
    ],
)
def test_goodput_requires_all_slos(records: list[RequestRecord], slos: list[str], good: int) -> None:
    m = compute_metrics(records, parse_goodput(slos))
    assert m.good_requests == good
    assert m.request_goodput == pytest.approx(good / 1.0)


def test_request_tpot() -> None:
    assert request_tpot(rec(0, 1.0, 2.0, ttft=0.2, out=5)) == pytest.approx(0.2)
    assert request_tpot(rec(0, 1.0, 2.0, ttft=0.2, out=1)) is None


def test_parse_goodput() -> None:
    assert parse_goodput(["TTFT:500", "tpot:12.5"]) == {"ttft": 500.0, "tpot": 12.5}
    for bad in (["itl:5"], ["ttft"], ["ttft:abc"], ["e2el:-1"]):
        with pytest.raises(ValueError):
            parse_goodput(bad)


def test_max_concurrency_touching_intervals_do_not_overlap() -> None:
    assert max_concurrency([rec(0, 0, 1), rec(1, 1, 2), rec(2, 2, 3)]) == 1
    assert max_concurrency([rec(0, 0, 3), rec(1, 1, 2), rec(2, 1.5, 4)]) == 3
    assert max_concurrency([]) == 0


def test_summarize_cdf_and_empty() -> None:
    s = summarize([0.001 * v for v in range(1, 102)])  # 1..101 ms
    assert len(s.cdf) == 101
    assert s.cdf[0] == pytest.approx(1) and s.cdf[50] == pytest.approx(51) and s.cdf[100] == pytest.approx(101)
    empty = summarize([])
    assert empty.count == 0 and empty.mean == 0.0 and empty.cdf == []


def test_no_records_and_all_failed() -> None:
    assert compute_metrics([]).duration_s == 0.0
    m = compute_metrics([rec(0, 0, 2, error="connection")])
    assert m.completed == 0 and m.request_throughput == 0.0 and m.ttft.count == 0 and m.cached_fraction is None


def test_summary_printout(records: list[RequestRecord]) -> None:
    text = format_summary(compute_metrics(records, {"ttft": 150.0}), "rate=2")
    assert "Successful requests:                     3" in text
    assert "http_500:" in text and "timeout:" in text
    assert "Mean TTFT (ms):                          116.67" in text
    assert "P99 ITL (ms):                            49.00" in text
    assert "Request goodput (req/s):                 2.00" in text  # r0 and r2 meet TTFT <= 150 ms
    assert "Cached prompt tokens (%):                50.00" in text


def _gaps(rate: float, burstiness: float, n: int, seed: int = 7) -> np.ndarray:
    return np.diff(list(itertools.islice(gamma_offsets(rate, burstiness, seed), n + 1)))


def test_poisson_mean_rate() -> None:
    offsets = list(itertools.islice(gamma_offsets(10.0, 1.0, seed=1), 20001))
    assert offsets[0] == 0.0
    assert all(b >= a for a, b in itertools.pairwise(offsets))
    rate = 20000 / offsets[-1]
    assert rate == pytest.approx(10.0, rel=0.03)
    gaps = np.diff(offsets)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.05)  # exponential gaps: CV = 1


def test_burstiness_orders_variance_not_mean() -> None:
    cv2 = {}
    for b in (0.25, 1.0, 4.0):
        gaps = _gaps(5.0, b, 20000)
        assert gaps.mean() == pytest.approx(0.2, rel=0.05)
        cv2[b] = gaps.var() / gaps.mean() ** 2
        assert cv2[b] == pytest.approx(1 / b, rel=0.1)
    assert cv2[0.25] > cv2[1.0] > cv2[4.0]


def test_schedules_are_seeded() -> None:
    a = list(itertools.islice(gamma_offsets(3.0, 1.0, seed=5), 50))
    assert a == list(itertools.islice(gamma_offsets(3.0, 1.0, seed=5), 50))
    assert a != list(itertools.islice(gamma_offsets(3.0, 1.0, seed=6), 50))
    assert list(itertools.islice(gamma_offsets(math.inf), 5)) == [0.0] * 5
    with pytest.raises(ValueError):
        next(gamma_offsets(0.0))


def test_trace_timestamps_scaled_by_speed() -> None:
    assert trace_offset(3.0, 2.0) == pytest.approx(1.5)
    assert trace_offset(3.0, 0.5) == pytest.approx(6.0)
    entries = tuple(TraceEntry(ms, 10, 2) for ms in (0.0, 0.0, 250.0, 1000.0))
    settings = RunSettings(path="/v1/completions", options=RequestOptions("m"))
    got = [t for _, t in schedule(TraceDataset(entries).requests(0), LoadPoint(speed=4.0), settings)]
    assert got == pytest.approx([0.0, 0.0, 0.0625, 0.25])


def test_schedule_uses_gamma_process_for_synthetic_datasets() -> None:
    settings = RunSettings(path="/v1/completions", options=RequestOptions("m"), seed=3, burstiness=0.5)
    got = [t for _, t in itertools.islice(schedule(RandomDataset(8, 2).requests(0), LoadPoint(2.0), settings), 20)]
    assert got == pytest.approx(list(itertools.islice(gamma_offsets(2.0, 0.5, 3), 20)))
