"""The two ends of a bare ZeroMQ streaming pair, for measuring zdyn's RPC without HTTP: the server side.

The client binds a ROUTER (as zdyn's ``Hub`` on the processor's side), each server connects a DEALER (as zdyn's
``Spoke`` on the worker's side), announces itself and answers each request with a stream of deltas. Servers:

* ``bare``: pyzmq with msgspec-MessagePack dicts shaped like zdyn's ``Delta``, one message per delta.
* ``bare-batched``: the same, but one "engine step" per event-loop turn sends one message with a delta for every
  active stream (what vLLM and zdyn's workers do per engine step).
* ``zdyn``: a ``Spoke`` whose handler yields the deltas, one loop turn apart; the spoke sends the deltas of one turn
  as one ``Outputs`` message.

The clients and the runner are in ``zdyn.bench.zmq_pair``.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from zdyn.protocol import Delta, Finish, Generate, Ready, Role
from zdyn.rpc import Request, Spoke

IMPLS = ("bare", "bare-batched", "zdyn")
HWM = 100_000  # zdyn's DEFAULT_HWM, used for the bare sockets too
FIRST_TOKEN = 1000  # token ids FIRST_TOKEN + i: 2-3 byte MessagePack ints, as real vocabularies give
HELLO = b"hello"

encode = msgspec.msgpack.Encoder().encode
decode = msgspec.msgpack.Decoder().decode  # untyped: plain dicts and lists


def configure(sock: zmq.asyncio.Socket, kind: int) -> None:
    """The options zdyn's make_socket sets that matter here (HWM, linger, ROUTER_MANDATORY)."""
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, HWM)
    sock.setsockopt(zmq.RCVHWM, HWM)
    if kind == zmq.ROUTER:
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)


# ------------------------------------------------------------------------------------------------- specs
@dataclass(slots=True)
class RttSpec:
    count: int = 5000
    warmup: int = 500
    prompt_tokens: int = 16


@dataclass(slots=True)
class StreamSpec:
    """``requests`` requests of ``deltas`` deltas each, at most ``concurrency`` in flight (closed loop)."""

    concurrency: int
    requests: int
    deltas: int
    prompt_tokens: int = 16
    warmup_requests: int = 0


@dataclass(slots=True)
class ClientSpec:
    rtt: RttSpec | None = None
    streams: list[StreamSpec] = field(default_factory=list)


@dataclass(slots=True)
class ServerStats:
    cpu_s: float = 0.0
    messages: int = 0


# ----------------------------------------------------------------------------------------------- servers
class _Counter:
    def __init__(self) -> None:
        self.messages = 0

    def stats(self) -> dict[str, float | int]:
        return {"cpu_s": time.process_time(), "messages": self.messages}


def _bare_delta(rid: str, i: int, n: int, prompt_len: int) -> dict[str, Any]:
    delta: dict[str, Any] = {"request_id": rid, "token_ids": [FIRST_TOKEN + i]}
    if i == n - 1:
        delta["finish"] = {"reason": "length", "prompt_tokens": prompt_len, "completion_tokens": n}
    return delta


async def _bare_per_token(sock: zmq.asyncio.Socket, req: dict[str, Any], counter: _Counter) -> None:
    rid, n, prompt_len = req["request_id"], req["max_tokens"], len(req["token_ids"])
    for i in range(n):
        if i:
            await asyncio.sleep(0)  # one delta per loop turn, like an engine step
        await sock.send(encode(_bare_delta(rid, i, n, prompt_len)))
        counter.messages += 1


class _StepEngine:
    """bare-batched: one message per loop turn carrying the next delta of every active stream."""

    def __init__(self, sock: zmq.asyncio.Socket, counter: _Counter) -> None:
        self.sock = sock
        self.counter = counter
        self.active: dict[str, list[int]] = {}  # request id -> [next index, deltas, prompt length]
        self.wake = asyncio.Event()

    def add(self, req: dict[str, Any]) -> None:
        self.active[req["request_id"]] = [0, req["max_tokens"], len(req["token_ids"])]
        self.wake.set()

    async def run(self) -> None:
        while True:
            if not self.active:
                self.wake.clear()
                await self.wake.wait()
                continue
            deltas = []
            for rid, state in list(self.active.items()):
                i, n, prompt_len = state
                deltas.append(_bare_delta(rid, i, n, prompt_len))
                state[0] = i + 1
                if i + 1 == n:
                    del self.active[rid]
            await self.sock.send(encode({"deltas": deltas}))
            self.counter.messages += 1
            await asyncio.sleep(0)


async def serve_bare(endpoint: str, batched: bool) -> None:
    ctx = zmq.asyncio.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    configure(sock, zmq.DEALER)
    sock.connect(endpoint)
    await sock.send(HELLO)
    counter = _Counter()
    engine = _StepEngine(sock, counter) if batched else None
    tasks: set[asyncio.Task[None]] = set()
    if engine is not None:
        tasks.add(asyncio.create_task(engine.run()))
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    reader = asyncio.create_task(_bare_serve_loop(sock, counter, engine, tasks))
    await stop.wait()
    reader.cancel()
    sock.close(linger=0)


async def _bare_serve_loop(
    sock: zmq.asyncio.Socket, counter: _Counter, engine: _StepEngine | None, tasks: set[asyncio.Task[None]]
) -> None:
    while True:
        req = decode(await sock.recv())
        if "ctl" in req:
            stats = counter.stats()
            await sock.send(encode({"request_id": req["request_id"], "stats": stats, "finish": {}}))
            counter.messages += 1
        elif engine is not None:
            engine.add(req)
        else:
            task = asyncio.create_task(_bare_per_token(sock, req, counter))
            tasks.add(task)
            task.add_done_callback(tasks.discard)


class CountingSpoke(Spoke):
    """A Spoke that counts the Outputs messages it sends (one per loop turn that produced deltas)."""

    messages = 0

    def _flush(self, link: Any) -> None:  # link: zdyn.rpc._Link (private)
        if link.pending and link.sock is not None:
            self.messages += 1
        super()._flush(link)


async def serve_zdyn(endpoint: str, peer_id: str) -> None:
    spoke: CountingSpoke | None = None

    async def handler(request: Request) -> AsyncIterator[Delta]:
        rid = request.request_id
        if rid.startswith("ctl-"):
            stats = {"cpu_s": time.process_time(), "messages": spoke.messages if spoke else 0}
            yield Delta(request_id=rid, text=json.dumps(stats), finish=Finish(reason="stop"))
            return
        assert isinstance(request, Generate)
        n, prompt_len = request.sampling.max_tokens, len(request.token_ids)
        for i in range(n):
            if i:
                await asyncio.sleep(0)  # one delta per loop turn, like an engine step
            finish = Finish(reason="length", prompt_tokens=prompt_len, completion_tokens=n) if i == n - 1 else None
            yield Delta(request_id=rid, token_ids=[FIRST_TOKEN + i], finish=finish)

    spoke = CountingSpoke([endpoint], Ready(peer_id=peer_id, role=Role.WORKER, model="bench"), handler)
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, spoke.close)
    await spoke.run()
