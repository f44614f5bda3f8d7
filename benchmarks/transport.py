"""The transport alone: zdyn's streaming RPC (``Hub``/``Spoke``) versus bare pyzmq on the same socket types.

Every case runs two processes (one more server for multi-server cases), all on uvloop with ``zmq.asyncio``
sockets and the default context (one I/O thread):

* the **client** binds a ROUTER, as zdyn's ``Hub`` does on the processor's side;
* the **server** connects a DEALER, as zdyn's ``Spoke`` does on the worker's side, announces itself and
  answers each request with a stream of deltas.

Implementations of the server/client pair:

* ``bare``: pyzmq with msgspec-MessagePack dicts shaped like zdyn's ``Delta`` (``request_id``, ``token_ids``,
  ``finish``), **one message per delta**. The client is one reader loop, no task or queue per request: the
  least Python a streaming client can be.
* ``bare-batched``: the same, but the server runs one "engine step" per event-loop turn and sends one
  message with a delta for every active stream (what vLLM and zdyn's workers do per engine step).
* ``zdyn``: ``Hub.stream`` -> a ``Spoke`` whose handler yields the deltas. The handler awaits one loop turn
  between deltas (like an engine step), and the spoke sends the deltas produced in one turn as one
  ``Outputs`` message, so zdyn's message count is reported next to its delta count.

Measured: (a) round trip of one request -> one reply (one delta with ``finish``), p50/p99; (b) N concurrent
streams of M deltas each: deltas (tokens)/s, messages/s, CPU per delta of client and server. Ratios are
zdyn / bare. The whole run holds ``/tmp/zdyn-bench.lock`` (other benchmarks wait; this one waits for them).

By default the client is pinned to CPU 0 and the server to CPU 1 (their ZeroMQ I/O threads inherit it).
Unpinned, on this 2-core box, streaming runs flip between two modes: in the slow one every send of the
client stalls for ~1 ms (its thread is descheduled when it wakes its own I/O thread, which is busy with
the incoming stream), so the server sees requests one at a time and serves the N streams one after another.
``--no-pin`` measures that placement too.

    python -m benchmarks.transport                      # from the repo root; about 1 minute
    python -m benchmarks.transport --transports tcp --reps 1 --streams 1,64 --rtt-count 1000   # quick look

``run_pair`` and ``BENCH_LOCK`` are reused by ``benchmarks/ceiling.py`` (its "bare pyzmq" row).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import json
import os
import platform
import resource
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import zmq
import zmq.asyncio

from zdyn.protocol import Delta, Finish, Generate, Ready, SamplingParams
from zdyn.rpc import Hub, Request, Spoke

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
BENCH_LOCK = "/tmp/zdyn-bench.lock"
IMPLS = ("bare", "bare-batched", "zdyn")
RTT_IMPLS = ("bare", "zdyn")  # one request -> one reply: batching makes no difference
HWM = 100_000  # zdyn's DEFAULT_HWM, used for the bare sockets too
FIRST_TOKEN = 1000  # token ids FIRST_TOKEN + i: 2-3 byte MessagePack ints, as real vocabularies give
HELLO = b"hello"
CPUS_ENV = "ZDYN_BENCH_CPUS"  # a child pins itself to these CPUs ("0", "0,1"); empty or unset: no pinning

_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder()  # untyped: plain dicts and lists


# ------------------------------------------------------------------------------------------------ helpers
@contextlib.contextmanager
def bench_lock(path: str = BENCH_LOCK) -> Iterator[float]:
    """Hold the shared benchmark lock (fcntl, like ``flock PATH cmd``); yields the seconds spent waiting."""
    with open(path, "a") as f:
        t0 = time.monotonic()
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for {path} (another benchmark is running) ...", file=sys.stderr, flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield time.monotonic() - t0
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def run_loop(main: Any) -> Any:
    """uvloop, as zdyn's roles run (``zdyn.cli.run``)."""
    import uvloop

    return uvloop.run(main)


def pct(values: Sequence[float], p: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), p)) if values else float("nan")


