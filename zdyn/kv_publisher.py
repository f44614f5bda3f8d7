"""KV events leave a worker's host only encrypted: zdyn's publisher, and the relay in front of an engine's own.

``KvEventPublisher`` publishes batches in vLLM's wire format (the mocker's engine uses it); its sockets are made
by ``make_socket``, so over tcp with keys they use CURVE and admit only the roles that read KV events.
vLLM's own publisher cannot use CURVE: a zdyn worker binds it to a host-private ``ipc://`` endpoint, and
``KvEventRelay`` takes its batches (same sequence numbers) and publishes them again on the advertised interface,
where readers need a router, processor or frontend key. Nothing carrying token ids leaves the host in the clear.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Collection, Iterable

import zmq
import zmq.asyncio

from zdyn.kv_events import (
    DEFAULT_BUFFER_STEPS,
    END_SEQ,
    KvEvent,
    KvEventError,
    decode_payload,
    encode_frames,
    encode_payload,
    split_replay_reply,
)
from zdyn.kv_state import KvBlockState
from zdyn.transport import DEFAULT_HWM, MalformedCounter, TransportError, make_socket

log = logging.getLogger(__name__)
KV_READERS = ("router", "processor", "frontend")  # the roles whose keys may read KV events
REPLAY_TIMEOUT_S = 2.0


def is_bind_endpoint(endpoint: str) -> bool:
    """vLLM's rule: bind wildcard, IPv6-any and ipc/inproc endpoints, connect to everything else."""
    return "*" in endpoint or "::" in endpoint or endpoint.startswith(("ipc://", "inproc://"))


class KvEventPublisher:
    """Publishes KV event batches like vLLM's ZmqEventPublisher, from asyncio code.

    ``seq`` starts at 0 in every process and counts batches. With ``replay_endpoint`` a ROUTER socket
    answers ``[id, "", start_seq]`` with every buffered batch whose seq >= start_seq, then an end marker. When
    start_seq is older than the buffer, the answer begins with a snapshot of the blocks cached now (``kv_state``),
    numbered just before the oldest buffered batch, so a reader of any age ends with the whole picture.
    """

    def __init__(
        self,
        endpoint: str,
        *,
        replay_endpoint: str | None = None,
        topic: str = "",
        buffer_steps: int = DEFAULT_BUFFER_STEPS,
        hwm: int = DEFAULT_HWM,
        data_parallel_rank: int = 0,
        bind: bool | None = None,
        allow: Collection[str] = KV_READERS,
        ctx: zmq.asyncio.Context | None = None,
    ) -> None:
        self._topic = topic.encode()
        self._dp_rank = data_parallel_rank
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=buffer_steps)
        self.state = KvBlockState()
        self.snapshots_sent = 0
        self._next_seq = 0
        self._ctx = ctx or zmq.asyncio.Context.instance()
        # PUB drops silently past the HWM, so keep it large: a slow router then lags instead of losing events.
        bind = is_bind_endpoint(endpoint) if bind is None else bind
        self._pub = make_socket(self._ctx, zmq.PUB, endpoint, bind=bind, hwm=hwm, allow=allow)
        self.endpoint = self._pub.getsockopt_string(zmq.LAST_ENDPOINT) if bind else endpoint
        self._replay: zmq.asyncio.Socket | None = None
        self._replay_task: asyncio.Task[None] | None = None
        self.replay_endpoint: str | None = None
        if replay_endpoint is not None:
            try:
                # A full replay is buffer_steps + 1 messages to one peer; past its HWM a ROUTER would drop the rest.
                # Its clients are one-off DEALERs: one that left is no error (not mandatory).
                self._replay = make_socket(
                    self._ctx, zmq.ROUTER, replay_endpoint, bind=True, hwm=buffer_steps + 16, mandatory=False,
                    allow=allow,
                )  # fmt: skip
            except TransportError:
                self._pub.close(linger=0)
                raise
            self.replay_endpoint = self._replay.getsockopt_string(zmq.LAST_ENDPOINT)

    @property
    def next_seq(self) -> int:
        return self._next_seq

    async def start(self) -> None:
        if self._replay is not None and self._replay_task is None:
            self._replay_task = asyncio.create_task(self._serve_replay(), name="kv-events-replay")

    async def publish(self, events: Iterable[KvEvent], ts: float | None = None) -> int:
        """Send one batch; returns its seq."""
        events = list(events)
        self.state.apply(events)
        payload = encode_payload(events, ts, self._dp_rank)
        seq = self._next_seq
        self._next_seq += 1
        self._buffer.append((seq, payload))
        await self._pub.send_multipart(encode_frames(self._topic, seq, payload))
        return seq

    async def forward(self, seq: int, payload: bytes) -> None:
        """Publish a batch another publisher numbered (a relay keeps the engine's sequence)."""
        try:
            self.state.apply(decode_payload(payload, seq).events)
        except KvEventError:
            log.warning("KV-event batch %d does not decode: forwarded, but not in the replay snapshot", seq)
        self._next_seq = seq + 1
        self._buffer.append((seq, payload))
        await self._pub.send_multipart(encode_frames(self._topic, seq, payload))

    async def close(self) -> None:
        if self._replay_task is not None:
            self._replay_task.cancel()
            try:
                await self._replay_task
            except asyncio.CancelledError:
                pass
            self._replay_task = None
        self._close_sockets()

    async def __aenter__(self) -> KvEventPublisher:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _close_sockets(self) -> None:
        self._pub.close(linger=0)
        if self._replay is not None:
            self._replay.close(linger=0)

    async def _serve_replay(self) -> None:
        assert self._replay is not None
        while True:
            frames = await self._replay.recv_multipart()
            if len(frames) != 3 or frames[1] != b"" or len(frames[2]) != 8:
                continue  # not a replay request; vLLM ignores these too
            client_id, start = frames[0], int.from_bytes(frames[2], "big")
            oldest = self._buffer[0][0] if self._buffer else self._next_seq
            if start < oldest and self._next_seq > 0:  # some of what the reader asks for is gone: the state
                snapshot = encode_payload(self.state.snapshot(), None, self._dp_rank)
                self.snapshots_sent += 1
                await self._replay.send_multipart(
                    [client_id, b"", self._topic, (oldest - 1).to_bytes(8, "big"), snapshot]
                )
            for seq, payload in list(self._buffer):
                if seq >= start:
                    await self._replay.send_multipart([client_id, b"", self._topic, seq.to_bytes(8, "big"), payload])
            await self._replay.send_multipart([client_id, b"", b"", END_SEQ, b""])


