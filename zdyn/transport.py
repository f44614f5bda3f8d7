"""The one place zdyn creates ZeroMQ sockets, plus the frame-level send/receive helpers."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

import zmq
import zmq.asyncio

from zdyn import security
from zdyn.protocol import Message, MsgType, ProtocolError, decode, encode

log = logging.getLogger(__name__)

# Messages queued per peer before a send waits. Request paths never drop: DEALER blocks at the HWM and
# ROUTER sockets run with ROUTER_MANDATORY, so a full or unknown peer is an error, not a silent loss.
DEFAULT_HWM = 100_000
READY_TYPE = bytes([MsgType.READY])
MAX_MSG_BYTES = 64 << 20  # a peer sending a larger frame is disconnected (ZMQ_MAXMSGSIZE)
READ_BATCH = 16  # a reader yields to the event loop after this many messages that were already waiting
SCHEMES = ("tcp://", "ipc://", "inproc://")


class TransportError(Exception):
    """A socket could not be created, bound or used."""


class BadEndpoint(TransportError, ValueError):
    """An endpoint string zdyn cannot use (a setting to fix, not a runtime failure)."""


@dataclass(slots=True)
class Liveness:
    """Heartbeat settings: a peer silent for ``interval_s * misses`` seconds is dead."""

    interval_s: float = 1.0
    misses: int = 3

    def __post_init__(self) -> None:
        if self.interval_s <= 0 or self.misses < 1:
            raise ValueError(f"heartbeat interval must be > 0 and misses >= 1, got {self}")

    @property
    def expiry_s(self) -> float:
        """A connection with no traffic for this long is dead. libzmq's own heartbeats (ZMTP PING/PONG, in
        its I/O thread, so a busy event loop cannot starve them) check it and close the connection."""
        return self.interval_s * self.misses

    @property
    def silence_s(self) -> float:
        """A peer whose connection is alive but whose application sent nothing for this long is stuck. Much
        longer than ``expiry_s``: a process busy for a few seconds (a loaded box) is slow, not dead."""
        return self.expiry_s * STALL_FACTOR


STALL_FACTOR = 5


def check_endpoint(endpoint: str) -> str:
    if not endpoint.startswith(SCHEMES):
        raise BadEndpoint(f"endpoint {endpoint!r} must start with one of {', '.join(SCHEMES)}")
    return endpoint


def bind_address(endpoint: str) -> str:
    """``tcp://host:port`` -> ``tcp://*:port`` so a hub listens on every interface of its host."""
    if endpoint.startswith("tcp://"):
        host, _, port = endpoint[len("tcp://") :].rpartition(":")
        if host not in ("*", "0.0.0.0", "127.0.0.1", "localhost", "::", "[::]"):
            return f"tcp://*:{port}"
    return endpoint


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")
WILDCARD_HOSTS = ("*", "0.0.0.0", "::", "[::]", "")


def endpoint_host(endpoint: str) -> str:
    """``tcp://host:port`` -> ``host`` (brackets of an IPv6 address removed); ``""`` for other transports."""
    if not endpoint.startswith("tcp://"):
        return ""
    return endpoint[len("tcp://") :].rpartition(":")[0].strip("[]")


def is_loopback(host: str) -> bool:
    """True for addresses only this host can reach (127.0.0.0/8, ::1, localhost)."""
    return host.strip("[]") in LOOPBACK_HOSTS or host.startswith("127.")


def is_remote(endpoint: str) -> bool:
    """True for a TCP endpoint on another host (neither loopback nor a wildcard)."""
    host = endpoint_host(endpoint)
    return endpoint.startswith("tcp://") and not is_loopback(host) and host not in WILDCARD_HOSTS


def unreachable_hint(endpoint: str, flag: str) -> str:
    """What to check when nothing answers at ``endpoint``: a loopback address that names this host while the
    peer runs on another, or a peer that is down or firewalled."""
    if is_remote(endpoint):
        return "is it running, and does this host reach that address (firewall, host name)?"
    return f"{endpoint} is this host: if that role runs on another host, give its address ({flag} tcp://HOST:PORT)"