def med_range(values: Sequence[float]) -> tuple[float, float, float]:
    """(median, min, max) of the repetitions."""
    if not values:
        return float("nan"), float("nan"), float("nan")
    return statistics.median(values), min(values), max(values)


def system_busy_s() -> float:
    """CPU seconds all cores have spent busy since boot (/proc/stat), to spot load from outside the run."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def self_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def code_version() -> dict[str, Any]:
    """The repository's commit and whether zdyn/ or benchmarks/ differ from it (read-only git calls)."""

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.rstrip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    return {
        "commit": git("rev-parse", "HEAD"),
        "modified": git("status", "--porcelain", "zdyn", "benchmarks").split("\n"),
    }


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
        await sock.send(_enc.encode(_bare_delta(rid, i, n, prompt_len)))
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
            await self.sock.send(_enc.encode({"deltas": deltas}))
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
        req = _dec.decode(await sock.recv())
        if "ctl" in req:
            stats = counter.stats()
            await sock.send(_enc.encode({"request_id": req["request_id"], "stats": stats, "finish": {}}))
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

    spoke = CountingSpoke([endpoint], Ready(peer_id=peer_id, role="worker", model="bench"), handler)
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, spoke.close)
    await spoke.run()


# ----------------------------------------------------------------------------------------------- clients
@dataclass(slots=True)
class StreamResult:
    concurrency: int
    requests: int
    deltas: int
    elapsed_s: float
    tokens: int
    server_messages: int
    client_cpu_s: float
    server_cpu_s: float
    ttft_ms: list[float] = field(repr=False)
    latency_ms: list[float] = field(repr=False)

    def summary(self) -> dict[str, Any]:
        e = self.elapsed_s
        return {
            "concurrency": self.concurrency,
            "requests": self.requests,
            "deltas": self.deltas,
            "elapsed_s": e,
            "tokens": self.tokens,
            "server_messages": self.server_messages,
            "req_per_s": self.requests / e,
            "deltas_per_s": self.tokens / e,
            "messages_per_s": self.server_messages / e,
            "deltas_per_message": self.tokens / max(1, self.server_messages),
            "ttft_p50_ms": pct(self.ttft_ms, 50),
            "ttft_p99_ms": pct(self.ttft_ms, 99),
            "latency_p50_ms": pct(self.latency_ms, 50),
            "latency_p99_ms": pct(self.latency_ms, 99),
            "client_cpu_s": self.client_cpu_s,
            "server_cpu_s": self.server_cpu_s,
            "client_cpu_us_per_delta": 1e6 * self.client_cpu_s / max(1, self.tokens),
            "server_cpu_us_per_delta": 1e6 * self.server_cpu_s / max(1, self.tokens),
        }


