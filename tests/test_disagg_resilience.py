"""No single point of failure in disaggregated prefill: a dead or draining queue, two queues, worker drain."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from helpers import eventually
from test_disagg_service import FAST, PrefillWorker, request

from zdyn.bench.procs import free_ports
from zdyn.disagg.decode import DisaggEngine, PrefillClient, PrefillUnavailable
from zdyn.disagg.policy import DisaggPolicy
from zdyn.disagg.queue_service import PrefillQueueService
from zdyn.engines.mocker import MockerConfig, MockerEngine
from zdyn.rpc import Hub


class Queue:
    """A prefill queue process stand-in, with the decode worker's client for it."""

    def __init__(self) -> None:
        jobs, workers, status = free_ports(3)
        self.hub = Hub(f"tcp://127.0.0.1:{workers}", role="prefill", liveness=FAST)
        self.service = PrefillQueueService(f"tcp://127.0.0.1:{jobs}", f"tcp://127.0.0.1:{status}", self.hub)
        self.client = PrefillClient(self.service.jobs_endpoint, self.service.status_endpoint, "127.0.0.1")
        self.workers: list[PrefillWorker] = []

    async def start(self) -> Queue:
        await self.hub.start()
        self.task = asyncio.create_task(self.service.run())
        await self.client.start()
        return self

    def add_worker(self, name: str, **kw: Any) -> PrefillWorker:
        worker = PrefillWorker(self.hub.endpoint, name, **kw)
        self.workers.append(worker)
        return worker

    async def kill(self) -> None:
        """Like kill -9 of the queue process: its sockets close, nothing more is said."""
        self.service.close()
        await asyncio.wait_for(self.task, 5)
        await self.hub.close()

    async def stop(self) -> None:
        for worker in self.workers:
            await worker.stop()
        await self.client.close()
        if not self.task.done():
            await self.kill()
        await self.hub.close()  # also when the queue's task had ended by itself
        assert self.task.exception() is None


@pytest.fixture
async def queues() -> AsyncIterator[list[Queue]]:
    started = [await Queue().start(), await Queue().start()]
    yield started
    for q in started:
        await q.stop()


async def test_a_dead_queue_s_waiting_job_is_given_up_within_a_second_not_its_timeout(queues):
    q = queues[0]
    q.add_worker("slow", delay=30.0)
    await eventually(lambda: q.client.usable)
    pending = asyncio.create_task(q.client.prefill(request("r"), timeout_s=30))
    await eventually(lambda: len(q.workers[0].jobs) == 1)
    await q.kill()
    with pytest.raises(PrefillUnavailable, match="no status"):
        await asyncio.wait_for(pending, 5)  # about 1 s after the queue's last status
    assert q.client.stats["gave_up_no_status"] == 1 and not q.client.usable


async def test_with_two_queues_a_job_moves_to_the_live_one(queues):
    a, b = queues
    a.add_worker("pa", delay=30.0)
    b.add_worker("pb", delay=0.05)
    await eventually(lambda: a.client.usable and b.client.usable)
    engine = DisaggEngine(MockerEngine(MockerConfig(block_size=32)), [a.client, b.client], DisaggPolicy(0, 8))
    pending = asyncio.create_task(engine._remote_prefill(request("r"), [a.client, b.client]))
    await eventually(lambda: len(a.workers[0].jobs) == 1)
    await a.kill()
    params = await asyncio.wait_for(pending, 5)
    assert params is not None and params["remote_engine_id"] == "pb"  # resubmitted to the second queue
    assert engine._queues() == [b.client]  # the dead queue gets no new job
    assert engine.stats["gave_up_no_status"] == 1


async def test_a_draining_queue_gives_queued_jobs_back_and_finishes_running_ones(queues):
    q = queues[0]
    q.add_worker("one", delay=0.5, capacity=1)
    await eventually(lambda: q.client.usable)
    running = asyncio.create_task(q.client.prefill(request("running"), timeout_s=10))
    await eventually(lambda: len(q.workers[0].jobs) == 1)
    queued = asyncio.create_task(q.client.prefill(request("queued"), timeout_s=10))
    await eventually(lambda: q.service.queue.queued == 1)
    drain = asyncio.create_task(q.service.drain(timeout_s=10))
    with pytest.raises(PrefillUnavailable, match="shutting down"):
        await asyncio.wait_for(queued, 2)  # handed back at once: its decode worker prefills elsewhere
    assert (await running)["remote_engine_id"] == "one"  # the running one finished
    await asyncio.wait_for(drain, 5)
    assert q.service.stats["given_back"] == 1 and q.service.stats["done"] == 1
    await asyncio.wait_for(q.task, 5)  # and the queue stopped


async def test_a_draining_prefill_worker_gets_no_new_jobs_and_finishes_its_own(queues):
    q = queues[0]
    leaving = q.add_worker("leaving", delay=0.3)
    await eventually(lambda: q.client.usable)
    first = asyncio.create_task(q.client.prefill(request("first"), timeout_s=10))
    await eventually(lambda: len(leaving.jobs) == 1)
    staying = q.add_worker("staying")
    await eventually(lambda: q.client.status.prefill_workers == 2)
    drain = asyncio.create_task(leaving.spoke.drain(timeout_s=10))
    await eventually(lambda: q.client.status.prefill_workers == 1)
    assert (await q.client.prefill(request("second"), timeout_s=5))["remote_engine_id"] == "staying"
    assert (await first)["remote_engine_id"] == "leaving"
    assert await drain == 0 and len(staying.jobs) == 1
