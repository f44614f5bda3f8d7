"""The one place zdyn creates ZeroMQ sockets, plus the frame-level send/receive helpers."""

from __future__ import annotations

import asyncio
import logging
import socket
from dataclasses import dataclass

import zmq
import zmq.asyncio

from zdyn.protocol import Error, Message, ProtocolError, decode, encode

log = logging.getLogger(__name__)

# Messages queued per peer before a send waits. Request paths never drop: DEALER blocks at the HWM and
# ROUTER sockets run with ROUTER_MANDATORY, so a full or unknown peer is an error, not a silent loss.
DEFAULT_HWM = 100_000
READ_BATCH = 16  # a reader yields to the event loop after this many messages that were already waiting
SCHEMES = ("tcp://", "ipc://", "inproc://")


class TransportError(Exception):
    """A socket could not be created, bound or used."""


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
        return self.interval_s * self.misses


def check_endpoint(endpoint: str) -> str:
    if not endpoint.startswith(SCHEMES):
        raise TransportError(f"endpoint {endpoint!r} must start with one of {', '.join(SCHEMES)}")
    return endpoint


def bind_address(endpoint: str) -> str:
    """``tcp://host:port`` -> ``tcp://*:port`` so a hub listens on every interface of its host."""
    if endpoint.startswith("tcp://"):
        host, _, port = endpoint[len("tcp://") :].rpartition(":")
        if host not in ("*", "0.0.0.0", "127.0.0.1", "localhost", "::", "[::]"):
            return f"tcp://*:{port}"
    return endpoint


def host_towards(endpoint: str) -> str:
    """This host's address as seen from ``endpoint``'s host: loopback for local endpoints, else the address
    of the interface that routes there (found without sending anything)."""
    if not endpoint.startswith("tcp://"):
        return "127.0.0.1"
    host = endpoint[len("tcp://") :].rpartition(":")[0].strip("[]")
    if host in ("127.0.0.1", "localhost", "::1", "*", "0.0.0.0", ""):
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
) -> zmq.asyncio.Socket:
    """Create, configure and bind or connect a socket. ``bind`` defaults to True for ROUTER and PUB."""
    check_endpoint(endpoint)
    if bind is None:
        bind = kind in (zmq.ROUTER, zmq.PUB)
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.RCVHWM, hwm)
    if kind == zmq.ROUTER:
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a peer reconnecting under its identity takes over its route
    if kind == zmq.SUB:
        sock.setsockopt(zmq.SUBSCRIBE, b"")
    if identity is not None:
        sock.setsockopt(zmq.IDENTITY, identity)
    if endpoint.startswith("tcp://"):
        sock.setsockopt(zmq.IPV6, 1)
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


def send(sock: zmq.asyncio.Socket, msg: Message, identity: bytes | None = None) -> zmq.asyncio.Future:
    """Queue a message for sending; the returned future fails if the peer is unknown (ROUTER)."""
    frames = encode(msg)
    if identity is not None:
        frames.insert(0, identity)
    return sock.send_multipart(frames, copy=False)  # type: ignore[return-value]


def error(request_id: str, message: str, status: int = 503, type: str = "unavailable") -> Error:
    return Error(request_id=request_id, message=message, status=status, type=type)


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