class BareClient:
    """ROUTER side of bare pyzmq: one reader loop, requests dispatched round-robin over the servers."""

    def __init__(self, endpoint: str) -> None:
        self.sock = zmq.asyncio.Context.instance().socket(zmq.ROUTER)
        configure(self.sock, zmq.ROUTER)
        self.sock.bind(endpoint)
        self.servers: list[bytes] = []

    async def wait_for_servers(self, n: int) -> None:
        while len(self.servers) < n:
            identity, payload = await self.sock.recv_multipart()
            if payload == HELLO:
                self.servers.append(identity)

    async def server_stats(self) -> ServerStats:
        total = ServerStats()
        for i, server in enumerate(self.servers):
            await self.sock.send_multipart([server, _enc.encode({"ctl": "stats", "request_id": f"ctl-{i}"})])
            _, payload = await self.sock.recv_multipart()
            stats = _dec.decode(payload)["stats"]
            total.cpu_s += stats["cpu_s"]
            total.messages += stats["messages"]
        return total

    async def rtt(self, spec: RttSpec) -> list[float]:
        server = self.servers[0]
        prompt = list(range(FIRST_TOKEN, FIRST_TOKEN + spec.prompt_tokens))
        samples = []
        for i in range(spec.warmup + spec.count):
            request = _enc.encode({"request_id": f"rtt-{i}", "token_ids": prompt, "max_tokens": 1})
            t0 = time.perf_counter()
            await self.sock.send_multipart([server, request])
            _, payload = await self.sock.recv_multipart()
            reply = _dec.decode(payload)
            t1 = time.perf_counter()
            assert "finish" in reply
            if i >= spec.warmup:
                samples.append(t1 - t0)
        return samples

    async def closed_loop(self, spec: StreamSpec, total: int, tag: str) -> tuple[float, int, list[float], list[float]]:
        prompt = list(range(FIRST_TOKEN, FIRST_TOKEN + spec.prompt_tokens))
        starts: dict[str, float] = {}
        seen_first: set[str] = set()
        ttft: list[float] = []
        latency: list[float] = []
        sent = finished = tokens = 0

        def send_next() -> None:
            nonlocal sent
            rid = f"{tag}-{sent}"
            server = self.servers[sent % len(self.servers)]
            sent += 1
            starts[rid] = time.perf_counter()
            request = _enc.encode({"request_id": rid, "token_ids": prompt, "max_tokens": spec.deltas})
            self.sock.send_multipart([server, request])

        t0 = time.perf_counter()
        for _ in range(min(spec.concurrency, total)):
            send_next()
        while finished < total:
            _, payload = await self.sock.recv_multipart()
            msg = _dec.decode(payload)
            now = time.perf_counter()
            for delta in msg.get("deltas", (msg,)):
                rid = delta["request_id"]
                tokens += len(delta["token_ids"])
                if rid not in seen_first:
                    seen_first.add(rid)
                    ttft.append(now - starts[rid])
                if "finish" in delta:
                    finished += 1
                    latency.append(now - starts.pop(rid))
                    seen_first.discard(rid)
                    if sent < total:
                        send_next()
        return time.perf_counter() - t0, tokens, ttft, latency


class ZdynClient:
    """zdyn's Hub (ROUTER): ``concurrency`` tasks each iterate ``Hub.stream`` for one request at a time."""

    def __init__(self, endpoint: str) -> None:
        self.hub = Hub(endpoint, role="worker")

    async def start(self, n: int) -> None:
        await self.hub.start()
        await self.hub.wait_for_peers(n, timeout_s=30)

    async def server_stats(self) -> ServerStats:
        total = ServerStats()
        for i, peer in enumerate(self.hub.live_peers()):
            request = Generate(request_id=f"ctl-{time.monotonic_ns()}-{i}", token_ids=[])
            async for delta in self.hub.stream(peer, request):
                stats = json.loads(delta.text or "{}")
                total.cpu_s += stats["cpu_s"]
                total.messages += stats["messages"]
        return total

    async def rtt(self, spec: RttSpec) -> list[float]:
        peer = self.hub.live_peers()[0]
        prompt = list(range(FIRST_TOKEN, FIRST_TOKEN + spec.prompt_tokens))
        sampling = SamplingParams(max_tokens=1)
        samples = []
        for i in range(spec.warmup + spec.count):
            request = Generate(request_id=f"rtt-{i}", token_ids=prompt, sampling=sampling)
            t0 = time.perf_counter()
            async for delta in self.hub.stream(peer, request):
                assert delta.finish is not None
            t1 = time.perf_counter()
            if i >= spec.warmup:
                samples.append(t1 - t0)
        return samples

    async def closed_loop(self, spec: StreamSpec, total: int, tag: str) -> tuple[float, int, list[float], list[float]]:
        peers = self.hub.live_peers()
        prompt = list(range(FIRST_TOKEN, FIRST_TOKEN + spec.prompt_tokens))
        sampling = SamplingParams(max_tokens=spec.deltas)
        ttft: list[float] = []
        latency: list[float] = []
        counter = iter(range(total))
        tokens = 0

        async def user() -> None:
            nonlocal tokens
            for i in counter:
                request = Generate(request_id=f"{tag}-{i}", token_ids=prompt, sampling=sampling)
                start = time.perf_counter()
                first = True
                async for delta in self.hub.stream(peers[i % len(peers)], request):
                    if first:
                        ttft.append(time.perf_counter() - start)
                        first = False
                    tokens += len(delta.token_ids)
                latency.append(time.perf_counter() - start)

        t0 = time.perf_counter()
        await asyncio.gather(*(user() for _ in range(min(spec.concurrency, total))))
        return time.perf_counter() - t0, tokens, ttft, latency


