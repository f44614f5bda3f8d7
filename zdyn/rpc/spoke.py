"""The DEALER side of zdyn's streaming RPC: register with hubs, serve their requests, beat hearts."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import msgspec
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from zdyn.errors import RequestError, draining
from zdyn.protocol import (
    Cancel,
    Delta,
    Directory,
    Error,
    Generate,
    Heartbeat,
    Message,
    Outputs,
    Process,
    Ready,
    Refused,
    Request,
)
from zdyn.transport import (
    Liveness,
    MalformedCounter,
    MessageHandler,
    host_towards,
    ignore_result,
    log_send_error,
    make_socket,
    read_messages,
    send,
    stalled_sleep,
    unreachable_hint,
)

log = logging.getLogger(__name__)

Handler = Callable[[Request], AsyncIterator[Delta]]
DirectoryListener = Callable[[str, Directory], None]  # (the endpoint of the hub that sent it, the directory)
SILENT_WARNING_S = 5.0  # a hub that has not answered for this long gets one WARNING naming its endpoint


def _ignore(identity: bytes, msg: object) -> None:
    pass


class RefusedError(Exception):
    """A hub refused this spoke's READY (for example another protocol version)."""


@dataclass(slots=True, eq=False)
class _Link:
    """A spoke's connection to one hub."""

    endpoint: str
    sock: zmq.asyncio.Socket | None = None
    reader: asyncio.Task[None] | None = None
    watcher: asyncio.Task[None] | None = None
    last_seen: float = 0.0
    heard: bool = False  # the hub has answered since this socket was opened
    session: int = 0  # sockets opened to this hub so far, minus one
    discovered: bool = False  # learned from a hub's Directory (closed, not the spoke, when refused)
    hub_id: str = ""  # the hub's id, once its Directory named it
    opened_at: float = 0.0
    warned: bool = False  # the silence WARNING was logged
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
        ready_for: Callable[[str], Ready] | None = None,
        on_directory: DirectoryListener | None = None,
        ctx: zmq.asyncio.Context | None = None,
    ) -> None:
        if not hubs:
            raise ValueError("a spoke needs at least one hub endpoint to connect to")
        if not ready.instance or not ready.host:
            ready = msgspec.structs.replace(
                ready, instance=ready.instance or secrets.token_hex(8), host=ready.host or host_towards(hubs[0])
            )
        self.ready = ready
        self.handler = handler
        self.load = load or Heartbeat
        self.liveness = liveness or Liveness()
        self.ready_for = ready_for  # the READY for one hub (its advertised addresses), if not ``ready``
        self.on_directory = on_directory
        self.ctx = ctx or zmq.asyncio.Context.instance()
        # Unique and unguessable per process (no ROUTER_HANDOVER): nobody takes this peer's route by naming its
        # id, and the hub tells this run's sockets (same ``instance``) from another process's.
        self.identity = f"{ready.peer_id[:64]}#{secrets.token_hex(8)}".encode()
        self.links = [_Link(endpoint) for endpoint in hubs]
        self._running = False
        self.malformed = MalformedCounter(f"{ready.role} {ready.peer_id}")
        self.outcomes: Counter[str] = Counter()  # requests served by how they ended: finished, failed, cancelled
        self.cancels: Counter[str] = Counter()  # Cancels heard: in_flight (the request stopped) or after_end
        self._stopped = asyncio.Event()
        self._refusal: str | None = None
        self._beater: asyncio.Task[None] | None = None
        self.draining = False
        self._idle = asyncio.Event()  # set whenever no request is in flight

    @property
    def num_requests(self) -> int:
        return sum(len(link.requests) for link in self.links)

    async def run(self) -> None:
        """Serve until ``close()``; raises RefusedError if a hub refuses this spoke."""
        loop = asyncio.get_running_loop()
        self._running = True
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

    def linked(self, endpoint: str) -> bool:
        return any(link.endpoint == endpoint for link in self.links)

    def add_hub(self, endpoint: str, *, discovered: bool = True) -> bool:
        """Register at one more hub while running; False if already linked to it."""
        if self.linked(endpoint):
            return False
        link = _Link(endpoint, discovered=discovered)
        self.links.append(link)
        if self._running:
            self._open(link, asyncio.get_running_loop().time())
        return True

    def remove_hub(self, endpoint: str) -> None:
        """Leave a hub: its requests are cancelled (the hub fails them when it notices)."""
        for link in [link for link in self.links if link.endpoint == endpoint]:
            self.links.remove(link)
            self._close_link(link)

    def tell_hubs(self, msg: Message) -> None:
        """Send ``msg`` to every hub this spoke is linked to (best effort)."""
        for link in self.links:
            if link.sock is not None:
                send(link.sock, msg).add_done_callback(ignore_result)

    async def drain(self, timeout_s: float) -> int:
        """Shut down gracefully: tell every hub that this peer takes nothing new, let the requests in flight
        finish for up to ``timeout_s``, then hand the rest back (a ``draining`` error, which the hub's side
        re-issues elsewhere) and stop. Returns how many requests were handed back."""
        self.draining = True
        self._send_beats()
        log.info("%s %s draining: %d request(s) in flight, up to %.0fs",
                 self.ready.role, self.ready.peer_id, self.num_requests, timeout_s)  # fmt: skip
        try:
            async with asyncio.timeout(timeout_s):
                while self.num_requests:
                    self._idle.clear()
                    await self._idle.wait()
        except TimeoutError:
            pass
        handed_back = 0
        gone = draining(f"{self.ready.role} {self.ready.peer_id} is shutting down")
        for link in self.links:
            for rid, task in list(link.requests.items()):
                task.cancel()
                self._reply_error(link, gone.to_wire(rid))
                handed_back += 1
            link.requests.clear()
            self._flush(link)
        if handed_back:
            log.warning("drain timed out: handed %d request(s) back to be moved", handed_back)
            await asyncio.sleep(0.05)  # let the sends leave before the sockets close
        self.close()
        return handed_back

    def _open(self, link: _Link, now: float) -> None:

        link.sock = make_socket(
            self.ctx, zmq.DEALER, link.endpoint, bind=False, identity=self.identity, heartbeat=self.liveness
        )
        link.last_seen = now
        link.heard = False
        link.opened_at = now
        link.warned = False
        send(link.sock, self._ready(link)).add_done_callback(ignore_result)
        link.reader = asyncio.get_running_loop().create_task(self._read(link))
        link.watcher = asyncio.get_running_loop().create_task(self._watch(link, link.sock))

    def _reset(self, link: _Link, now: float) -> None:
        """The hub went quiet. One that never answered may not be up yet: announce again on the same socket.
        One that did answer is presumed dead: drop its requests and reconnect with a fresh socket."""
        if not link.heard:
            log.debug("no answer from hub %s yet; announcing %s again", link.endpoint, self.ready.peer_id)
            assert link.sock is not None
            send(link.sock, self._ready(link)).add_done_callback(ignore_result)
            link.last_seen = now
            return
        log.warning(
            "hub %s silent for %.1fs: cancelling %d request(s), reconnecting",
            link.endpoint, now - link.last_seen, len(link.requests),
        )  # fmt: skip
        self._close_link(link)
        link.session += 1
        self._open(link, now)

    def _ready(self, link: _Link) -> Ready:
        ready = self.ready_for(link.endpoint) if self.ready_for is not None else self.ready
        return msgspec.structs.replace(ready, session=link.session, instance=self.ready.instance)

    def _close_link(self, link: _Link) -> None:
        for task in link.requests.values():
            task.cancel()
        link.requests.clear()
        link.pending.clear()
        for helper in (link.reader, link.watcher):
            if helper is not None:
                helper.cancel()
        if link.sock is not None:
            with contextlib.suppress(zmq.ZMQError):  # its context may be gone already
                link.sock.disable_monitor()
            link.sock.close(linger=0)
            link.sock = None

    async def _shutdown(self) -> None:
        tasks = [t for link in self.links for t in link.requests.values()]
        if self._beater is not None:
            self._beater.cancel()
            tasks.append(self._beater)
        for link in self.links:
            tasks += [t for t in (link.reader, link.watcher) if t is not None]
            self._close_link(link)
        await asyncio.gather(*tasks, return_exceptions=True)

    def _read(self, link: _Link) -> Coroutine[Any, Any, None]:
        assert link.sock is not None

        def heard(identity: bytes) -> None:
            link.last_seen = asyncio.get_running_loop().time()
            link.heard = True
            link.warned = False

        def request(identity: bytes, msg: Request) -> None:
            if msg.request_id in link.requests:
                self.malformed.drop(f"duplicate request id {msg.request_id!r}")
                return
            if self.draining:  # sent before the hub heard we are draining: it goes elsewhere
                self._reply_error(link, draining(f"{self.ready.peer_id} is draining").to_wire(msg.request_id))
                return
            link.requests[msg.request_id] = asyncio.get_running_loop().create_task(self._serve(link, msg))

        def cancel(identity: bytes, msg: Cancel) -> None:
            task = link.requests.pop(msg.request_id, None)
            self.cancels["in_flight" if task is not None else "after_end"] += 1
            if task is not None:
                log.info("request %s cancelled by %s", msg.request_id, link.endpoint)
                task.cancel()
            else:  # it ended before the cancel arrived: a race, nothing to do
                log.info("cancel for request %s from %s: it has already ended", msg.request_id, link.endpoint)

        def refused(identity: bytes, msg: Refused) -> None:
            if link.discovered:  # a hub we were told of, not one we were given: leave it, keep serving the others
                log.warning("discovered hub %s refused %s: %s; leaving it", link.endpoint, self.ready.peer_id,
                            msg.reason)  # fmt: skip
                asyncio.get_running_loop().call_soon(self.remove_hub, link.endpoint)
                return
            log.error("hub %s refused %s: %s", link.endpoint, self.ready.peer_id, msg.reason)
            self._refusal = f"hub {link.endpoint} refused us: {msg.reason}"
            self._stopped.set()

        def directory(identity: bytes, msg: Directory) -> None:
            if msg.sender:
                link.hub_id = msg.sender
            if self.on_directory is not None:
                self.on_directory(link.endpoint, msg)

        handlers: dict[type[Message], MessageHandler] = {
            Generate: request,
            Process: request,
            Cancel: cancel,
            Refused: refused,
            Heartbeat: _ignore,
            Directory: directory,
        }
        return read_messages(link.sock, handlers, self.malformed, on_message=heard)

    async def _serve(self, link: _Link, request: Request) -> None:
        rid, outcome = request.request_id, "cancelled"  # by the hub, or because the hub was lost
        try:
            async for delta in self.handler(request):
                self._emit(link, delta)
            outcome = "finished"
        except asyncio.CancelledError:
            raise
        except RequestError as e:
            outcome = "failed"
            self._reply_error(link, e.to_wire(rid))
        except Exception as e:
            outcome = "failed"
            log.exception("request %s failed", rid)
            self._reply_error(link, RequestError(f"{type(e).__name__}: {e}", 500, "internal_error").to_wire(rid))
        finally:
            self.outcomes[outcome] += 1
            if link.requests.get(rid) is asyncio.current_task():
                del link.requests[rid]
            if not self.num_requests:
                self._idle.set()

    def _emit(self, link: _Link, delta: Delta) -> None:
        if not link.pending:
            asyncio.get_running_loop().call_soon(self._flush, link)
        link.pending.append(delta)

    def _flush(self, link: _Link) -> None:
        if link.pending and link.sock is not None:
            send(link.sock, Outputs(deltas=link.pending)).add_done_callback(log_send_error)
        link.pending = []

    def _reply_error(self, link: _Link, failure: Error) -> None:
        self._flush(link)
        if link.sock is not None:
            send(link.sock, failure).add_done_callback(log_send_error)

    def _send_beats(self, now: float | None = None) -> None:
        beat = self.load()
        beat.draining = self.draining
        quiet_s = max(SILENT_WARNING_S, 2 * self.liveness.interval_s)
        for link in self.links:
            if now is not None and not link.warned and now - max(link.last_seen, link.opened_at) > quiet_s:
                link.warned = True  # once per outage: hearing from the hub again re-arms it
                log.warning("hub %s silent for %.0fs: %s", link.endpoint, now - max(link.last_seen, link.opened_at),
                            unreachable_hint(link.endpoint, "--connect"))  # fmt: skip
            if now is not None and now - link.last_seen > self.liveness.silence_s:
                self._reset(link, now)
            elif link.sock is not None:
                send(link.sock, beat).add_done_callback(ignore_result)

    async def _beat(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await stalled_sleep(self.liveness.interval_s)
            self._send_beats(loop.time())

    async def _watch(self, link: _Link, sock: zmq.asyncio.Socket) -> None:
        """The connection to the hub broke (the hub died, or libzmq's heartbeat timed out): its requests are
        lost, so stop them. When it connects again (a restarted hub) announce this peer at once."""
        monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED)
        lost = False
        try:
            while True:
                event = parse_monitor_message(await monitor.recv_multipart())
                if event["event"] == zmq.EVENT_DISCONNECTED:
                    lost = True
                    if link.requests:
                        log.warning("lost hub %s: cancelling %d request(s)", link.endpoint, len(link.requests))
                    for task in link.requests.values():
                        task.cancel()
                    link.requests.clear()
                elif lost:
                    lost = False
                    link.session += 1
                    log.info("hub %s is back: announcing %s again", link.endpoint, self.ready.peer_id)
                    send(sock, self._ready(link)).add_done_callback(ignore_result)
        finally:
            monitor.close(linger=0)
