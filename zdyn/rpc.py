"""Streaming RPC over ROUTER/DEALER: a hub serves requests out to peers that registered with it.

A ``Hub`` (ROUTER, binds) is the processor's side of its workers, or the frontend's side of separate
processors. A ``Spoke`` (one DEALER per hub, connects) is the worker's or processor's side. Spokes announce
themselves with READY, both sides send heartbeats, and a peer silent for ``Liveness.expiry_s`` is dead: its
requests in flight end at once with a 503 error, and a spoke that loses its hub cancels that hub's requests
and announces itself again with a fresh socket (zguide's Paranoid Pirate).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from zdyn.errors import RequestError
from zdyn.protocol import (
    PROTOCOL_VERSION,
    Cancel,
    Delta,
    Error,
    Generate,
    Heartbeat,
    Message,
    Outputs,
    Process,
    Ready,
    Refused,
)
from zdyn.transport import Liveness, MalformedCounter, decode_or_count, make_socket, send

log = logging.getLogger(__name__)

Request = Generate | Process
Handler = Callable[[Request], AsyncIterator[Delta]]
IDLE_TIMEOUT_S = 600.0  # a request with no output for this long fails (engine stuck, not dead)


class RequestFailed(Exception):
    """A streamed request ended with an error; ``error`` says why and which HTTP status fits."""

    def __init__(self, error: Error) -> None:
        super().__init__(error.message)
        self.error = error


class RefusedError(Exception):
    """A hub refused this spoke's READY (for example another protocol version)."""


@dataclass(slots=True, eq=False)
class Peer:
    identity: bytes
    ready: Ready
    last_seen: float
    load: Heartbeat = field(default_factory=Heartbeat)
    num_inflight: int = 0

    @property
    def id(self) -> str:
        return self.ready.peer_id


@dataclass(slots=True, eq=False)
class _Stream:
    identity: bytes
    queue: asyncio.Queue[Delta | Error] = field(default_factory=asyncio.Queue)
    last_output: float = 0.0
    error: Error | None = None  # an error that arrived behind output not yet handed out

    async def next(self) -> Delta | Error:
        """The next item; deltas already waiting are merged into one (one SSE write, not many)."""
        if self.error is not None:
            return self.error
        item = await self.queue.get()
        while isinstance(item, Delta) and item.finish is None and not self.queue.empty():
            following = self.queue.get_nowait()
            if isinstance(following, Error):
                self.error = following
                break
            merge_into(item, following)
        return item


def merge_into(delta: Delta, following: Delta) -> None:
    """Append ``following`` (the next delta of the same request) to ``delta``."""
    delta.token_ids.extend(following.token_ids)
    if following.text is not None:
        delta.text = (delta.text or "") + following.text
    if following.logprobs is not None:
        delta.logprobs = (delta.logprobs or []) + following.logprobs
    if delta.num_cached_tokens is None:
        delta.num_cached_tokens = following.num_cached_tokens
    delta.finish = following.finish