async def run_client(impl: str, endpoint: str, num_servers: int, spec: ClientSpec) -> dict[str, Any]:
    client: BareClient | ZdynClient
    if impl == "zdyn":
        client = ZdynClient(endpoint)
        await client.start(num_servers)
    else:
        client = BareClient(endpoint)
        await client.wait_for_servers(num_servers)
    out: dict[str, Any] = {"impl": impl, "endpoint": endpoint, "servers": num_servers}
    if spec.rtt is not None:
        before, cpu0 = await client.server_stats(), time.process_time()
        samples = await client.rtt(spec.rtt)
        cpu1, after = time.process_time(), await client.server_stats()
        us = [s * 1e6 for s in samples]
        out["rtt"] = {
            "count": len(us),
            "p50_us": pct(us, 50),
            "p90_us": pct(us, 90),
            "p99_us": pct(us, 99),
            "mean_us": statistics.fmean(us),
            "round_trips_per_s": len(us) / (sum(samples) or 1.0),
            "client_cpu_us_per_rt": 1e6 * (cpu1 - cpu0) / (spec.rtt.count + spec.rtt.warmup),
            "server_cpu_us_per_rt": 1e6 * (after.cpu_s - before.cpu_s) / (spec.rtt.count + spec.rtt.warmup),
        }
    out["streams"] = []
    for n, stream in enumerate(spec.streams):
        if stream.warmup_requests:
            await client.closed_loop(stream, stream.warmup_requests, f"w{n}")
        before, cpu0 = await client.server_stats(), time.process_time()
        elapsed, tokens, ttft, latency = await client.closed_loop(stream, stream.requests, f"s{n}")
        cpu1, after = time.process_time(), await client.server_stats()
        result = StreamResult(
            concurrency=stream.concurrency,
            requests=stream.requests,
            deltas=stream.deltas,
            elapsed_s=elapsed,
            tokens=tokens,
            server_messages=after.messages - before.messages - num_servers,  # minus the stats replies
            client_cpu_s=cpu1 - cpu0,
            server_cpu_s=after.cpu_s - before.cpu_s,
            ttft_ms=[t * 1e3 for t in ttft],
            latency_ms=[t * 1e3 for t in latency],
        )
        out["streams"].append(result.summary())
    return out


# ------------------------------------------------------------------------------------------ orchestration
def endpoint_for(transport: str, tag: str) -> str:
    if transport == "ipc":
        return f"ipc://{tempfile.gettempdir()}/zdyn-transport-{os.getpid()}-{tag}.sock"
    from zdyn.launch import free_port

    return f"tcp://127.0.0.1:{free_port()}"


def _module_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "benchmarks.transport", *args]


