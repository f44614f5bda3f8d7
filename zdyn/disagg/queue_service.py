"""``zdyn prefill-queue``: the prefill queue of the disagg scenarios, as its own small process.

Decode workers PUSH ``PrefillJob``s (and ``Cancel``s) to ``--jobs-endpoint`` (PULL). Prefill workers register
at ``--prefill-workers-endpoint`` exactly as workers register at a processor (READY, heartbeats) and get jobs
over that hub's streaming RPC, at most their capacity each, the emptiest first. When a prefill worker finishes,
the queue PUSHes ``PrefillDone`` (the KV-transfer parameters) to the decode worker that asked; when one dies,
its jobs run again elsewhere. ``QueueStatus`` goes out on ``--status-endpoint`` (PUB) on every change, at most
every 20 ms, and once a second, so decode workers know the queue depth.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import time
from collections import Counter

import zmq
import zmq.asyncio

from zdyn.cli import add_common_args, liveness, parse_args, run, serve_behind_hub, serve_metrics, setup_logging
from zdyn.disagg.metrics import DisaggCollector
from zdyn.disagg.queue import Job, PrefillQueue, PrefillWorker
from zdyn.protocol import Cancel, PrefillDone, PrefillJob, QueueStatus, encode
from zdyn.rpc import Hub, Peer, RequestFailed
from zdyn.transport import MalformedCounter, decode_or_count, make_socket

log = logging.getLogger(__name__)
STATUS_INTERVAL_S = 1.0
STATUS_MIN_GAP_S = 0.02
NOTIFY_TIMEOUT_S = 2.0  # a decode worker that does not take its PrefillDone within this is gone
IDLE_REPLY_SOCKET_S = 60.0


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
        self._replies: dict[str, tuple[zmq.asyncio.Socket, float]] = {}  # reply_to -> PUSH socket, last use
        self._status_due = asyncio.Event()
        self._stop = asyncio.Event()
        workers.on_change.append(self._sync_workers)

    async def run(self) -> None:
        self._jobs = make_socket(self.ctx, zmq.PULL, self.jobs_endpoint, bind=True)
        self._status = make_socket(self.ctx, zmq.PUB, self.status_endpoint, bind=True)
        loop = asyncio.get_running_loop()
        tasks = [loop.create_task(c) for c in (self._read(), self._publish_status(), self._housekeeping())]
        try:
            await self._stop.wait()
        finally:
            for task in [*tasks, *self._running.values()]:
                task.cancel()
            await asyncio.gather(*tasks, *self._running.values(), return_exceptions=True)
            for sock, _ in self._replies.values():
                sock.close(linger=0)
            self._jobs.close(linger=0)
            self._status.close(linger=0)

    def close(self) -> None:
        self._stop.set()

    # -- decode workers -> queue
    async def _read(self) -> None:
        while True:
            msg = decode_or_count(await self._jobs.recv_multipart(), self.malformed)
            if isinstance(msg, PrefillJob):
                self._submit(msg)
            elif isinstance(msg, Cancel):
                self._cancel(msg.request_id)
            elif msg is not None:
                self.malformed.drop(f"unexpected {type(msg).__name__}")

    def _submit(self, msg: PrefillJob) -> None:
        rid = msg.request.request_id
        now = time.monotonic()
        deadline = now + msg.deadline_s if msg.deadline_s > 0 else math.inf
        if not self.queue.submit(Job(rid, msg.request.model, deadline, payload=msg, received=now)):
            self.stats["duplicate"] += 1
            log.warning("prefill job %s is already queued or running: ignored", rid)
            return
        self.stats["submitted"] += 1
        self._dispatch()

    def _cancel(self, request_id: str) -> None:
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
    def _sync_workers(self) -> None:
        live = {p.id: p for p in self.workers.live_peers()}
        for worker in [w for w in self.queue.workers if live.get(w) is not self._peers.get(w)]:
            self.queue.remove_worker(worker)  # its running jobs fail through their streams and run again
            self._peers.pop(worker, None)
        for worker, peer in live.items():
            if worker not in self.queue.workers:
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
        except RequestFailed as e:
            if e.error.status == 503 and self.queue.failed(rid):  # the worker died or its engine did: again
                self.stats["redelivered"] += 1
                log.warning("prefill job %s: %s; queued again (attempt %d)", rid, e.error.message, job.attempts + 1)
                self._running.pop(rid, None)
                self._dispatch()
                return
            error = e.error.message
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
        await self._notify(msg.reply_to, done)
        self._dispatch()

    # -- queue -> decode workers
    async def _notify(self, endpoint: str, done: PrefillDone) -> None:
        sock, _ = self._replies.get(endpoint) or (None, 0.0)
        if sock is None:
            sock = make_socket(self.ctx, zmq.PUSH, endpoint, bind=False)
            sock.setsockopt(zmq.IMMEDIATE, 1)  # queue nothing for a decode worker that is not connected
        self._replies[endpoint] = (sock, time.monotonic())
        try:
            await asyncio.wait_for(sock.send_multipart(encode(done)), NOTIFY_TIMEOUT_S)
        except TimeoutError:
            self.stats["decode_worker_gone"] += 1
            log.warning("decode worker at %s is gone: dropped the result of prefill job %s", endpoint, done.request_id)

    def _status_changed(self) -> None:
        self._status_due.set()

    async def _publish_status(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._status_due.wait(), STATUS_INTERVAL_S)
            except TimeoutError:
                pass
            self._status_due.clear()
            q = self.queue
            status = QueueStatus(
                queued=q.queued, running=q.running, prefill_workers=len(q.workers), capacity=q.capacity
            )
            await self._status.send_multipart(encode(status))
            await asyncio.sleep(STATUS_MIN_GAP_S)

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            expired = self.queue.expire(time.monotonic())
            if expired:
                self.stats["expired"] += len(expired)
                log.warning("%d prefill job(s) expired unstarted (their decode workers prefilled locally): %s",
                            len(expired), ", ".join(j.request_id for j in expired))  # fmt: skip
                self._status_changed()
            now = time.monotonic()
            for endpoint, (sock, used) in list(self._replies.items()):
                if now - used > IDLE_REPLY_SOCKET_S:
                    sock.close(linger=0)
                    del self._replies[endpoint]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zdyn prefill-queue", description=__doc__)
    parser.add_argument("--jobs-endpoint", default="tcp://*:5590", help="decode workers push jobs here (PULL)")
    parser.add_argument("--prefill-workers-endpoint", default="tcp://*:5591", help="prefill workers register here")
    parser.add_argument("--status-endpoint", default="tcp://*:5592", help="queue depth for decode workers (PUB)")
    parser.add_argument("--max-attempts", type=int, default=2, help="runs of a job whose prefill worker died")
    parser.add_argument(
        "--max-jobs-per-worker",
        type=int,
        default=2,
        help="jobs a prefill worker runs at once (0: its max_num_seqs); beyond that they wait in the queue, "
        "which is the depth decode workers compare with --max-prefill-queue-size",
    )
    parser.add_argument("--metrics-port", type=int, default=0, help="serve Prometheus metrics on this port")
    add_common_args(parser)
    return parser


async def serve(args: argparse.Namespace) -> int:
    workers = Hub(args.prefill_workers_endpoint, role="prefill", liveness=liveness(args))
    service = PrefillQueueService(
        args.jobs_endpoint, args.status_endpoint, workers, max_attempts=args.max_attempts,
        max_jobs_per_worker=args.max_jobs_per_worker,
    )  # fmt: skip
    if args.metrics_port:
        serve_metrics(args.metrics_port, DisaggCollector(service=service))
    banner = (
        f"prefill queue: jobs at {args.jobs_endpoint}, prefill workers at {args.prefill_workers_endpoint}, "
        f"status at {args.status_endpoint}"
    )
    return await serve_behind_hub(service, workers, banner)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv, "PrefillQueue")
    setup_logging(args)
    return run(serve(args))


if __name__ == "__main__":
    raise SystemExit(main())
