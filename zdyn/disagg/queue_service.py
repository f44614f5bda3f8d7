"""The prefill queue of the disagg scenarios as a service (run by ``zdyn prefill-queue``).

Decode workers send ``PrefillJob``s (and ``Cancel``s of their own jobs) to ``--jobs-endpoint`` (a ROUTER that admits
worker keys only, with keys). Prefill workers register
at ``--prefill-workers-endpoint`` exactly as workers register at a processor (READY, heartbeats) and get jobs
over that hub's streaming RPC, at most their capacity each, the emptiest first. When a prefill worker finishes,
the queue answers ``PrefillDone`` (the KV-transfer parameters) on the connection the job came in on (it never
dials an address a peer gives it); when one dies,
its jobs run again elsewhere. ``QueueStatus`` goes out on ``--status-endpoint`` (PUB) on every change, at most
every 20 ms, and once a second, so decode workers know the queue depth.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import Counter

import zmq
import zmq.asyncio

from zdyn.disagg.queue import Job, PrefillQueue, PrefillWorker
from zdyn.errors import RequestError
from zdyn.protocol import Cancel, Message, PrefillDone, PrefillJob, QueueStatus, encode
from zdyn.rpc import Hub, Peer, PeerEvent
from zdyn.transport import MalformedCounter, MessageHandler, make_socket, read_messages, send

log = logging.getLogger(__name__)
STATUS_INTERVAL_S = 0.25  # decode workers give a queue up after 1 s without status
STATUS_MIN_GAP_S = 0.02
NOTIFY_TIMEOUT_S = 2.0  # a decode worker that does not take its PrefillDone within this is gone


class PrefillQueueService:
    def __init__(
        self,
        jobs_endpoint: str,
        status_endpoint: str,
        workers: Hub,
        *,
        max_attempts: int = 2,
        max_jobs_per_worker: int = 0,
        ctx: zmq.asyncio.Context | None = None,
    ) -> None:
        self.jobs_endpoint = jobs_endpoint
        self.status_endpoint = status_endpoint
        self.workers = workers
        self.max_jobs_per_worker = max_jobs_per_worker
        self.ctx = ctx or zmq.asyncio.Context.instance()
        self.queue = PrefillQueue(max_attempts)
        self.stats: Counter[str] = Counter()
        self.malformed = MalformedCounter(f"prefill queue {jobs_endpoint}")
        self._peers: dict[str, Peer] = {}
        self._running: dict[str, asyncio.Task[None]] = {}
        self._owners: dict[str, bytes] = {}  # request id -> the connection (routing id) that submitted it
        self._status_due = asyncio.Event()
        self._notifying: set[asyncio.Task[None]] = set()
        self._stop = asyncio.Event()
        self.draining = False
        workers.listeners.append(self._on_worker)

    async def run(self) -> None:
        self._jobs = make_socket(self.ctx, zmq.ROUTER, self.jobs_endpoint, bind=True, allow=("worker",))
        self._status = make_socket(self.ctx, zmq.PUB, self.status_endpoint, bind=True, allow=("worker",))
        loop = asyncio.get_running_loop()
        handlers: dict[type[Message], MessageHandler] = {PrefillJob: self._submit, Cancel: self._on_cancel}
        reader = read_messages(self._jobs, handlers, self.malformed, routed=True)
        tasks = [loop.create_task(c) for c in (reader, self._publish_status(), self._housekeeping())]
        try:
            await self._stop.wait()
        finally:
            pending = [*tasks, *self._running.values(), *self._notifying]
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            self._jobs.close(linger=0)
            self._status.close(linger=0)

    def close(self) -> None:
        self._stop.set()

    async def drain(self, timeout_s: float) -> None:
        """Shut down gracefully: decode workers hear that this queue takes no new jobs, queued jobs go back
        to them at once (they use another queue or prefill locally), running ones may finish for up to
        ``timeout_s``."""
        self.draining = True
        self._give_back("the prefill queue is shutting down")
        log.info("prefill queue draining: %d job(s) running, up to %.0fs", len(self._running), timeout_s)
        if self._running:
            await asyncio.wait(list(self._running.values()), timeout=timeout_s)
        await asyncio.sleep(STATUS_INTERVAL_S)  # a last status and the results leave before the sockets close
        self.close()

    def _give_back(self, why: str) -> None:
        """Hand every queued job back to its decode worker with ``why`` (it prefills elsewhere)."""
        for job in self.queue.queued_jobs():
            self.queue.cancel(job.request_id)
            self.stats["given_back"] += 1
            self._refuse(self._owners.pop(job.request_id, b""), job.payload, why)
        self._status_changed()

    def _refuse(self, owner: bytes, msg: PrefillJob, why: str) -> None:
        done = PrefillDone(request_id=msg.request.request_id, error=why)
        task = asyncio.get_running_loop().create_task(self._notify(owner, done))
        self._notifying.add(task)
        task.add_done_callback(self._notifying.discard)

    # -- decode workers -> queue
    def _submit(self, identity: bytes, msg: PrefillJob) -> None:
        rid = msg.request.request_id
        if self.draining or not self.queue.workers:  # it would only wait: its decode worker prefills elsewhere
            self.stats["refused"] += 1
            self._refuse(
                identity, msg, "the prefill queue is draining" if self.draining else "no prefill worker is connected"
            )
            return
        now = time.monotonic()
        deadline = now + msg.deadline_s if msg.deadline_s > 0 else math.inf
        if not self.queue.submit(Job(rid, msg.request.model, deadline, payload=msg, received=now)):
            self.stats["duplicate"] += 1
            log.warning("prefill job %s is already queued or running: ignored", rid)
            return
        self._owners[rid] = identity
        self.stats["submitted"] += 1
        self._dispatch()

    def _on_cancel(self, identity: bytes, msg: Cancel) -> None:
        request_id = msg.request_id
        if self._owners.get(request_id) != identity:  # unknown, over, or another decode worker's job
            self.stats["cancel_ignored"] += 1
            return
        del self._owners[request_id]
        job = self.queue.cancel(request_id)
        if job is None:
            return
        self.stats["cancelled"] += 1
        task = self._running.pop(request_id, None)
        if task is not None:
            task.cancel()  # leaving the stream sends Cancel: the prefill worker aborts it
        log.info("prefill job %s cancelled (%s)", request_id, "running" if task else "queued")
        self._status_changed()

    # -- queue -> prefill workers
    def _on_worker(self, event: PeerEvent) -> None:
        peer, worker = event.peer, event.peer.id
        if self._peers.get(worker) is not None and (event.kind == "joined" or self._peers[worker] is peer):
            self.queue.remove_worker(worker)  # its running jobs fail through their streams and run again
            del self._peers[worker]
        if not self.queue.workers and self.queue.queued:
            self._give_back("the last prefill worker left")
        if event.kind == "joined":
            capacity = peer.ready.max_num_seqs or 1
            if self.max_jobs_per_worker:
                capacity = min(capacity, self.max_jobs_per_worker)
            self.queue.add_worker(worker, peer.ready.model, capacity)
            self._peers[worker] = peer
        self._dispatch()

    def _dispatch(self) -> None:
        while (assigned := self.queue.assign(time.monotonic())) is not None:
            job, worker = assigned
            log.info("prefill job %s -> %s (attempt %d, %d queued)", job.request_id, worker.id, job.attempts,
                     self.queue.queued)  # fmt: skip
            self._running[job.request_id] = asyncio.get_running_loop().create_task(self._run(job, worker))
        self._status_changed()

    async def _run(self, job: Job, worker: PrefillWorker) -> None:
        msg: PrefillJob = job.payload
        rid = msg.request.request_id
        started = time.perf_counter()
        dispatched = time.monotonic()
        peer = self._peers[worker.id]
        params, error, worker_s = None, "", None
        try:
            async for delta in self.workers.stream(peer, msg.request):
                params = delta.kv_transfer_params or params
                if delta.job_s is not None:
                    worker_s = delta.job_s
            if params is None:
                error = f"prefill worker {worker.id} returned no kv_transfer_params"
        except RequestError as e:
            if e.status == 503 and self.queue.failed(rid):  # the worker died or its engine did: again
                self.stats["redelivered"] += 1
                log.warning("prefill job %s: %s; queued again (attempt %d)", rid, e.message, job.attempts + 1)
                self._running.pop(rid, None)
                self._dispatch()
                return
            error = e.message
        self._running.pop(rid, None)
        if self.queue.done(rid) is None and not error:  # failed for good above: already removed
            error = "prefill failed"
        self.stats["failed" if error else "done"] += 1
        log.info("prefill job %s on %s: %s in %.3fs", rid, worker.id, error or "done", time.perf_counter() - started)
        # Queued + the prefill worker's own time: what follows (the result's way back here, a stall of this
        # process) counts as time the KV may have been held.
        prefill_s = dispatched - job.received + worker_s if worker_s is not None else time.monotonic() - job.received
        done = PrefillDone(request_id=rid, kv_transfer_params=params, prefill_worker=worker.id, error=error,
                           prefill_s=prefill_s, kv_lease_s=peer.ready.kv_lease_s)  # fmt: skip
        await self._notify(self._owners.pop(rid, b""), done)
        self._dispatch()

    # -- queue -> decode workers
    async def _notify(self, owner: bytes, done: PrefillDone) -> None:
        """Answer on the submitting connection; a decode worker that has gone (or never was) just misses it."""
        try:
            await asyncio.wait_for(send(self._jobs, done, owner), NOTIFY_TIMEOUT_S)
        except (TimeoutError, zmq.ZMQError):
            self.stats["decode_worker_gone"] += 1
            log.warning("the decode worker of prefill job %s is gone: dropped its result", done.request_id)

    def _status_changed(self) -> None:
        self._status_due.set()

    async def _publish_status(self) -> None:
        while True:
            # asyncio.timeout, not wait_for: wait_for in Python 3.11 can swallow a cancellation that arrives
            # as the event is set, and this loop would then never end
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(STATUS_INTERVAL_S):
                    await self._status_due.wait()
            self._status_due.clear()
            q = self.queue
            status = QueueStatus(
                queued=q.queued, running=q.running, prefill_workers=len(q.workers), capacity=q.capacity,
                workers=[f"{p.id}@{p.ready.host or '?'}" for p in self._peers.values()], draining=self.draining,
            )  # fmt: skip
            await self._status.send_multipart(encode(status))
            await asyncio.sleep(STATUS_MIN_GAP_S)

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            for rid in [r for r in self._owners if self.queue.job(r) is None]:  # expired here or when assigning
                del self._owners[rid]
            expired = self.queue.expire(time.monotonic())
            if expired:
                self.stats["expired"] += len(expired)
                log.warning("%d prefill job(s) expired unstarted (their decode workers prefilled locally): %s",
                            len(expired), ", ".join(j.request_id for j in expired))  # fmt: skip
                self._status_changed()
