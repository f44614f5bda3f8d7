"""The prefill queue process's logic and the decode worker's client on loopback, with scripted prefill workers."""

from __future__ import annotations

import asyncio

import pytest
import zmq
import zmq.asyncio
from helpers import FAST, eventually

from zdyn.bench.procs import free_ports
from zdyn.disagg.decode import PrefillClient, PrefillUnavailable
from zdyn.disagg.queue_service import PrefillQueueService
from zdyn.protocol import Cancel, Delta, Finish, Generate, PrefillDone, Ready, encode
from zdyn.rpc import Hub, Spoke


class PrefillWorker:
    """A scripted prefill worker: answers after ``delay`` with params naming itself; records what it saw."""

    def __init__(
        self, endpoint: str, name: str, delay: float = 0.0, capacity: int = 4, kv_lease_s: float = 0.0
    ) -> None:
        self.name, self.delay = name, delay
        self.jobs: list[Generate] = []
        self.cancelled: list[str] = []
        ready = Ready(peer_id=name, role="prefill", model="m", max_num_seqs=capacity, kv_lease_s=kv_lease_s)
        self.spoke = Spoke([endpoint], ready, self.handle, liveness=FAST)
        self.task = asyncio.create_task(self.spoke.run())

    async def handle(self, request):
        self.jobs.append(request)
        try:
            await asyncio.sleep(self.delay)
        except asyncio.CancelledError:
            self.cancelled.append(request.request_id)
            raise
        yield Delta(request_id=request.request_id, token_ids=[7], finish=Finish(reason="length"),
                    kv_transfer_params={"remote_engine_id": self.name, "n": len(request.token_ids)})  # fmt: skip

    async def stop(self) -> None:
        self.spoke.close()
        await asyncio.gather(self.task, return_exceptions=True)


@pytest.fixture
async def queue():
    jobs, workers_port, status = free_ports(3)
    hub = Hub(f"tcp://127.0.0.1:{workers_port}", role="prefill", liveness=FAST)
    service = PrefillQueueService(f"tcp://127.0.0.1:{jobs}", f"tcp://127.0.0.1:{status}", hub)
    await hub.start()
    run = asyncio.create_task(service.run())
    client = PrefillClient(service.jobs_endpoint, service.status_endpoint, "127.0.0.1")
    client.released = []  # type: ignore[attr-defined]

    async def release(request_id: str, params: dict) -> None:
        client.released.append((request_id, params))  # type: ignore[attr-defined]

    client.release = release
    await client.start()
    started: list[PrefillWorker] = []

    def add_worker(name: str, **kw) -> PrefillWorker:
        w = PrefillWorker(hub.endpoint, name, **kw)
        started.append(w)
        return w

    yield service, client, add_worker
    for w in started:
        await w.stop()
    await client.close()
    service.close()
    await run
    await hub.close()


def request(rid: str, n: int = 100) -> Generate:
    return Generate(request_id=rid, token_ids=list(range(n)), model="m")


async def test_a_job_runs_on_a_prefill_worker_and_its_params_come_back(queue):
    service, client, add_worker = queue
    worker = add_worker("p0")
    await eventually(lambda: client.queue_live and client.status.prefill_workers == 1)
    params = await client.prefill(request("r1"), timeout_s=5)
    assert params == {"remote_engine_id": "p0", "n": 100}
    [job] = worker.jobs
    assert job.sampling.max_tokens == 1 and job.kv_transfer_params == {"do_remote_decode": True}
    assert service.stats["done"] == 1 and service.queue.running == 0


async def test_a_killed_prefill_worker_s_job_completes_elsewhere(queue):
    service, client, add_worker = queue
    doomed = add_worker("doomed", delay=30.0)
    await eventually(lambda: client.status.prefill_workers == 1)
    pending = asyncio.create_task(client.prefill(request("r"), timeout_s=10))
    await eventually(lambda: len(doomed.jobs) == 1)
    add_worker("healthy")
    await eventually(lambda: client.status.prefill_workers == 2)
    doomed.task.cancel()  # dies without a word: its socket closes
    doomed.spoke.close()
    params = await pending
    assert params["remote_engine_id"] == "healthy" and service.stats["redelivered"] == 1