def host_towards(endpoint: str) -> str:
    """This host's address as seen from ``endpoint``'s host: loopback for local endpoints, else the address
    of the interface that routes there (found without sending anything)."""
    if not endpoint.startswith("tcp://"):
        return "127.0.0.1"
    host = endpoint_host(endpoint)
    if is_loopback(host) or host in WILDCARD_HOSTS:
        return "127.0.0.1"
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect((host, 9))  # UDP connect only picks a route
            return str(s.getsockname()[0])
    except OSError:
        return socket.gethostname()


def advertised(endpoint: str, host: str) -> str:
    """A bind endpoint (``tcp://*:5557``) as others connect to it (``tcp://host:5557``)."""
    if not endpoint.startswith("tcp://"):
        return endpoint
    bound, _, port = endpoint[len("tcp://") :].rpartition(":")
    if bound in ("*", "0.0.0.0", "::", "[::]"):
        host = f"[{host}]" if ":" in host else host
        return f"tcp://{host}:{port}"
    return endpoint


def make_socket(
    ctx: zmq.asyncio.Context,
    kind: int,
    endpoint: str,
    *,
    bind: bool | None = None,
    identity: bytes | None = None,
    hwm: int = DEFAULT_HWM,
    mandatory: bool = True,
    allow: Collection[str] | None = None,
    max_msg_bytes: int = MAX_MSG_BYTES,
    heartbeat: Liveness | None = None,
) -> zmq.asyncio.Socket:
    """Create, configure and bind or connect a socket. ``bind`` defaults to True for ROUTER and PUB.

    ROUTER sockets fail a send to an unknown peer (``mandatory``) rather than dropping it; a replay server
    answering anonymous one-off clients turns that off. When ``ctx`` has keys (``security.install``), tcp
    sockets use CURVE: a bound one admits the client keys of the roles in ``allow``, a connecting one
    authenticates with this process's role key. A ROUTER never hands a live peer's route to a newcomer with
    the same routing id (no ROUTER_HANDOVER): spokes use a random id per socket."""
    check_endpoint(endpoint)
    if bind is None:
        bind = kind in (zmq.ROUTER, zmq.PUB)
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.RCVHWM, hwm)
    sock.setsockopt(zmq.MAXMSGSIZE, max_msg_bytes)
    if kind == zmq.ROUTER and mandatory:
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    if heartbeat is not None:  # connection liveness in libzmq's I/O thread: a partition closes the connection
        sock.setsockopt(zmq.HEARTBEAT_IVL, int(heartbeat.interval_s * 1000))
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(heartbeat.expiry_s * 1000))
        sock.setsockopt(zmq.HEARTBEAT_TTL, int(heartbeat.expiry_s * 1000))
    if kind == zmq.SUB:
        sock.setsockopt(zmq.SUBSCRIBE, b"")
    if identity is not None:
        sock.setsockopt(zmq.IDENTITY, identity)
    if endpoint.startswith("tcp://") and not _is_ipv4(endpoint[len("tcp://") :].rpartition(":")[0]):
        sock.setsockopt(zmq.IPV6, 1)  # wildcards, names and IPv6 addresses (an IPv4 address reads back as itself)
    try:
        security.configure(sock, ctx, endpoint, bind=bind, allow=allow)
    except security.KeysError:
        sock.close()
        raise
    try:
        if bind:
            sock.bind(endpoint)
        else:
            sock.connect(endpoint)
    except zmq.ZMQError as e:
        sock.close()
        verb = "bind" if bind else "connect"
        raise TransportError(f"cannot {verb} {endpoint}: {e}") from e
    return sock


def _is_ipv4(host: str) -> bool:
    try:
        socket.inet_pton(socket.AF_INET, host)
        return True
    except OSError:
        return False


