"""The KV-aware router as a service shared by every processor (run by ``zdyn router``).

Workers register at the router's worker hub as they do at a processor, which tells the router their
KV-event publishers and loads; processors ask over ``endpoint`` with one ``RouteQuery`` per request and
report with ``RouteUpdate`` when a routed request has prefilled and when it has finished.
"""

from __future__ import annotations

import asyncio
import logging
import time

import zmq
import zmq.asyncio

from zdyn.protocol import Message, RouteEvent, RouteQuery, RouteReply, RouteUpdate
from zdyn.router.core import KvRouter
from zdyn.router.feed import WorkerFeed
from zdyn.rpc import Hub
from zdyn.transport import MalformedCounter, MessageHandler, log_send_error, make_socket, read_messages, send

log = logging.getLogger(__name__)
SUMMARY_INTERVAL_S = 10.0


class RouterService:
    """Answers ``RouteQuery``s at ``endpoint`` for the workers registered at ``workers``."""

    def __init__(self, endpoint: str, workers: Hub, router: KvRouter, ctx: zmq.asyncio.Context | None = None) -> None:
        self.endpoint = endpoint
        self.workers = workers
        self.router = router
        self.ctx = ctx or zmq.asyncio.Context.instance()
        self.feed = WorkerFeed(workers, router, self.ctx)
        self.malformed = MalformedCounter(f"router {endpoint}")
        self.decisions = 0
        self.no_decision = 0
        self.overlap_blocks = 0
        self._sock: zmq.asyncio.Socket | None = None
        self._stop = asyncio.Event()

    async def run(self) -> None:
        self._sock = make_socket(self.ctx, zmq.ROUTER, self.endpoint, bind=True, allow=("processor", "frontend"))
        summary = asyncio.get_running_loop().create_task(self._summaries())
        handlers: dict[type[Message], MessageHandler] = {RouteQuery: self._on_query, RouteUpdate: self.update}
        reader = asyncio.get_running_loop().create_task(
            read_messages(self._sock, handlers, self.malformed, routed=True)
        )
        try:
            await self._stop.wait()
        finally:
            for task in (summary, reader):
                task.cancel()
            await asyncio.gather(summary, reader, return_exceptions=True)
            await self.feed.aclose()
            self._sock.close(linger=0)

    def close(self) -> None:
        self._stop.set()

    def _on_query(self, identity: bytes, query: RouteQuery) -> None:
        assert self._sock is not None
        send(self._sock, self.answer(query), identity).add_done_callback(log_send_error)

    def answer(self, query: RouteQuery) -> RouteReply:
        self.feed.refresh_loads()
        try:
            d = self.router.route(
                query.request_id, query.token_ids, query.candidates or None, now=time.monotonic(),
                lora_name=query.lora_name,
            )  # fmt: skip
        except LookupError as e:
            self.no_decision += 1
            return RouteReply(request_id=query.request_id, error=str(e))
        self.decisions += 1
        self.overlap_blocks += d.overlap_blocks
        log.debug("route %s -> %s (%s)", query.request_id, d.worker, d.reason)
        return RouteReply(
            request_id=query.request_id, worker=d.worker, overlap_blocks=d.overlap_blocks, reason=d.reason
        )

    def update(self, identity: bytes, msg: RouteUpdate) -> None:
        if msg.event is RouteEvent.PREFILLED:
            self.router.prefilled(msg.request_id)
        else:
            self.router.finished(msg.request_id)

    async def _summaries(self) -> None:
        last = 0
        while True:
            await asyncio.sleep(SUMMARY_INTERVAL_S)
            if self.decisions != last:
                routed = self.decisions - last
                last = self.decisions
                log.info(
                    "router: %d requests routed in %.0fs (mean overlap %.1f blocks); %d workers, %d blocks indexed",
                    routed, SUMMARY_INTERVAL_S, self.overlap_blocks / max(1, self.decisions), len(self.feed.peers),
                    self.router.indexer.num_blocks(),
                )  # fmt: skip