class Hub:
    """ROUTER side. ``stream(peer, request)`` yields the peer's deltas for that request."""

    def __init__(
        self,
        endpoint: str,
        *,
        role: str,
        liveness: Liveness | None = None,
        accept: Callable[[Ready], str | None] | None = None,
        idle_timeout_s: float = IDLE_TIMEOUT_S,
        ctx: zmq.asyncio.Context | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.role = role
        self.liveness = liveness or Liveness()
        self.accept = accept
        self.idle_timeout_s = idle_timeout_s
        self.ctx = ctx or zmq.asyncio.Context.instance()
        self.peers: dict[bytes, Peer] = {}
        self.malformed = MalformedCounter(f"hub {endpoint}")
        self.on_change: list[Callable[[], None]] = []
        self._streams: dict[str, _Stream] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._sock: zmq.asyncio.Socket | None = None
        self._monitor: zmq.asyncio.Socket | None = None

    async def start(self) -> None:
        self._sock = make_socket(self.ctx, zmq.ROUTER, self.endpoint, bind=True)
        self._monitor = self._sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(c) for c in (self._read(), self._beat(), self._watch_disconnects())]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for peer in list(self.peers.values()):
            self._drop(peer, "hub is shutting down")
        if self._sock is not None:
            self._sock.disable_monitor()
            if self._monitor is not None:
                self._monitor.close(linger=0)
            self._sock.close(linger=0)
            self._sock = None

    async def __aenter__(self) -> Hub:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def live_peers(self) -> list[Peer]:
        return list(self.peers.values())

    async def wait_for_peers(self, n: int = 1, timeout_s: float = 60.0) -> None:
        """Wait until ``n`` peers are registered; TimeoutError names what was missing."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while len(self.peers) < n:
            if loop.time() > deadline:
                raise TimeoutError(f"{len(self.peers)} of {n} {self.role}s registered at {self.endpoint}")
            await asyncio.sleep(0.02)

    async def stream(self, peer: Peer, request: Request) -> AsyncIterator[Delta]:
        """Send ``request`` to ``peer`` and yield its deltas until one carries ``finish``.

        Raises RequestFailed when the peer reports an error, dies, or goes quiet past the idle timeout.
        Leaving the iteration early (client gone) sends Cancel so the engine aborts the request.
        """
        assert self._sock is not None, "Hub.start() first"
        rid = request.request_id
        if rid in self._streams:
            raise RequestFailed(_error(rid, f"duplicate request id {rid!r}", 400, "invalid_request_error"))
        stream = _Stream(peer.identity, last_output=asyncio.get_running_loop().time())
        self._streams[rid] = stream
        peer.num_inflight += 1
        done = False
        try:
            try:
                await send(self._sock, request, peer.identity)
            except zmq.ZMQError as e:
                self._drop(peer, f"unreachable ({e})")
                done = True
                raise RequestFailed(_error(rid, f"{self.role} {peer.id} is unreachable")) from e
            while True:
                item = await stream.next()
                if isinstance(item, Error):
                    done = True
                    raise RequestFailed(item)
                if item.finish is not None:
                    done = True
                yield item
                if done:
                    return
        finally:
            del self._streams[rid]
            peer.num_inflight -= 1
            if not done and self.peers.get(peer.identity) is peer:
                send(self._sock, Cancel(request_id=rid), peer.identity).add_done_callback(_ignore)

    async def _read(self) -> None:
        assert self._sock is not None
        loop = asyncio.get_running_loop()
        while True:
            identity, *frames = await self._sock.recv_multipart()
            msg = decode_or_count(frames, self.malformed)
            if msg is None:
                continue
            now = loop.time()
            peer = self.peers.get(identity)
            if peer is not None:
                peer.last_seen = now
            if isinstance(msg, Outputs):
                for delta in msg.deltas:
                    stream = self._streams.get(delta.request_id)
                    if stream is not None and stream.identity == identity:
                        stream.last_output = now
                        stream.queue.put_nowait(delta)
            elif isinstance(msg, Heartbeat):
                if peer is not None:
                    peer.load = msg
            elif isinstance(msg, Error):
                stream = self._streams.get(msg.request_id)
                if stream is not None and stream.identity == identity:
                    stream.queue.put_nowait(msg)
            elif isinstance(msg, Ready):
                self._register(identity, msg, now)
            else:
                self.malformed.drop(f"unexpected {type(msg).__name__} from a {self.role}")

    def _register(self, identity: bytes, ready: Ready, now: float) -> None:
        reason = None
        if ready.protocol_version != PROTOCOL_VERSION:
            reason = f"protocol version {ready.protocol_version} is not this hub's {PROTOCOL_VERSION}"
        elif ready.role != self.role:
            reason = f"this hub serves {self.role}s, not {ready.role}s"
        elif self.accept is not None:
            reason = self.accept(ready)
        if reason is not None:
            log.error("refused %s %s at %s: %s", ready.role, ready.peer_id, self.endpoint, reason)
            assert self._sock is not None
            send(self._sock, Refused(reason=reason), identity).add_done_callback(_ignore)
            return
        old = self.peers.get(identity)
        if old is not None:  # it lost us and cancelled what it had: fail those streams
            self._drop(old, "re-registered after losing contact")
        self.peers[identity] = Peer(identity, ready, now)
        log.info(
            "%s %s joined at %s: model=%s engine=%s max_num_seqs=%d block_size=%d kv_blocks=%d",
            ready.role, ready.peer_id, self.endpoint, ready.model, ready.engine,
            ready.max_num_seqs, ready.block_size, ready.num_kv_blocks,
        )  # fmt: skip
        self._changed()

    def _drop(self, peer: Peer, reason: str) -> None:
        if self.peers.get(peer.identity) is not peer:
            return
        del self.peers[peer.identity]
        failed = 0
        for rid, stream in self._streams.items():
            if stream.identity == peer.identity:
                stream.queue.put_nowait(_error(rid, f"{self.role} {peer.id} {reason}"))
                failed += 1
        log.warning("%s %s dropped: %s; %d request(s) in flight failed", self.role, peer.id, reason, failed)
        self._changed()

    def _changed(self) -> None:
        for callback in self.on_change:
            callback()

    def _probe(self, now: float) -> None:
        """Heartbeat every peer; ROUTER_MANDATORY makes a vanished peer fail at once."""
        assert self._sock is not None
        for peer in list(self.peers.values()):
            if now - peer.last_seen > self.liveness.expiry_s:
                self._drop(peer, f"silent for {now - peer.last_seen:.1f}s")
                continue
            sent = send(self._sock, Heartbeat(), peer.identity)
            if sent.done() and sent.exception() is not None:
                self._drop(peer, "disconnected")

    async def _beat(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.liveness.interval_s)
            now = loop.time()
            self._probe(now)
            for rid, stream in self._streams.items():
                if now - stream.last_output > self.idle_timeout_s:
                    message = f"no output for {self.idle_timeout_s:.0f}s"
                    stream.queue.put_nowait(_error(rid, message, 504, "timeout"))
                    stream.last_output = now

    async def _watch_disconnects(self) -> None:
        assert self._monitor is not None
        loop = asyncio.get_running_loop()
        while True:
            event = parse_monitor_message(await self._monitor.recv_multipart())
            if event["event"] == zmq.EVENT_DISCONNECTED:
                await asyncio.sleep(0.05)  # let the ROUTER retire the peer's pipe first
                self._probe(loop.time())


@dataclass(slots=True, eq=False)
class _Link:
    """A spoke's connection to one hub."""

    endpoint: str
    sock: zmq.asyncio.Socket | None = None
    reader: asyncio.Task[None] | None = None
    last_seen: float = 0.0
    heard: bool = False  # the hub has answered since this socket was opened
    requests: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    pending: list[Delta] = field(default_factory=list)