async def fetch_replay(
    ctx: zmq.asyncio.Context, endpoint: str, start: int, timeout_s: float = REPLAY_TIMEOUT_S
) -> list[tuple[int, bytes]]:
    """Every batch the replay server at ``endpoint`` still holds with seq >= ``start``, as (seq, payload) in
    order. Raises TimeoutError (no complete answer in time) or KvEventError (a malformed one)."""
    sock = make_socket(ctx, zmq.DEALER, endpoint, bind=False)
    batches: list[tuple[int, bytes]] = []
    try:
        await sock.send_multipart([b"", start.to_bytes(8, "big")])
        async with asyncio.timeout(timeout_s):
            while True:
                seq, payload = split_replay_reply(await sock.recv_multipart())
                if seq < 0:
                    break
                batches.append((seq, payload))
    finally:
        sock.close(linger=0)
    return sorted(batches)


class KvEventRelay:
    """An engine's KV events from its host-private publisher (``source``, plain ipc) to ``endpoint`` (bound, CURVE
    with keys), with a replay socket of its own at ``replay_endpoint``. A gap on the private side (the relay
    subscribed late) is filled from the engine's replay socket ``source_replay`` when there is one."""

    def __init__(
        self,
        source: str,
        source_replay: str,
        endpoint: str,
        replay_endpoint: str,
        *,
        buffer_steps: int = DEFAULT_BUFFER_STEPS,
        ctx: zmq.asyncio.Context | None = None,
    ) -> None:
        self.source = source
        self.source_replay = source_replay
        self.ctx = ctx or zmq.asyncio.Context.instance()
        self.out = KvEventPublisher(
            endpoint, replay_endpoint=replay_endpoint, buffer_steps=buffer_steps, bind=True, ctx=self.ctx
        )
        self.endpoint = self.out.endpoint
        self.replay_endpoint = self.out.replay_endpoint or ""
        self.forwarded = 0
        self.refilled = 0  # batches fetched from the engine's replay after a gap
        self.malformed = MalformedCounter(f"KV-event relay of {source}")
        self._sub: zmq.asyncio.Socket | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._sub = make_socket(self.ctx, zmq.SUB, self.source, bind=False)
        await self.out.start()
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"kv-relay {self.source}")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._sub is not None:
            self._sub.close(linger=0)
        await self.out.close()

    async def _run(self) -> None:
        assert self._sub is not None
        expected = 0
        while True:
            frames = await self._sub.recv_multipart()
            if len(frames) != 3 or len(frames[1]) != 8:
                self.malformed.drop(f"{len(frames)} frames, not [topic, seq, payload]")
                continue
            seq = int.from_bytes(frames[1], "big")
            if seq > expected and self.source_replay:
                await self._refill(expected, seq)
            await self.out.forward(seq, frames[2])
            self.forwarded += 1
            expected = seq + 1

    async def _refill(self, start: int, until: int) -> None:
        try:
            missed = await fetch_replay(self.ctx, self.source_replay, start)
        except (TimeoutError, KvEventError) as e:
            log.warning("KV-event relay: batches %d..%d missed and not replayed by %s: %s", start, until - 1,
                        self.source_replay, e or "timed out")  # fmt: skip
            return
        for seq, payload in missed:
            if start <= seq < until:
                await self.out.forward(seq, payload)
                self.refilled += 1
