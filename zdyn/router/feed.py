"""Keeps a ``KvRouter`` in step with the workers registered at a hub, and routes in this process.

Workers register at a hub (a processor's, or a ``zdyn router``'s own) with READY, which announces their
KV-event publisher. ``WorkerFeed`` adds each new worker to the router and subscribes to its events; a
worker that leaves or dies is removed with all its index entries. Loads come from the workers' heartbeats.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Sequence

import zmq.asyncio

from zdyn.protocol import RouteEvent
from zdyn.router.core import KvRouter
from zdyn.router.policy import WorkerState
from zdyn.router.selector import RoundRobin, Route
from zdyn.router.subscriber import KvSubscriber
from zdyn.rpc import Hub, Peer, PeerEvent

log = logging.getLogger(__name__)


class WorkerFeed:
    def __init__(self, hub: Hub, router: KvRouter, ctx: zmq.asyncio.Context | None = None) -> None:
        self.hub = hub
        self.router = router
        self.ctx = ctx or zmq.asyncio.Context.instance()
        self.peers: dict[str, Peer] = {}
        self.subscribers: dict[str, KvSubscriber] = {}
        self.stats: Counter[str] = Counter()
        for peer in hub.live_peers():
            self._add(peer)
        hub.listeners.append(self.on_peer)

    def on_peer(self, event: PeerEvent) -> None:
        """A worker joined (subscribe to its KV events) or left (forget its index entries). One that registers
        again after losing contact restarted or lost its requests: its cache is new, so it starts from empty."""
        if event.kind == "joined":
            if event.peer.id in self.peers:
                self._remove(event.peer.id)
            self._add(event.peer)
        elif self.peers.get(event.peer.id) is event.peer:
            self._remove(event.peer.id)

    def _add(self, peer: Peer) -> None:
        ready = peer.ready
        if not self.router.block_size:
            self.router.set_block_size(ready.block_size)
        if ready.block_size and ready.block_size != self.router.block_size:
            self.stats["block_size_mismatch"] += 1
            log.error("worker %s has block size %d, the router %d: it is routed to without its KV cache",
                      peer.id, ready.block_size, self.router.block_size)  # fmt: skip
        self.peers[peer.id] = peer
        self.router.add_worker(WorkerState(peer.id, num_kv_blocks=ready.num_kv_blocks, max_num_seqs=ready.max_num_seqs))
        if ready.kv_events_endpoint and ready.block_size == self.router.block_size:
            sub = KvSubscriber(peer.id, ready.kv_events_endpoint, ready.kv_replay_endpoint, self.router, self.ctx)
            sub.start()
            self.subscribers[peer.id] = sub
        log.info("router: worker %s joined (KV events %s)", peer.id, ready.kv_events_endpoint or "none")

    def _remove(self, worker: str) -> None:
        self.peers.pop(worker, None)
        sub = self.subscribers.pop(worker, None)
        if sub is not None:
            sub.close()
        blocks = self.router.indexer.num_blocks(worker)
        self.router.remove_worker(worker)
        log.info("router: worker %s left; dropped its %d indexed blocks", worker, blocks)

    def refresh_loads(self) -> None:
        """Copy the load each worker last published into the router (cheap: a few fields per worker)."""
        for worker, peer in self.peers.items():
            load = peer.load
            self.router.update_load(worker, load.num_running, load.num_waiting, load.kv_usage)

    async def aclose(self) -> None:
        self.hub.listeners.remove(self.on_peer)
        for sub in self.subscribers.values():
            sub.close()
        self.subscribers.clear()


class LocalSelector:
    """``Selector`` with the KV router in this process (the processor's own workers)."""

    def __init__(self, router: KvRouter, workers: Hub) -> None:
        self.router = router
        self.feed = WorkerFeed(workers, router)
        self.fallback = RoundRobin()

    async def select(self, request_id: str, token_ids: Sequence[int], peers: list[Peer]) -> Route:
        by_id = {p.id: p for p in peers}
        self.feed.refresh_loads()
        try:
            decision = self.router.route(request_id, token_ids, list(by_id), now=time.monotonic())
        except LookupError:  # no worker known to the router yet (READY seen by the hub, feed not synced)
            route = await self.fallback.select(request_id, token_ids, peers)
            route.reason = "round-robin: no worker known to the router"
            return route
        return Route(by_id[decision.worker], decision.overlap_blocks, decision.reason)

    def update(self, request_id: str, event: RouteEvent) -> None:
        if event is RouteEvent.PREFILLED:
            self.router.prefilled(request_id)
        else:
            self.router.finished(request_id)

    async def aclose(self) -> None:
        await self.feed.aclose()
