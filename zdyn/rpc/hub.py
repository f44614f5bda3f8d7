"""The ROUTER side of zdyn's streaming RPC: peers register, requests stream out to them."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import Literal

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from zdyn import security
from zdyn.errors import RequestError, peer_lost
from zdyn.protocol import (
    PROTOCOL_VERSION,
    Cancel,
    Delta,
    Error,
    Heartbeat,
    Message,
    Outputs,
    Ready,
    Refused,
    Request,
    Role,
)
from zdyn.rpc.stream import DeltaStream, num_choices
from zdyn.transport import (
    Liveness,
    MalformedCounter,
    MessageHandler,
    ignore_result,
    make_socket,
    read_messages,
    send,
    stalled_sleep,
)

log = logging.getLogger(__name__)

IDLE_TIMEOUT_S = 600.0  # a request with no output for this long fails (engine stuck, not dead)
DEFAULT_MAX_PEERS = 512  # registrations past this are refused


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


@dataclass(slots=True, frozen=True)
class PeerEvent:
    """A peer registered (``joined``), announced that it is shutting down (``draining``: it finishes what it
    has and takes nothing new) or was dropped (``left``, with the reason)."""

    kind: Literal["joined", "draining", "left"]
    peer: Peer
    reason: str = ""


PeerListener = Callable[[PeerEvent], None]


class Hub:
    """ROUTER side. ``stream(peer, request)`` yields the peer's deltas for that request.

    ``listeners`` hear every peer that joins or leaves (``PeerEvent``), in order, from the hub's own task.
    """

    also_allow: tuple[str, ...] = ()  # more roles' keys admitted (a HubDirectory's: other hubs announcing)

    def __init__(
        self,
        endpoint: str,
        *,
        role: Role,
        liveness: Liveness | None = None,
        accept: Callable[[Ready], str | None] | None = None,
        idle_timeout_s: float = IDLE_TIMEOUT_S,
        max_peers: int = DEFAULT_MAX_PEERS,
        ctx: zmq.asyncio.Context | None = None,
    ) -> None:
        if max_peers < 1:
            raise ValueError(f"max_peers must be >= 1, got {max_peers}")
        self.endpoint = endpoint
        self.max_peers = max_peers
        self.role = role
        self.liveness = liveness or Liveness()
        self.accept = accept
        self.idle_timeout_s = idle_timeout_s
        self.ctx = ctx or zmq.asyncio.Context.instance()
        self.peers: dict[bytes, Peer] = {}
        self.malformed = MalformedCounter(f"hub {endpoint}")
        self.listeners: list[PeerListener] = []
        self.extra_handlers: dict[type[Message], MessageHandler] = {}  # more message types (set before start)
        self.num_refused = 0  # READYs refused (wrong version, role or model; an id in use; too many peers)
        self.num_hijacks = 0  # of those: another live process claiming a registered peer's id
        self._key = b""  # the CURVE key of the READY being handled
        self._joined = asyncio.Event()
        self._change_waiters: list[asyncio.Future[None]] = []
        self._streams: dict[str, DeltaStream] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._sock: zmq.asyncio.Socket | None = None
        self._monitor: zmq.asyncio.Socket | None = None

    async def start(self) -> None:
        allow = (str(self.role), *self.also_allow)
        self._sock = make_socket(self.ctx, zmq.ROUTER, self.endpoint, bind=True, heartbeat=self.liveness, allow=allow)
        self._monitor = self._sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        handlers: dict[type[Message], MessageHandler] = {
            Outputs: self._on_outputs,
            Heartbeat: self._on_heartbeat,
            Error: self._on_error,
            Ready: self._on_ready,
            **self.extra_handlers,
        }
        note_key = (lambda key: setattr(self, "_key", key)) if security.curve_of(self.ctx) is not None else None
        reader = read_messages(self._sock, handlers, self.malformed, routed=True, on_message=self._seen,
                               on_ready_key=note_key)  # fmt: skip
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(c) for c in (reader, self._beat(), self._watch_disconnects())]

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

    def send_to(self, identity: bytes, msg: Message) -> None:
        """Best-effort send to any peer by identity, registered or not (a Directory answer, say)."""
        if self._sock is not None:
            send(self._sock, msg, identity).add_done_callback(ignore_result)

    def live_peers(self, *, draining: bool = False) -> list[Peer]:
        """Registered peers that take new requests (and, with ``draining``, those finishing up too)."""
        return [p for p in self.peers.values() if draining or not p.load.draining]

    async def wait_for_change(self, timeout_s: float) -> None:
        """Return when a peer joins, starts draining or leaves, or after ``timeout_s``."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._change_waiters.append(waiter)
        try:
            async with asyncio.timeout(timeout_s):  # not wait_for, which can swallow a cancellation (3.11)
                await waiter
        except TimeoutError:
            pass
        finally:
            waiter.cancel()

    async def wait_for_peers(self, n: int = 1, timeout_s: float = 60.0) -> None:
        """Wait until ``n`` peers are registered; TimeoutError names what was missing."""
        try:
            async with asyncio.timeout(timeout_s):
                while len(self.peers) < n:
                    self._joined.clear()
                    await self._joined.wait()
        except TimeoutError:
            raise TimeoutError(f"{len(self.peers)} of {n} {self.role}s registered at {self.endpoint}") from None

    async def stream(self, peer: Peer, request: Request) -> AsyncGenerator[Delta]:
        """Send ``request`` to ``peer`` and yield its deltas until one carries ``finish``.

        Raises RequestError when the peer reports an error, dies, or goes quiet past the idle timeout.
        Leaving the iteration early (client gone) sends Cancel so the engine aborts the request.
        """
        assert self._sock is not None, "Hub.start() first"
        rid = request.request_id
        if rid in self._streams:
            raise RequestError(f"duplicate request id {rid!r}")
        stream = DeltaStream(peer.identity, last_output=asyncio.get_running_loop().time())
        self._streams[rid] = stream
        peer.num_inflight += 1
        done, unfinished = False, num_choices(request)
        try:
            try:
                await send(self._sock, request, peer.identity)
            except zmq.ZMQError as e:
                self._drop(peer, f"unreachable ({e})")
                done = True
                raise peer_lost(f"{self.role} {peer.id} is unreachable") from e
            while True:
                item = await stream.next()
                if isinstance(item, Error):
                    done = True
                    raise RequestError.from_wire(item)
                if item.finish is not None:
                    unfinished -= 1
                    done = unfinished <= 0
                yield item
                if done:
                    return
        finally:
            del self._streams[rid]
            peer.num_inflight -= 1
            if not done and self.peers.get(peer.identity) is peer:
                send(self._sock, Cancel(request_id=rid), peer.identity).add_done_callback(ignore_result)

    # -- messages from peers
    def _seen(self, identity: bytes) -> None:
        peer = self.peers.get(identity)
        if peer is not None:
            peer.last_seen = asyncio.get_running_loop().time()

    def _on_outputs(self, identity: bytes, msg: Outputs) -> None:
        now = asyncio.get_running_loop().time()
        for delta in msg.deltas:
            stream = self._streams.get(delta.request_id)
            if stream is not None and stream.identity == identity:
                stream.last_output = now
                stream.queue.put_nowait(delta)

    def _on_heartbeat(self, identity: bytes, msg: Heartbeat) -> None:
        peer = self.peers.get(identity)
        if peer is not None:
            starts_draining = msg.draining and not peer.load.draining
            peer.load = msg
            if starts_draining:
                log.info("%s %s is draining: it gets no new requests", self.role, peer.id)
                self._tell(PeerEvent("draining", peer))

    def _on_error(self, identity: bytes, msg: Error) -> None:
        stream = self._streams.get(msg.request_id)
        if stream is not None and stream.identity == identity:
            stream.queue.put_nowait(msg)

    def _on_ready(self, identity: bytes, ready: Ready) -> None:

        old = self.peers.get(identity)
        reason = self._refusal(identity, ready, old)
        if reason is not None:
            self._refuse(identity, ready, reason)
            return
        if old is not None and old.ready == ready:
            return  # announced again before it heard from us: nothing changed
        if old is not None:  # a new session: it lost us and cancelled what it had, so fail those streams
            self._drop(old, "re-registered after losing contact")
        peer = self.peers[identity] = Peer(identity, ready, asyncio.get_running_loop().time())
        log.info(
            "%s %s joined at %s from %s: model=%s engine=%s max_num_seqs=%d block_size=%d kv_blocks=%d",
            ready.role, ready.peer_id, self.endpoint, ready.host or "?", ready.model, ready.engine,
            ready.max_num_seqs, ready.block_size, ready.num_kv_blocks,
        )  # fmt: skip
        self._joined.set()
        self._tell(PeerEvent("joined", peer))

    def _refusal(self, identity: bytes, ready: Ready, old: Peer | None) -> str | None:
        if ready.protocol_version != PROTOCOL_VERSION:
            return f"protocol version {ready.protocol_version} is not this hub's {PROTOCOL_VERSION}"
        if ready.role != self.role or not ready.peer_id:
            return f"this hub serves {self.role}s with an id, not {ready.role}s {ready.peer_id!r}"
        reason = (self.accept(ready) if self.accept is not None else None) or self._same_id(identity, ready)
        reason = reason or security.claim(self.ctx, self._key, str(ready.role), ready.peer_id)
        full = old is None and len(self.peers) >= self.max_peers
        return reason or (f"this hub already has its maximum of {self.max_peers} peers (--max-peers)" if full else None)

    def _same_id(self, identity: bytes, ready: Ready) -> str | None:
        """Its own run's new socket takes an id over, another process only once the holder is quiet (restarted)."""
        now = asyncio.get_running_loop().time()
        for other in list(self.peers.values()):
            if other.id != ready.peer_id or other.identity == identity:
                continue
            if other.ready.instance and other.ready.instance == ready.instance:
                self._drop(other, "re-registered on a new connection")
            elif now - other.last_seen <= 1.5 * self.liveness.interval_s:
                self.num_hijacks += 1
                there, here = other.ready.host or "?", ready.host or "?"
                return f"id {ready.peer_id!r} is in use by a live {ready.role} on host {there}; this one is on {here}"
            else:
                self._drop(other, "replaced by a new process with the same id")
        return None

    def _refuse(self, identity: bytes, ready: Ready, reason: str) -> None:  # counted; logged at a bounded rate
        self.num_refused += 1
        if self.num_refused <= 5 or self.num_refused % 100 == 0:
            log.warning("refused %s %s at %s (refusal #%d): %s", ready.role, ready.peer_id, self.endpoint,
                        self.num_refused, reason)  # fmt: skip
        assert self._sock is not None
        send(self._sock, Refused(reason=reason), identity).add_done_callback(ignore_result)

    # -- peers leaving
    def _drop(self, peer: Peer, reason: str) -> None:
        if self.peers.get(peer.identity) is not peer:
            return
        del self.peers[peer.identity]
        failed = 0
        for rid, stream in self._streams.items():
            if stream.identity == peer.identity:
                stream.queue.put_nowait(peer_lost(f"{self.role} {peer.id} {reason}").to_wire(rid))
                failed += 1
        log.warning("%s %s dropped: %s; %d request(s) in flight failed", self.role, peer.id, reason, failed)
        self._tell(PeerEvent("left", peer, reason))

    def _tell(self, event: PeerEvent) -> None:
        for listener in list(self.listeners):
            listener(event)
        waiters, self._change_waiters = self._change_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _probe(self, now: float) -> None:
        """Heartbeat every peer; ROUTER_MANDATORY makes a vanished peer fail at once."""
        assert self._sock is not None
        for peer in list(self.peers.values()):
            if now - peer.last_seen > self.liveness.silence_s:
                self._drop(peer, f"silent for {now - peer.last_seen:.1f}s")
                continue
            sent = send(self._sock, Heartbeat(), peer.identity)
            if sent.done() and sent.exception() is not None:
                self._drop(peer, "disconnected")

    async def _beat(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await stalled_sleep(self.liveness.interval_s)
            now = loop.time()
            self._probe(now)
            for rid, stream in self._streams.items():
                if now - stream.last_output > self.idle_timeout_s:
                    message = f"no output for {self.idle_timeout_s:.0f}s"
                    stream.queue.put_nowait(RequestError(message, 504, "timeout").to_wire(rid))
                    stream.last_output = now

    async def _watch_disconnects(self) -> None:
        assert self._monitor is not None
        loop = asyncio.get_running_loop()
        while True:
            event = parse_monitor_message(await self._monitor.recv_multipart())
            if event["event"] == zmq.EVENT_DISCONNECTED:
                await asyncio.sleep(0.05)  # let the ROUTER retire the peer's pipe first
                self._probe(loop.time())