class MalformedCounter:
    """Counts dropped frames and logs the first few and then every hundredth."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.count = 0

    def drop(self, reason: str) -> None:
        self.count += 1
        if self.count <= 5 or self.count % 100 == 0:
            log.warning("%s: dropped malformed message #%d: %s", self.where, self.count, reason)


def decode_or_count(frames: list[bytes], malformed: MalformedCounter) -> Message | None:
    try:
        return decode(frames)
    except ProtocolError as e:
        malformed.drop(str(e))
        return None


MessageHandler = Callable[[bytes, Any], None]  # (sender identity, or b"" on unrouted sockets; the message)


async def read_messages(
    sock: zmq.asyncio.Socket,
    handlers: Mapping[type[Message], MessageHandler],
    malformed: MalformedCounter,
    *,
    routed: bool = False,
    on_message: Callable[[bytes], None] | None = None,
    on_ready_key: Callable[[bytes], None] | None = None,
) -> None:
    """Read messages for ever and dispatch each by type: ``handlers[type(msg)](identity, msg)``.

    ``routed``: a ROUTER socket, whose first frame names the sender. ``on_message(identity)`` runs first for
    every valid message (liveness bookkeeping); ``on_ready_key(key)`` before each READY with the client's CURVE
    key. Malformed frames and messages of a type with no handler are dropped and counted."""
    received = 0
    while True:
        if on_ready_key is None:
            frames = await sock.recv_multipart()
        else:  # a CURVE server that needs each READY's key: frames carry it (User-Id) when not copied
            parts = await sock.recv_multipart(copy=False)
            frames = [p.bytes for p in parts]
            if len(frames) > int(routed) and frames[int(routed)] == READY_TYPE:
                on_ready_key(_user_id(parts[-1]))
        received += 1
        if received % READ_BATCH == 0:
            await asyncio.sleep(0)  # awaiting a message that is already queued does not yield: let others run
        identity = b""
        if routed:
            if len(frames) < 2:
                malformed.drop(f"{len(frames)} frame(s) on a ROUTER socket")
                continue
            identity, frames = frames[0], frames[1:]
        msg = decode_or_count(frames, malformed)
        if msg is None:
            continue
        if on_message is not None:
            on_message(identity)
        handler = handlers.get(type(msg))
        if handler is None:
            malformed.drop(f"unexpected {type(msg).__name__}")
            continue
        handler(identity, msg)


def _user_id(frame: zmq.Frame) -> bytes:
    try:
        return str(frame.get("User-Id")).encode()
    except zmq.ZMQError:
        return b""


def send(sock: zmq.asyncio.Socket, msg: Message, identity: bytes | None = None) -> zmq.asyncio.Future[Any]:
    """Queue a message for sending; the returned future fails if the peer is unknown (ROUTER)."""
    frames = encode(msg)
    if identity is not None:
        frames.insert(0, identity)
    return sock.send_multipart(frames, copy=False)  # type: ignore[return-value]


def free_tcp_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct TCP ports free on ``host`` right now (held open together, so never the same one twice).
    Only for sockets zdyn cannot bind to port 0 itself (an engine's own publishers)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind((host, 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


STALL_GRACE_S = 0.1


async def stalled_sleep(interval_s: float) -> None:
    """Sleep ``interval_s``; if this process's event loop was stalled meanwhile (busy CPU, a blocking call),
    wait a moment longer so that readers handle what arrived during the stall before anyone is declared silent."""
    loop = asyncio.get_running_loop()
    due = loop.time() + interval_s
    await asyncio.sleep(interval_s)
    if loop.time() - due > interval_s:
        await asyncio.sleep(STALL_GRACE_S)


def ignore_result(future: asyncio.Future[object]) -> None:
    """Done-callback for best-effort sends (heartbeats, cancels): retrieve the outcome so none is logged."""
    if not future.cancelled():
        future.exception()


def log_send_error(future: asyncio.Future[object]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.error("send failed: %s", future.exception())
