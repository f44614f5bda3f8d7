"""The decode worker's side of disaggregated prefill: decide, push the job, wait for its KV, decode.

``DisaggEngine`` wraps the worker's engine. For each request it asks ``DisaggPolicy`` whether to prefill
remotely (long uncached prompt, room in the prefill queue). If so, ``PrefillClient`` PUSHes a ``PrefillJob``
to the prefill queue and waits for the ``PrefillDone`` on its own PULL socket; then the engine runs the
request with those ``kv_transfer_params`` and pulls the prompt's KV instead of computing it. Any failure or
timeout falls back to a local prefill; a client that goes away cancels the job wherever it is.

A prefill worker keeps the finished prompt's KV for its reader only for a lease (vLLM's ``kv_lease_duration``),
and reading it later returns whatever reused those blocks. So a result is used only while it is young enough
(``HANDOFF_LEASE_FRACTION`` of the lease), and a result that will not be used (too late, or its request gone)
is released: the engine tells the prefill worker to free that KV at once instead of holding it for the lease.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import msgspec
import xxhash
import yaml
import zmq
import zmq.asyncio

from zdyn.disagg.policy import DisaggPolicy
from zdyn.disagg.prefill import as_prefill
from zdyn.engines.base import Engine, EngineInfo
from zdyn.protocol import Cancel, Delta, Generate, Heartbeat, PrefillDone, PrefillJob, QueueLink, QueueStatus
from zdyn.token_ids import TokenIds
from zdyn.transport import (
    MalformedCounter,
    ignore_result,
    make_socket,
    read_messages,
    send,
)

log = logging.getLogger(__name__)
STATUS_STALE_S = 1.0  # no QueueStatus (sent every 0.25 s) for this long: the queue is gone, prefill locally
SEND_TIMEOUT_S = 1.0  # a job that cannot be handed to the queue's socket within this is prefilled locally
# Decoding must start within this fraction of the prefill worker's KV lease. Once vLLM has the request it renews
# the lease every lease/6 s, so the rest is the margin for that first renewal and for clocks that disagree.
HANDOFF_LEASE_FRACTION = 0.5


class PrefillUnavailable(Exception):
    """The remote prefill failed, timed out or was refused; prefill locally instead."""


class PrefillClient:
    """Sockets to the prefill queue: jobs and cancels out and their results back on one DEALER (the queue answers on
    the connection a job came in on and never dials a decode worker), queue status in (SUB)."""

    def __init__(
        self,
        jobs_endpoint: str,
        status_endpoint: str,
        host: str,
        ctx: zmq.asyncio.Context | None = None,
    ) -> None:
        self.jobs_endpoint = jobs_endpoint
        self.status_endpoint = status_endpoint
        self.host = host
        self.ctx = ctx or zmq.asyncio.Context.instance()
        self.status = QueueStatus()
        self.status_at = -1e9
        self.stats: Counter[str] = Counter()
        self.malformed = MalformedCounter(f"prefill results ({jobs_endpoint})")
        self._waiting: dict[str, asyncio.Future[PrefillDone]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        # Frees a prefill's KV that will not be read (DisaggEngine sets the engine's release_kv).
        self.release: Callable[[str, dict[str, Any]], Awaitable[None]] | None = None
        self._releasing: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._push = make_socket(self.ctx, zmq.DEALER, self.jobs_endpoint, bind=False)
        self._status = make_socket(self.ctx, zmq.SUB, self.status_endpoint, bind=False)
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(read_messages(self._push, {PrefillDone: self._on_result}, self.malformed)),
            loop.create_task(read_messages(self._status, {QueueStatus: self._on_status}, self.malformed)),
            loop.create_task(self._watch()),
        ]

    async def close(self) -> None:
        if self._releasing:
            await asyncio.wait(self._releasing, timeout=1.0)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for sock in (self._push, self._status):
            sock.close(linger=0)

    @property
    def queue_live(self) -> bool:
        return time.monotonic() - self.status_at < STATUS_STALE_S

    @property
    def usable(self) -> bool:
        """The queue is up, not draining, and has a prefill worker: a job sent now can run."""
        return self.queue_live and not self.status.draining and self.status.prefill_workers > 0

    def _check_waiting(self) -> None:
        """Fail the jobs waiting on a queue that died or lost its last prefill worker (each falls back to a
        local prefill, or another queue) instead of letting them wait out their whole timeout. A draining queue
        hands its queued jobs back itself and finishes the running ones."""
        if not self._waiting or (self.queue_live and self.status.prefill_workers > 0):
            return
        why = "no status" if not self.queue_live else "no prefill worker"
        self.stats[f"gave_up_{why.replace(' ', '_')}"] += len(self._waiting)
        log.warning("prefill queue %s: %s; %d waiting job(s) go elsewhere", self.jobs_endpoint, why,
                    len(self._waiting))  # fmt: skip
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(PrefillUnavailable(f"prefill queue {self.jobs_endpoint}: {why}"))

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(STATUS_STALE_S / 4)
            self._check_waiting()

    async def prefill(self, request: Generate, timeout_s: float) -> dict[str, Any]:
        """Run ``request``'s prefill on a prefill worker; its ``kv_transfer_params``, or PrefillUnavailable."""
        rid = request.request_id
        job = as_prefill(request)
        future: asyncio.Future[PrefillDone] = asyncio.get_running_loop().create_future()
        self._waiting[rid] = future
        done = False
        pushed = time.monotonic()
        try:
            job_msg = PrefillJob(request=job, deadline_s=timeout_s)
            try:
                await asyncio.wait_for(send(self._push, job_msg), SEND_TIMEOUT_S)
            except TimeoutError:
                raise PrefillUnavailable(f"prefill queue {self.jobs_endpoint} does not take jobs") from None
            result = await asyncio.wait_for(future, timeout_s)
            done = True
        except TimeoutError:
            raise PrefillUnavailable(f"no prefill result within {timeout_s:g}s") from None
        finally:
            self._waiting.pop(rid, None)
            if not done:  # timed out or cancelled (client gone): take the job back wherever it is
                send(self._push, Cancel(request_id=rid)).add_done_callback(ignore_result)
                if future.done() and not future.cancelled():  # its result came just as the request went away
                    self._unused(future.result(), "its request is gone")
        if result.error or not result.kv_transfer_params:
            raise PrefillUnavailable(result.error or "no kv_transfer_params")
        # The job's age, less the time it spent queued and prefilling: an upper bound on how long the prefill
        # worker has held the KV (it also counts both transits), measured without comparing two hosts' clocks.
        held = time.monotonic() - pushed - result.prefill_s
        if result.kv_lease_s and held > result.kv_lease_s * HANDOFF_LEASE_FRACTION:
            self._unused(result, "too late")
            raise PrefillUnavailable(
                f"its KV may have been held {held:.1f}s, past {HANDOFF_LEASE_FRACTION:g} of "
                f"{result.prefill_worker}'s {result.kv_lease_s:g}s lease"
            )
        return result.kv_transfer_params

    def _unused(self, result: PrefillDone, why: str) -> None:
        """Free, on its prefill worker, KV that this decode worker will not read."""
        if not result.kv_transfer_params:
            return
        self.stats["released"] += 1
        log.info("prefill result of %s from %s not used (%s): releasing its KV", result.request_id,
                 result.prefill_worker or "?", why)  # fmt: skip
        if self.release is not None:
            task = asyncio.get_running_loop().create_task(self._release(result))
            self._releasing.add(task)
            task.add_done_callback(self._releasing.discard)

    async def _release(self, result: PrefillDone) -> None:
        assert self.release is not None and result.kv_transfer_params
        try:
            await self.release(result.request_id, result.kv_transfer_params)
        except Exception as e:  # the lease frees it anyway
            log.warning("could not release the KV of %s on %s: %s", result.request_id, result.prefill_worker, e)

    def _on_result(self, identity: bytes, msg: PrefillDone) -> None:
        future = self._waiting.get(msg.request_id)
        if future is None or future.done():
            self.stats["unknown_result"] += 1
            log.warning("prefill result for unknown or finished request %s (from %s): dropped",
                        msg.request_id, msg.prefill_worker or "?")  # fmt: skip
            self._unused(msg, "unknown or finished request")
            return
        future.set_result(msg)

    def _on_status(self, identity: bytes, msg: QueueStatus) -> None:
        self.status, self.status_at = msg, time.monotonic()
        self._check_waiting()