def run_pair(
    impl: str,
    endpoint: str,
    spec: ClientSpec,
    *,
    num_servers: int = 1,
    client_cpus: str = "",
    server_cpus: str = "",
    timeout_s: float = 300.0,
) -> dict[str, Any]:
    """Start ``num_servers`` servers and one client (separate processes), run ``spec``, return the client's
    figures plus ``foreign_cpu_s``: CPU that processes outside this pair used meanwhile (noise).

    ``client_cpus`` / ``server_cpus`` ("0", "1", "0,1"; empty = no pinning) set the processes' CPU affinity
    (their ZeroMQ I/O threads inherit it)."""
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    busy0, kids0, self0, wall0 = system_busy_s(), children_cpu_s(), self_cpu_s(), time.monotonic()
    servers = [
        subprocess.Popen(
            _module_argv("server", impl, endpoint, f"srv{i}"), cwd=REPO, env={**env, CPUS_ENV: server_cpus}
        )
        for i in range(num_servers)
    ]
    try:
        spec_json = json.dumps(asdict(spec))
        client = subprocess.run(
            _module_argv("client", impl, endpoint, str(num_servers), spec_json),
            cwd=REPO,
            env={**env, CPUS_ENV: client_cpus},
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
    finally:
        for server in servers:
            server.send_signal(signal.SIGTERM)
        for server in servers:
            try:
                server.wait(5)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
    if client.returncode != 0:
        raise RuntimeError(f"{impl} client failed ({client.returncode}):\n{client.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(client.stdout.strip().splitlines()[-1])
    ours = children_cpu_s() - kids0 + self_cpu_s() - self0
    result["foreign_cpu_s"] = max(0.0, system_busy_s() - busy0 - ours)
    result["wall_s"] = time.monotonic() - wall0
    if endpoint.startswith("ipc://"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(endpoint[len("ipc://") :])
    return result


# ------------------------------------------------------------------------------------------------ report
RTT_COLUMNS = ("p50_us", "p99_us", "round_trips_per_s", "client_cpu_us_per_rt", "server_cpu_us_per_rt")
STREAM_COLUMNS = (
    "deltas_per_s",
    "messages_per_s",
    "deltas_per_message",
    "ttft_p50_ms",
    "client_cpu_us_per_delta",
    "server_cpu_us_per_delta",
)


def fmt(value: float) -> str:
    if value != value:  # NaN
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def fmt_mr(values: Sequence[float]) -> str:
    m, lo, hi = med_range(values)
    return fmt(m) if len(values) == 1 else f"{fmt(m)} ({fmt(lo)}-{fmt(hi)})"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows]
    return "\n".join([line, sep, *body])


def aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians and ranges per (transport, impl) for RTT and per (transport, impl, N) for streams."""
    agg: dict[str, Any] = {"rtt": {}, "streams": {}}
    for run in runs:
        key = f"{run['transport']}/{run['impl']}"
        if "rtt" in run:
            slot = agg["rtt"].setdefault(key, {c: [] for c in RTT_COLUMNS})
            for c in RTT_COLUMNS:
                slot[c].append(run["rtt"][c])
        for s in run["streams"]:
            slot = agg["streams"].setdefault(f"{key}/{s['concurrency']}", {c: [] for c in STREAM_COLUMNS})
            for c in STREAM_COLUMNS:
                slot[c].append(s[c])
    return agg


def median_of(agg: dict[str, Any], section: str, key: str, column: str) -> float:
    values = agg[section].get(key, {}).get(column, [])
    return med_range(values)[0]


def print_report(agg: dict[str, Any], transports: Sequence[str], streams: Sequence[int], deltas: int) -> None:
    print("\n(a) round trip, one request -> one reply (one delta with finish); median (range) over repetitions")
    rows = []
    for t in transports:
        for impl in RTT_IMPLS:
            values = agg["rtt"].get(f"{t}/{impl}")
            if values:
                rows.append([t, impl, *(fmt_mr(values[c]) for c in RTT_COLUMNS)])
        bare, zd = f"{t}/bare", f"{t}/zdyn"
        rows.append(
            [t, "zdyn/bare", *(fmt(median_of(agg, "rtt", zd, c) / median_of(agg, "rtt", bare, c)) for c in RTT_COLUMNS)]
        )
    headers = ["transport", "impl", "RTT p50 µs", "RTT p99 µs", "rt/s", "client CPU µs/rt", "server CPU µs/rt"]
    print(table(headers, rows))

    print(f"\n(b) streaming: N concurrent streams x {deltas} deltas; median (range) over repetitions")
    rows = []
    for t in transports:
        for n in streams:
            for impl in IMPLS:
                values = agg["streams"].get(f"{t}/{impl}/{n}")
                if values:
                    rows.append([t, str(n), impl, *(fmt_mr(values[c]) for c in STREAM_COLUMNS)])
    headers = ["transport", "N", "impl", "deltas/s", "messages/s", "deltas/msg", "TTFT p50 ms", "client CPU µs/delta",
               "server CPU µs/delta"]  # fmt: skip
    print(table(headers, rows))

    print("\nratios zdyn / bare (medians): deltas/s and messages/s against per-token bare and engine-step bare")
    rows = []
    for t in transports:
        for n in streams:
            zd, bare, batched = (f"{t}/{i}/{n}" for i in ("zdyn", "bare", "bare-batched"))

            def ratio(a: str, b: str, c: str) -> str:
                return fmt(median_of(agg, "streams", a, c) / median_of(agg, "streams", b, c))

            rows.append(
                [
                    t,
                    str(n),
                    ratio(zd, bare, "deltas_per_s"),
                    ratio(zd, bare, "messages_per_s"),
                    ratio(zd, batched, "deltas_per_s"),
                    ratio(zd, batched, "messages_per_s"),
                ]
            )
    headers = ["transport", "N", "deltas/s vs bare", "msgs/s vs bare", "deltas/s vs bare-batched",
               "msgs/s vs bare-batched"]  # fmt: skip
    print(table(headers, rows))


def plot(
    agg: dict[str, Any], transports: Sequence[str], streams: Sequence[int], deltas: int, out: Path, placement: str
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    ax = axes[0][0]
    labels, p50, p99 = [], [], []
    for t in transports:
        for impl in RTT_IMPLS:
            labels.append(f"{t}\n{impl}")
            p50.append(median_of(agg, "rtt", f"{t}/{impl}", "p50_us"))
            p99.append(median_of(agg, "rtt", f"{t}/{impl}", "p99_us"))
    x = np.arange(len(labels))
    ax.bar(x - 0.2, p50, 0.4, label="p50")
    ax.bar(x + 0.2, p99, 0.4, label="p99")
    ax.set_xticks(x, labels)
    ax.set_ylabel("round trip (µs)")
    ax.set_title("(a) one request -> one reply")
    ax.legend()
    panels = [
        (axes[0][1], "deltas_per_s", "deltas (tokens) / s"),
        (axes[1][0], "messages_per_s", "messages / s"),
        (axes[1][1], "server_cpu_us_per_delta", "server CPU µs / delta"),
    ]
    styles = {"bare": "o-", "bare-batched": "s--", "zdyn": "^-"}
    for ax, column, ylabel in panels:
        for t in transports:
            for impl in IMPLS:
                ys = [median_of(agg, "streams", f"{t}/{impl}/{n}", column) for n in streams]
                ax.plot(streams, ys, styles[impl], label=f"{impl} ({t})", alpha=0.9 if t == "tcp" else 0.5)
        ax.set_xscale("log", base=2)
        if column == "deltas_per_s":
            ax.set_yscale("log")
        ax.set_xlabel("concurrent streams N")
        ax.set_ylabel(ylabel)
        ax.set_title(f"(b) N streams x {deltas} deltas: {ylabel}")
        ax.grid(alpha=0.3)
    axes[0][1].legend(fontsize=8)
    fig.suptitle(f"zdyn Hub/Spoke vs bare pyzmq (ROUTER binds, DEALER connects; uvloop; {placement}; medians)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


# -------------------------------------------------------------------------------------------------- main
def parse_ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.transport", description=__doc__.split("\n\n")[0])
    p.add_argument("--transports", default="tcp,ipc", help="comma-separated: tcp, ipc (default %(default)s)")
    p.add_argument("--reps", type=int, default=3, help="repetitions of every case, alternating impls")
    p.add_argument("--rtt-count", type=int, default=5000, help="measured round trips (after 10 %% warm-up)")
    p.add_argument("--streams", type=parse_ints, default=[1, 8, 64, 256], help="N values (default 1,8,64,256)")
    p.add_argument("--deltas", type=int, default=500, help="deltas per stream M (default %(default)s)")
    p.add_argument("--out", type=Path, default=RESULTS / "transport.json")
    p.add_argument(
        "--pin",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="client on CPU 0, server on CPU 1 (default); --no-pin leaves placement to the scheduler",
    )
    p.add_argument("--no-lock", action="store_true", help="do not take the shared lock (smoke tests only)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["server"], ["client"]) and os.environ.get(CPUS_ENV):
        os.sched_setaffinity(0, {int(c) for c in os.environ[CPUS_ENV].split(",")})
    if argv[:1] == ["server"]:  # server IMPL ENDPOINT PEER_ID
        impl, endpoint, peer_id = argv[1:4]
        run_loop(serve_zdyn(endpoint, peer_id) if impl == "zdyn" else serve_bare(endpoint, impl == "bare-batched"))
        return 0
    if argv[:1] == ["client"]:  # client IMPL ENDPOINT NUM_SERVERS SPEC_JSON
        impl, endpoint, num_servers, spec_json = argv[1:5]
        raw = json.loads(spec_json)
        spec = ClientSpec(
            rtt=RttSpec(**raw["rtt"]) if raw.get("rtt") else None,
            streams=[StreamSpec(**s) for s in raw.get("streams", [])],
        )
        print(json.dumps(run_loop(run_client(impl, endpoint, int(num_servers), spec))), flush=True)
        return 0

    args = build_parser().parse_args(argv)
    command = shlex.join(["python", "-m", "benchmarks.transport", *argv])
    transports = [t.strip() for t in args.transports.split(",") if t.strip()]
    spec_streams = [StreamSpec(concurrency=n, requests=n, deltas=args.deltas, warmup_requests=n) for n in args.streams]
    rtt = RttSpec(count=args.rtt_count, warmup=max(1, args.rtt_count // 10))
    cpus = ("0", "1") if args.pin else ("", "")
    runs: list[dict[str, Any]] = []
    lock = contextlib.nullcontext(0.0) if args.no_lock else bench_lock()
    started = time.time()
    with lock as waited:
        t0 = time.monotonic()
        for rep in range(args.reps):
            for transport in transports:
                order = IMPLS if rep % 2 == 0 else tuple(reversed(IMPLS))  # alternate who goes first
                for impl in order:
                    spec = ClientSpec(rtt=rtt if impl in RTT_IMPLS else None, streams=spec_streams)
                    endpoint = endpoint_for(transport, f"{impl}-{rep}")
                    result = run_pair(impl, endpoint, spec, client_cpus=cpus[0], server_cpus=cpus[1])
                    result.update(transport=transport, rep=rep)
                    runs.append(result)
                    s = {x["concurrency"]: round(x["deltas_per_s"]) for x in result["streams"]}
                    rt = f" rtt p50 {result['rtt']['p50_us']:.0f} µs" if "rtt" in result else ""
                    print(
                        f"rep {rep} {transport:3} {impl:12}{rt} deltas/s by N {s} "
                        f"(foreign CPU {result['foreign_cpu_s']:.2f} s)",
                        file=sys.stderr,
                        flush=True,
                    )
        wall = time.monotonic() - t0
    agg = aggregate(runs)
    print_report(agg, transports, args.streams, args.deltas)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    png = args.out.with_suffix(".png")
    placement = "client on CPU 0, server on CPU 1" if args.pin else "unpinned"
    plot(agg, transports, args.streams, args.deltas, png, placement)
    foreign = [r["foreign_cpu_s"] for r in runs]
    doc = {
        "benchmark": "transport",
        "command": command,
        "cwd": str(REPO),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "host": {"node": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "code": code_version(),
        "versions": {"pyzmq": zmq.__version__, "libzmq": zmq.zmq_version(), "msgspec": msgspec.__version__},
        "settings": {
            "transports": transports,
            "reps": args.reps,
            "rtt": asdict(rtt),
            "streams": [asdict(s) for s in spec_streams],
            "loop": "uvloop",
            "pinning": {"client": cpus[0] or None, "server": cpus[1] or None},
            "lock": None if args.no_lock else BENCH_LOCK,
            "lock_wait_s": waited,
        },
        "wall_s": wall,
        "foreign_cpu_s": {"median": statistics.median(foreign), "max": max(foreign)},
        "aggregate": agg,
        "runs": runs,
    }
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"\nplacement: {placement}")
    print(f"foreign CPU during a case (other processes on the box): median {statistics.median(foreign):.2f} s, "
          f"max {max(foreign):.2f} s")  # fmt: skip
    print(f"results: {args.out}\nplot:    {png}\nreproduce (from {REPO}): {command}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
