"""Follows one worker's KV-event publisher (vLLM's ZMQ wire format) into a ``KvRouter``.

A SUB socket receives the live batches. On start, and whenever a sequence number is skipped, the
subscriber asks the worker's replay endpoint for what it missed (a DEALER speaking vLLM's replay
protocol). A publisher that restarted (its sequence back at 0), or a replay that cannot cover the gap,
means the router's picture of that worker may be stale: its entries are dropped and rebuilt from the
events that follow. zdyn's publishers begin such a replay with a snapshot of everything cached (``kv_state``),
so the rebuilt picture is whole. Malformed frames are counted and skipped.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter

import zmq
import zmq.asyncio

from zdyn.kv_events import KvAllCleared, KvBlockStored, KvEventBatch, KvEventError, decode_frames, decode_payload
from zdyn.kv_publisher import fetch_replay
from zdyn.router.core import KvRouter
from zdyn.router.sequence import SeqAction, SeqTracker
from zdyn.transport import MalformedCounter, make_socket

log = logging.getLogger(__name__)
REPLAY_TIMEOUT_S = 2.0


def is_snapshot(batch: KvEventBatch) -> bool:
    """A publisher's snapshot (``zdyn.kv_state``) starts by clearing everything, which no engine step does first."""
    return bool(batch.events) and isinstance(batch.events[0], KvAllCleared)


class KvSubscriber:
    def __init__(
        self,
        worker: str,
        endpoint: str,
        replay_endpoint: str,
        router: KvRouter,
        ctx: zmq.asyncio.Context | None = None,
        replay_timeout_s: float = REPLAY_TIMEOUT_S,
    ) -> None:
        self.worker = worker
        self.endpoint = endpoint
        self.replay_endpoint = replay_endpoint
        self.router = router
        self.ctx = ctx or zmq.asyncio.Context.instance()
        self.replay_timeout_s = replay_timeout_s
        self.tracker = SeqTracker()
        self.stats: Counter[str] = Counter()
        self.malformed = MalformedCounter(f"KV events of {worker} ({endpoint})")
        self._sub: zmq.asyncio.Socket | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._sub = make_socket(self.ctx, zmq.SUB, self.endpoint, bind=False)
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"kv-events-{self.worker}")

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if self._sub is not None:
            self._sub.close(linger=0)
            self._sub = None

    async def _run(self) -> None:
        assert self._sub is not None
        if self.replay_endpoint:  # what the worker cached before we subscribed
            await self._catch_up(until=None)
        while True:
            frames = await self._sub.recv_multipart()
            try:
                batch = decode_frames(frames)
            except KvEventError as e:
                self.stats["malformed"] += 1
                self.malformed.drop(str(e))
                continue
            action = self.tracker.observe(batch.seq)
            if action is SeqAction.DUPLICATE:
                self.stats["duplicate"] += 1
                continue
            if action is SeqAction.RESTART:
                self.stats["restart"] += 1
                log.warning("KV events of %s restarted at seq 0: dropping its index entries", self.worker)
                self.router.clear_worker(self.worker)
            elif action is SeqAction.GAP:
                self.stats["gap"] += 1
                await self._catch_up(until=batch.seq)
                if self.tracker.observe(batch.seq) is not SeqAction.APPLY:
                    continue
            self._apply(batch)

    def _apply(self, batch: KvEventBatch) -> None:
        self.stats["batches"] += 1
        self.router.apply_events(self.worker, batch)

    async def _catch_up(self, until: int | None) -> None:
        """Replay the batches from ``tracker.expected`` up to ``until`` (exclusive; None: all buffered). When
        some are gone for good, the worker's entries are dropped first (removals may have been missed) and
        its index is rebuilt from the oldest batch that can still be had."""
        start = self.tracker.expected
        batches = (await self._replay(start) or []) if self.replay_endpoint else []
        if until is not None:
            batches = [b for b in batches if b.seq < until]
        first = batches[0].seq if batches else until
        if first is not None and first > start:
            if batches and is_snapshot(batches[0]):  # the worker's whole cache as of now, then what followed
                self.stats["snapshots"] += 1
                blocks = sum(len(e.block_hashes) for e in batches[0].events if isinstance(e, KvBlockStored))
                log.info("KV events of %s: started from a snapshot of its %d cached blocks", self.worker, blocks)
            else:
                self.stats["replay_incomplete"] += 1
                level = logging.WARNING if start > 0 else logging.INFO
                log.log(level, "KV events of %s: batches %d..%d cannot be replayed; its index entries are rebuilt "
                        "from seq %d on", self.worker, start, first - 1, first)  # fmt: skip
            self.router.clear_worker(self.worker)
            self.tracker.reset(first)
        for batch in batches:
            if self.tracker.replayed(batch.seq):
                self._apply(batch)

    async def _replay(self, start: int) -> list[KvEventBatch] | None:
        """Every buffered batch with seq >= start, in order; None when the replay endpoint did not answer."""
        try:
            raw = await fetch_replay(self.ctx, self.replay_endpoint, start, self.replay_timeout_s)
            batches = [decode_payload(payload, seq) for seq, payload in raw]
        except (TimeoutError, KvEventError) as e:
            self.stats["replay_failed"] += 1
            log.warning("KV-event replay from %s failed: %s", self.replay_endpoint, e or "timed out")
            return None
        self.stats["replayed"] += len(batches)
        return batches