class DisaggEngine:
    """An ``Engine`` that prefills long prompts on prefill workers, through a prefill queue.

    With several queues (high availability) each job goes to a usable one with the fewest jobs waiting; a
    queue that dies, drains or loses its prefill workers hands its waiting jobs to another, or to a local
    prefill, within about a second."""

    def __init__(
        self,
        engine: Engine,
        client: PrefillClient | list[PrefillClient],
        policy: DisaggPolicy,
        *,
        timeout_s: float = 30.0,
        settings_file: str | None = None,
    ) -> None:
        self.engine = engine
        self.clients = client if isinstance(client, list) else [client]
        for c in self.clients:
            c.release = engine.release_kv
        self.policy = policy
        self.timeout_s = timeout_s
        self.settings_file = Path(settings_file) if settings_file else None
        self.decisions: Counter[str] = Counter()  # remote, local, fallback, shared
        # prompts being prefilled remotely -> done once that prompt's KV is in this engine's prefix cache
        self._prefilling: dict[bytes, asyncio.Future[None]] = {}
        self._settings_mtime = 0.0
        self._watch: asyncio.Task[None] | None = None

    @property
    def info(self) -> EngineInfo:
        return self.engine.info

    @property
    def client(self) -> PrefillClient:
        """The first queue's client (most deployments have one queue)."""
        return self.clients[0]

    @property
    def stats(self) -> Counter[str]:
        """The prefill clients' counters, added up over every queue."""
        return sum((c.stats for c in self.clients), Counter())

    def _queues(self) -> list[PrefillClient]:
        """Usable queues, least busy first."""
        return sorted((c for c in self.clients if c.usable), key=lambda c: c.status.queued)

    async def start(self) -> None:
        for c in self.clients:  # first, so the queues' status is known by the time the engine is up
            await c.start()
        await self.engine.start()
        if self.settings_file is not None:
            self._watch = asyncio.get_running_loop().create_task(self._watch_settings())

    def load(self) -> Heartbeat:
        """The engine's load, plus this worker's view of its prefill queues and its decisions (the frontend's
        /health shows them)."""
        links = [
            QueueLink(
                endpoint=c.jobs_endpoint,
                live=c.queue_live,
                queued=c.status.queued,
                prefill_workers=c.status.workers,
                decisions=dict(self.decisions),
            )  # fmt: skip
            for c in self.clients
        ]
        return msgspec.structs.replace(self.engine.load(), prefill_queues=links)

    async def release_kv(self, request_id: str, kv_transfer_params: dict[str, Any]) -> None:
        await self.engine.release_kv(request_id, kv_transfer_params)

    async def shutdown(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
        for c in self.clients:
            await c.close()
        await self.engine.shutdown()

    async def generate(self, request: Generate) -> AsyncIterator[Delta]:
        queues = self._queues()
        status = queues[0].status if queues else QueueStatus()
        cached = request.overlap_blocks * self.info.block_size
        decision = self.policy.decide(len(request.token_ids), cached, status.queued, status.prefill_workers)
        rid = request.request_id
        key = prompt_key(request.token_ids)
        leader = self._prefilling.get(key)  # whatever the policy says: this prompt's KV is on its way here
        leading = decision.remote and leader is None
        if leading:  # the choices of an n > 1 request that come while this one prefills remotely wait for it
            self._prefilling[key] = asyncio.get_running_loop().create_future()
        try:
            if leader is not None:
                await asyncio.wait([leader], timeout=self.timeout_s)
                self.decisions["shared"] += 1
                log.info("request %s: local prefill from the prefix cache (the same prompt's remote prefill)", rid)
            elif decision.remote:
                started = time.perf_counter()
                params = await self._remote_prefill(request, queues)
                if params is None:
                    self.decisions["fallback"] += 1
                else:
                    self.decisions["remote"] += 1
                    log.info("request %s: remote prefill (%s) took %.3fs", rid, decision.reason,
                             time.perf_counter() - started)  # fmt: skip
                    params = {**params, "do_remote_prefill": True}
                    request = msgspec.structs.replace(request, kv_transfer_params=params)
            else:
                self.decisions["local"] += 1
                log.info("request %s: local prefill (%s)", rid, decision.reason)
            async for delta in self.engine.generate(request):
                if leading:  # its first output: the prompt's KV is in this engine's prefix cache
                    leading = self._release(key)
                yield delta
        finally:
            if leading:
                self._release(key)

    def _release(self, key: bytes) -> bool:
        """Let the requests waiting for this prompt's remote prefill go on (locally, from the prefix cache)."""
        future = self._prefilling.pop(key, None)
        if future is not None and not future.done():
            future.set_result(None)
        return False

    async def _remote_prefill(self, request: Generate, queues: list[PrefillClient]) -> dict[str, Any] | None:
        """The prefill's kv_transfer_params from the first queue that delivers, or None (prefill locally)."""
        deadline = time.monotonic() + self.timeout_s
        why = "no prefill queue is usable"
        for client in queues:
            left = deadline - time.monotonic()
            if left <= 0 or not client.usable:
                continue
            if why != "no prefill queue is usable":
                log.warning("request %s: remote prefill failed (%s): trying %s", request.request_id, why,
                            client.jobs_endpoint)  # fmt: skip
            try:
                return await client.prefill(request, left)
            except PrefillUnavailable as e:
                why = str(e)
        log.warning("request %s: remote prefill failed (%s): prefilling locally", request.request_id, why)
        return None

    async def _watch_settings(self) -> None:
        """Re-read max_local_prefill_length / max_prefill_queue_size from the settings file when it changes."""
        assert self.settings_file is not None
        while True:
            try:
                mtime = self.settings_file.stat().st_mtime
                if mtime != self._settings_mtime:
                    self._settings_mtime = mtime
                    data = yaml.safe_load(self.settings_file.read_text()) or {}
                    data = {k.replace("-", "_"): v for k, v in data.items()}
                    self.policy.update(data.get("max_local_prefill_length"), data.get("max_prefill_queue_size"))
                    log.info("disagg settings from %s: max_local_prefill_length=%d max_prefill_queue_size=%d",
                             self.settings_file, self.policy.max_local_prefill_length,
                             self.policy.max_prefill_queue_size)  # fmt: skip
            except (OSError, ValueError, AttributeError, yaml.YAMLError) as e:
                log.error("cannot read disagg settings %s: %s (keeping the current ones)", self.settings_file, e)
            await asyncio.sleep(1.0)


def prompt_key(token_ids: Sequence[int]) -> bytes:
    """A short key of a prompt, to find its other choices."""
    return xxhash.xxh3_128_digest(TokenIds(token_ids).tobytes())