class Spoke:
    """DEALER side: connects to each hub, registers with READY and serves requests with ``handler``.

    Deltas produced in the same event-loop turn are sent to their hub as one Outputs message, so a
    worker sends one message per engine step rather than one per token.
    """

    def __init__(
        self,
        hubs: list[str],
        ready: Ready,
        handler: Handler,
        *,
        load: Callable[[], Heartbeat] | None = None,
        liveness: Liveness | None = None,
        ctx: zmq.asyncio.Context | None = None,
    ) -> None:
        if not hubs:
            raise ValueError("a spoke needs at least one hub endpoint to connect to")
        self.ready = ready
        self.handler = handler
        self.load = load or Heartbeat
        self.liveness = liveness or Liveness()
        self.ctx = ctx or zmq.asyncio.Context.instance()
        self.links = [_Link(endpoint) for endpoint in hubs]
        self.malformed = MalformedCounter(f"{ready.role} {ready.peer_id}")
        self._stopped = asyncio.Event()
        self._refusal: str | None = None
        self._beater: asyncio.Task[None] | None = None

    @property
    def num_requests(self) -> int:
        return sum(len(link.requests) for link in self.links)

    async def run(self) -> None:
        """Serve until ``close()``; raises RefusedError if a hub refuses this spoke."""
        loop = asyncio.get_running_loop()
        for link in self.links:
            self._open(link, loop.time())
        self._beater = loop.create_task(self._beat())
        try:
            await self._stopped.wait()
        finally:
            await self._shutdown()
        if self._refusal is not None:
            raise RefusedError(self._refusal)

    def close(self) -> None:
        self._stopped.set()

    def _open(self, link: _Link, now: float) -> None:
        identity = f"{self.ready.peer_id}".encode()
        link.sock = make_socket(self.ctx, zmq.DEALER, link.endpoint, bind=False, identity=identity)
        link.last_seen = now
        link.heard = False
        send(link.sock, self.ready).add_done_callback(_ignore)
        link.reader = asyncio.get_running_loop().create_task(self._read(link))

    def _reset(self, link: _Link, now: float) -> None:
        if link.heard:
            log.warning(
                "hub %s silent for %.1fs: cancelling %d request(s), reconnecting",
                link.endpoint, now - link.last_seen, len(link.requests),
            )  # fmt: skip
        else:
            log.info("no answer from hub %s yet; announcing %s again", link.endpoint, self.ready.peer_id)
        self._close_link(link)
        self._open(link, now)

    def _close_link(self, link: _Link) -> None:
        for task in link.requests.values():
            task.cancel()
        link.requests.clear()
        link.pending.clear()
        if link.reader is not None:
            link.reader.cancel()
        if link.sock is not None:
            link.sock.close(linger=0)
            link.sock = None

    async def _shutdown(self) -> None:
        tasks = [t for link in self.links for t in link.requests.values()]
        if self._beater is not None:
            self._beater.cancel()
            tasks.append(self._beater)
        for link in self.links:
            if link.reader is not None:
                tasks.append(link.reader)
            self._close_link(link)
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _read(self, link: _Link) -> None:
        assert link.sock is not None
        loop = asyncio.get_running_loop()
        while True:
            msg = decode_or_count(await link.sock.recv_multipart(), self.malformed)
            if msg is None:
                continue
            link.last_seen = loop.time()
            link.heard = True
            if isinstance(msg, Generate | Process):
                if msg.request_id in link.requests:
                    self.malformed.drop(f"duplicate request id {msg.request_id!r}")
                    continue
                link.requests[msg.request_id] = loop.create_task(self._serve(link, msg))
            elif isinstance(msg, Cancel):
                task = link.requests.pop(msg.request_id, None)
                if task is not None:
                    task.cancel()
            elif isinstance(msg, Refused):
                log.error("hub %s refused %s: %s", link.endpoint, self.ready.peer_id, msg.reason)
                self._refusal = f"hub {link.endpoint} refused us: {msg.reason}"
                self._stopped.set()
            elif not isinstance(msg, Heartbeat):
                self.malformed.drop(f"unexpected {type(msg).__name__} from a hub")

    async def _serve(self, link: _Link, request: Request) -> None:
        rid = request.request_id
        try:
            async for delta in self.handler(request):
                self._emit(link, delta)
        except asyncio.CancelledError:
            raise
        except RequestError as e:
            self._reply_error(link, _error(rid, e.message, e.status, e.type))
        except Exception as e:
            log.exception("request %s failed", rid)
            self._reply_error(link, _error(rid, f"{type(e).__name__}: {e}", 500, "internal_error"))
        finally:
            if link.requests.get(rid) is asyncio.current_task():
                del link.requests[rid]

    def _emit(self, link: _Link, delta: Delta) -> None:
        if not link.pending:
            asyncio.get_running_loop().call_soon(self._flush, link)
        link.pending.append(delta)

    def _flush(self, link: _Link) -> None:
        if link.pending and link.sock is not None:
            send(link.sock, Outputs(deltas=link.pending)).add_done_callback(_log_send_error)
        link.pending = []

    def _reply_error(self, link: _Link, error: Error) -> None:
        self._flush(link)
        if link.sock is not None:
            send(link.sock, error).add_done_callback(_log_send_error)

    async def _beat(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.liveness.interval_s)
            now = loop.time()
            beat = self.load()
            for link in self.links:
                if now - link.last_seen > self.liveness.expiry_s:
                    self._reset(link, now)
                elif link.sock is not None:
                    send(link.sock, beat).add_done_callback(_ignore)


def _error(rid: str, message: str, status: int = 503, type: str = "unavailable") -> Error:
    return Error(request_id=rid, message=message, status=status, type=type)


def _ignore(future: asyncio.Future[object]) -> None:
    if not future.cancelled():
        future.exception()


def _log_send_error(future: asyncio.Future[object]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.error("send failed: %s", future.exception())


__all__ = ["Handler", "Hub", "Message", "Peer", "RefusedError", "RequestFailed", "Spoke"]