async def test_depth_and_cancel_while_queued_and_while_running(queue):
    service, client, add_worker = queue
    busy = add_worker("busy", delay=30.0, capacity=1)
    await eventually(lambda: client.status.prefill_workers == 1)
    for i in range(4):  # one runs, three wait, and the depth shows it
        asyncio.create_task(client.prefill(request(f"q{i}"), timeout_s=2.0)).add_done_callback(lambda f: f.exception())
    await eventually(lambda: client.status.queued == 3)
    await eventually(lambda: service.queue.queued == 0, timeout_s=6)  # the client gave up at its deadline:
    assert service.stats["cancelled"] + service.stats["expired"] >= 3  # its Cancel or the deadline removed each
    await busy.stop()
    await eventually(lambda: client.status.prefill_workers == 0)

    slow = add_worker("slow", delay=30.0)
    await eventually(lambda: client.status.prefill_workers == 1)
    task = asyncio.create_task(client.prefill(request("c"), timeout_s=10))
    await eventually(lambda: len(slow.jobs) == 1)
    task.cancel()  # the HTTP client went away
    await eventually(lambda: slow.cancelled == ["c"])
    await eventually(lambda: service.queue.running == 0 and client.status.running == 0)


async def test_timeouts_bad_frames_and_stray_results_are_handled(queue):
    service, client, add_worker = queue
    with pytest.raises(PrefillUnavailable, match="no prefill worker"):  # refused at once, not after 30 s
        await client.prefill(request("nobody-serves"), timeout_s=30)
    assert service.stats["refused"] == 1
    raw = zmq.asyncio.Context.instance().socket(zmq.DEALER)
    raw.connect(service.jobs_endpoint)
    try:
        await raw.send_multipart([b"\x40", b"\xc1garbage"])
        await raw.send_multipart([b"junk"])
        await raw.send_multipart(encode(Cancel(request_id="not-mine")))  # nobody's job: ignored
        await eventually(lambda: service.malformed.count == 2 and service.stats["cancel_ignored"] == 1)
        # a result for a request that already ended (it came in on the client's own connection)
        client._on_result(b"", PrefillDone(request_id="finished-long-ago", kv_transfer_params={"x": 1}))
        assert client.stats["unknown_result"] == 1
        await eventually(lambda: client.released == [("finished-long-ago", {"x": 1})])  # its KV is freed now
        add_worker("p0")
        await eventually(lambda: client.status.prefill_workers == 1)
        assert (await client.prefill(request("after"), timeout_s=5))["remote_engine_id"] == "p0"
    finally:
        raw.close(linger=0)


async def test_a_result_older_than_half_its_kv_lease_is_released_not_used(queue):
    service, client, add_worker = queue
    # The only prefill worker is busy, so this job waits. A result arrives 0.3 s after the push and says none of
    # that was queueing or prefilling (prefill_s=0), against a 0.4 s lease: its KV may be gone, and reading it
    # could return blocks the prefill worker has reused. So the decode worker prefills locally and frees that KV.
    busy = add_worker("busy", delay=30.0, capacity=1)
    await eventually(lambda: client.status.prefill_workers == 1)
    blocker = asyncio.create_task(client.prefill(request("blocker"), timeout_s=5))
    await eventually(lambda: len(busy.jobs) == 1)
    pending = asyncio.create_task(client.prefill(request("old"), timeout_s=5))
    await asyncio.sleep(0.3)
    late = PrefillDone(request_id="old", kv_transfer_params={"b": [1]}, prefill_worker="px", kv_lease_s=0.4)
    client._on_result(b"", late)
    with pytest.raises(PrefillUnavailable, match="lease"):
        await pending
    await eventually(lambda: client.released == [("old", {"b": [1]})])
    assert client.stats["released"] == 1
    blocker.cancel()
    await busy.stop()
    await eventually(lambda: client.status.prefill_workers == 0)

    # A prefill that itself takes longer than half the lease is young when it arrives: the queue reports the
    # time the job spent queued and prefilling, and only the rest counts.
    add_worker("slow", delay=0.3, kv_lease_s=0.4)
    await eventually(lambda: client.status.prefill_workers == 1)
    assert (await client.prefill(request("young"), timeout_s=5))["remote_engine_id"] == "slow"
