"""Admission control: a bounded queue in front of the workers, fast 503s beyond it, Retry-After."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import zmq.asyncio
from frontend_fake import CHAT, FakeBackend, client
from test_resilience import FAST, GreedyWorker, collect, request

from zdyn.admission import Admission, AdmissionConfig, overloaded
from zdyn.choice import Resilience
from zdyn.errors import RequestError
from zdyn.frontend.app import Frontend
from zdyn.processor import Processor
from zdyn.router.selector import RoundRobin
from zdyn.rpc import Hub


async def hold(admission: Admission, capacity: int, release: asyncio.Event, log: list[str], name: str) -> None:
    try:
        async with admission.slot(capacity):
            log.append(f"in {name}")
            await release.wait()
    except RequestError as e:
        log.append(f"{e.type} {name}")


async def test_slots_queue_in_order_and_refuse_beyond_the_bound() -> None:
    admission = Admission(AdmissionConfig(overcommit=1.0, max_queued=2, max_queue_time_s=5))
    release, log = asyncio.Event(), []
    tasks = [asyncio.create_task(hold(admission, 2, release, log, str(i))) for i in range(6)]
    await asyncio.sleep(0.05)
    assert log == ["in 0", "in 1", "overloaded 4", "overloaded 5"]  # 2 in flight, 2 queued, the rest refused
    assert (admission.in_flight, admission.queued, admission.rejected_full) == (2, 2, 2)
    release.set()
    await asyncio.gather(*tasks)
    assert log[4:] == ["in 2", "in 3"]  # first come, first served
    assert (admission.in_flight, admission.queued, admission.admitted) == (0, 0, 4)


async def test_a_request_waiting_too_long_is_refused_and_a_cancelled_one_leaves_the_queue() -> None:
    admission = Admission(AdmissionConfig(overcommit=1.0, max_queued=5, max_queue_time_s=0.1))
    release, log = asyncio.Event(), []
    holder = asyncio.create_task(hold(admission, 1, release, log, "a"))
    await asyncio.sleep(0)
    started = time.monotonic()
    await hold(admission, 1, release, log, "b")
    assert log == ["in a", "overloaded b"] and time.monotonic() - started < 1
    assert admission.rejected_timeout == 1
    waiting = asyncio.create_task(hold(admission, 1, release, log, "c"))
    await asyncio.sleep(0.01)
    waiting.cancel()
    await asyncio.gather(waiting, return_exceptions=True)
    assert admission.queued == 0
    release.set()
    await holder
    assert admission.in_flight == 0


async def test_capacity_follows_the_workers_and_zero_means_no_limit() -> None:
    admission = Admission(AdmissionConfig(overcommit=2.0, max_queued=0))
    assert admission.limit(3) == 6
    async with admission.slot(0):  # no worker known yet: admitted (the request then waits for a worker)
        assert admission.in_flight == 1
    off = Admission(AdmissionConfig(overcommit=0))
    async with off.slot(1), off.slot(1):
        assert off.in_flight == 2


@pytest.fixture
async def ctx() -> AsyncIterator[zmq.asyncio.Context]:
    context = zmq.asyncio.Context()
    yield context
    context.destroy(linger=0)


async def test_overload_is_refused_fast_and_the_admitted_requests_complete(
    unused_tcp_port: int, ctx: zmq.asyncio.Context, tiny_model: Path
) -> None:
    endpoint = f"tcp://127.0.0.1:{unused_tcp_port}"
    hub = Hub(endpoint, role="worker", liveness=FAST, ctx=ctx)
    await hub.start()
    admission = Admission(AdmissionConfig(overcommit=1.0, max_queued=4, max_queue_time_s=30))
    processor = Processor(str(tiny_model), "m", hub, RoundRobin(), Resilience(), admission)
    worker = GreedyWorker("w0", endpoint, ctx, delay_s=0.02)  # max_num_seqs 8
    await hub.wait_for_peers(1, timeout_s=5)

    async def one(i: int) -> tuple[str, float]:
        started = time.monotonic()
        try:
            await collect(processor.process(f"r{i}", request(10)))
            return "ok", time.monotonic() - started
        except RequestError as e:
            return e.type, time.monotonic() - started

    results = await asyncio.gather(*(one(i) for i in range(40)))  # 40 at once against 8 slots + 4 queued
    refused = [t for kind, t in results if kind == "overloaded"]
    assert sum(kind == "ok" for kind, _ in results) == 12 and len(refused) == 28
    assert admission.rejected_full == 28 and admission.in_flight == 0  # refused at once (queue full), no wait
    worker.spoke.close()
    await worker.task
    await hub.close()


async def test_the_frontend_answers_503_with_retry_after() -> None:
    backend = FakeBackend()
    backend.fail = overloaded("the server is at capacity")
    async with client(Frontend(backend)) as http:
        r = await http.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["type"] == "overloaded"
