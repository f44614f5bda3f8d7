"""Drives the load: arrival schedule, concurrency cap, session order, warm-up, and sweeps over load points."""

from __future__ import annotations

import asyncio
import itertools
import math
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from tqdm import tqdm

from zdyn.bench.arrivals import gamma_offsets, trace_offset
from zdyn.bench.client import OpenAIClient
from zdyn.bench.datasets import Dataset
from zdyn.bench.metrics import BenchMetrics, compute_metrics
from zdyn.bench.prompts import History, PromptBuilder, RequestOptions
from zdyn.bench.records import BenchRequest, RequestRecord
from zdyn.bench.tokens import TokenSynth

WARMUP_SALT = 1_000_003
Scheduled = tuple[BenchRequest, float]


@dataclass(slots=True, frozen=True)
class LoadPoint:
    """One point of a sweep: open-loop rate (inf = all at once), closed-loop cap, trace speed-up."""

    request_rate: float = math.inf
    concurrency: int | None = None
    speed: float | None = None

    def label(self) -> str:
        parts = []
        if self.speed is not None:
            parts.append(f"speed={self.speed:g}")
        elif not math.isinf(self.request_rate) or self.concurrency is None:
            parts.append(f"rate={self.request_rate:g}")
        if self.concurrency is not None:
            parts.append(f"concurrency={self.concurrency}")
        return " ".join(parts)

    def to_json(self) -> dict[str, float | int | str | None]:
        rate: float | str = "inf" if math.isinf(self.request_rate) else self.request_rate
        return {"request_rate": rate, "concurrency": self.concurrency, "speed": self.speed}


@dataclass(slots=True)
class RunSettings:
    path: str
    options: RequestOptions
    num_requests: int | None = None
    duration_s: float | None = None
    burstiness: float = 1.0
    num_warmups: int = 0
    seed: int = 0
    history: History = "model"
    reuse_prompts: bool = False
    progress: bool = True
    goodput_slos_ms: dict[str, float] = field(default_factory=dict)
    percentiles: Sequence[float] = (50.0, 90.0, 99.0)


@dataclass(slots=True)
class PointResult:
    point: LoadPoint
    origin: float
    records: list[RequestRecord]
    warmup_records: list[RequestRecord]
    metrics: BenchMetrics


def schedule(requests: Iterator[BenchRequest], point: LoadPoint, settings: RunSettings) -> Iterator[Scheduled]:
    """Pairs each request with its send offset: its trace time, else the Gamma/Poisson process."""
    arrivals: Iterator[float] | None = None
    for request in requests:
        if request.arrival_s is not None:
            yield request, trace_offset(request.arrival_s, point.speed or 1.0)
        else:
            if arrivals is None:
                arrivals = gamma_offsets(point.request_rate, settings.burstiness, settings.seed)
            yield request, next(arrivals)


class _Run:
    """State of one measured or warm-up phase."""

    def __init__(
        self,
        client: OpenAIClient,
        builder: PromptBuilder,
        path: str,
        concurrency: int | None,
        bar: tqdm | None,
    ) -> None:
        self.client = client
        self.builder = builder
        self.path = path
        self.slots = asyncio.Semaphore(concurrency) if concurrency else None
        self.bar = bar
        self.records: list[RequestRecord] = []
        self.turn_done: dict[int, asyncio.Event] = {}
        self.tasks: set[asyncio.Task[None]] = set()

    async def dispatch(
        self, scheduled: Iterator[Scheduled], *, duration_s: float | None = None, with_history: bool = True
    ) -> float:
        """Sends every request at its offset (waiting for a slot when capped); returns the start time."""
        start = time.perf_counter()
        for request, offset in scheduled:
            if duration_s is not None and offset >= duration_s:
                break
            delay = start + offset - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if self.slots is not None:
                await self.slots.acquire()
                if duration_s is not None and time.perf_counter() - start >= duration_s:
                    self._release()  # the run ended while this request waited for a slot
                    break
            previous = None
            done = asyncio.Event()
            if with_history and request.session is not None:
                previous = self.turn_done.get(request.session)
                self.turn_done[request.session] = done
            task = asyncio.create_task(self._one(request, start + offset, previous, done, with_history))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        while self.tasks:
            await asyncio.gather(*self.tasks)
        return start

    def _release(self) -> None:
        if self.slots is not None:
            self.slots.release()

    async def _one(
        self,
        request: BenchRequest,
        scheduled: float,
        previous: asyncio.Event | None,
        done: asyncio.Event,
        with_history: bool,
    ) -> None:
        try:
            if previous is not None:
                await previous.wait()  # a turn needs the answer to the previous turn
            body = self.builder.body(request, with_history=with_history)
            keep_text = with_history and request.session is not None and self.builder.history_mode == "model"
            record = await self.client.stream(self.path, body, request.index, request.prompt_len, keep_text=keep_text)
            record.scheduled = scheduled
            if with_history:
                self.builder.remember(request, record)
            self.records.append(record)
            if self.bar is not None:
                self.bar.update(1)
        finally:
            done.set()
            self._release()


def _expected_count(dataset: Dataset, settings: RunSettings) -> int | None:
    size = dataset.size()
    if size is None:
        return settings.num_requests
    return size if settings.num_requests is None else min(size, settings.num_requests)


async def run_point(
    client: OpenAIClient,
    dataset: Dataset,
    synth: TokenSynth,
    point: LoadPoint,
    settings: RunSettings,
    salt: int = 0,
) -> PointResult:
    """Warm-up (excluded from metrics), then the measured run of one load point."""
    warmup_records: list[RequestRecord] = []
    if settings.num_warmups > 0:
        warmups = list(itertools.islice(dataset.requests(settings.seed), settings.num_warmups))
        warm = _Run(
            client,
            PromptBuilder(synth.with_salt(WARMUP_SALT + salt), settings.options, settings.history),
            settings.path,
            point.concurrency or len(warmups),
            None,
        )
        await warm.dispatch(((r, 0.0) for r in warmups), with_history=False)
        warmup_records = warm.records

    requests = itertools.islice(dataset.requests(settings.seed), settings.num_requests)
    bar = tqdm(
        total=_expected_count(dataset, settings),
        desc=point.label(),
        unit="req",
        file=sys.stderr,
        disable=not settings.progress,
        dynamic_ncols=True,
    )
    run = _Run(
        client,
        PromptBuilder(synth.with_salt(salt), settings.options, settings.history),
        settings.path,
        point.concurrency,
        bar,
    )
    try:
        origin = await run.dispatch(schedule(requests, point, settings), duration_s=settings.duration_s)
    finally:
        bar.close()
    records = sorted(run.records, key=lambda r: r.index)
    metrics = compute_metrics(records, settings.goodput_slos_ms, settings.percentiles)
    return PointResult(point, origin, records, warmup_records, metrics)


async def run_sweep(
    client: OpenAIClient,
    dataset: Dataset,
    synth: TokenSynth,
    points: Sequence[LoadPoint],
    settings: RunSettings,
) -> list[PointResult]:
    """Runs the points in order. Unless prompts are reused, each point gets fresh token content (same
    lengths), so a point cannot hit prefix-cache entries left by the one before."""
    results = []
    for i, point in enumerate(points):
        salt = 0 if settings.reuse_prompts else i
        results.append(await run_point(client, dataset, synth, point, settings, salt))
    return results
