"""A processor's side of a separate ``zdyn router``: one round trip per request, round-robin when it fails.

The client sends ``RouteQuery`` over a DEALER and waits at most ``timeout_s`` for the ``RouteReply``. When
the router is down or slow the request still goes out, round-robin, and the client stops asking for
``backoff_s`` so that an outage costs one timeout, not one per request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

import zmq
import zmq.asyncio

from zdyn.protocol import RouteEvent, RouteQuery, RouteReply, RouteUpdate
from zdyn.router.selector import RoundRobin, Route
from zdyn.rpc import Peer
from zdyn.token_ids import as_token_ids
from zdyn.transport import MalformedCounter, ignore_result, make_socket, read_messages, send, unreachable_hint

log = logging.getLogger(__name__)


class RouterClient:
    def __init__(
        self, endpoint: str, *, timeout_s: float = 0.25, backoff_s: float = 1.0, ctx: zmq.asyncio.Context | None = None
    ) -> None:
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.backoff_s = backoff_s
        self.ctx = ctx or zmq.asyncio.Context.instance()
        self.malformed = MalformedCounter(f"router client {endpoint}")
        self.failures = 0  # queries that timed out or failed
        self.answers = 0  # replies received
        self.last_answer = 0.0  # monotonic time of the last reply
        self._down_until = 0.0
        self._pending: dict[str, asyncio.Future[RouteReply]] = {}
        self._sock: zmq.asyncio.Socket | None = None
        self._reader: asyncio.Task[None] | None = None

    def _ensure_started(self) -> zmq.asyncio.Socket:
        if self._sock is None:
            self._sock = make_socket(self.ctx, zmq.DEALER, self.endpoint)
            reader = read_messages(self._sock, {RouteReply: self._on_reply}, self.malformed)
            self._reader = asyncio.get_running_loop().create_task(reader)
        return self._sock

    async def route(self, query: RouteQuery) -> RouteReply | None:
        """The router's answer, or None (router down, slow or without a decision): the caller falls back."""
        if time.monotonic() < self._down_until:
            return None
        sock = self._ensure_started()
        future: asyncio.Future[RouteReply] = asyncio.get_running_loop().create_future()
        self._pending[query.request_id] = future
        try:
            send(sock, query).add_done_callback(ignore_result)
            reply = await asyncio.wait_for(future, self.timeout_s)
        except TimeoutError:
            self._failed(f"no answer within {self.timeout_s:g}s")
            return None
        finally:
            self._pending.pop(query.request_id, None)
        if reply.error:
            log.warning("router %s: no decision for %s: %s", self.endpoint, query.request_id, reply.error)
            return None
        return reply

    def update(self, request_id: str, event: RouteEvent) -> None:
        """Always sent, also while backing off: a request the router routed must not stay counted as load."""
        if self._sock is not None:
            send(self._sock, RouteUpdate(request_id=request_id, event=event)).add_done_callback(ignore_result)

    @property
    def status(self) -> str:
        """``answering`` (a reply within the last 10 s), ``not answering``, or ``never answered``."""
        if not self.answers:
            return "never answered"
        return "answering" if time.monotonic() - self.last_answer < 10.0 else "not answering"

    def _failed(self, why: str) -> None:
        self.failures += 1
        self._down_until = time.monotonic() + self.backoff_s
        if self.answers:
            log.warning("router %s: %s; routing round-robin for %gs", self.endpoint, why, self.backoff_s)
            return
        hint = unreachable_hint(self.endpoint, "--router-endpoint")
        log.warning("router %s has never answered (%s): %s; routing round-robin meanwhile (%d queries so far)",
                    self.endpoint, why, hint, self.failures)  # fmt: skip

    def _on_reply(self, identity: bytes, msg: RouteReply) -> None:
        self.answers += 1
        self.last_answer = time.monotonic()
        future = self._pending.get(msg.request_id)
        if future is not None and not future.done():
            future.set_result(msg)

    async def aclose(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None


class RemoteSelector:
    """``Selector`` backed by a ``zdyn router`` process."""

    def __init__(self, client: RouterClient) -> None:
        self.client = client
        self.fallback = RoundRobin()
        self.fallbacks = 0  # requests routed round-robin: the router did not answer, or the client is backing off

    async def select(self, request_id: str, token_ids: Sequence[int], peers: list[Peer]) -> Route:
        query = RouteQuery(request_id=request_id, token_ids=as_token_ids(token_ids), candidates=[p.id for p in peers])
        reply = await self.client.route(query)
        if reply is not None:
            peer = next((p for p in peers if p.id == reply.worker), None)
            if peer is not None:
                return Route(peer, reply.overlap_blocks, reply.reason)
        route = await self.fallback.select(request_id, token_ids, peers)
        route.reason = "round-robin: router unavailable"
        self.fallbacks += 1
        return route

    def update(self, request_id: str, event: RouteEvent) -> None:
        self.client.update(request_id, event)

    async def aclose(self) -> None:
        await self.client.aclose()
