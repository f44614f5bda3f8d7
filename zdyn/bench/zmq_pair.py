"""A bare ZeroMQ streaming pair, for measuring zdyn's RPC (``Hub``/``Spoke``) against bare pyzmq on the same socket
types without HTTP: the clients, and ``run_pair``, which starts the servers and one client as separate processes
(uvloop, ``zmq.asyncio``, one I/O thread each) and returns the client's figures.

    python -m zdyn.bench.zmq_pair server IMPL ENDPOINT PEER_ID          # what run_pair starts
    python -m zdyn.bench.zmq_pair client IMPL ENDPOINT NUM_SERVERS SPEC_JSON
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import zmq
import zmq.asyncio

from zdyn.bench.host import machine_busy_s
from zdyn.bench.procs import free_port
from zdyn.bench.zmq_servers import (
    FIRST_TOKEN,
    HELLO,
    ClientSpec,
    RttSpec,
    ServerStats,
    StreamSpec,
    configure,
    decode,
    encode,
    serve_bare,
    serve_zdyn,
)
from zdyn.protocol import Generate, Role, SamplingParams, TokenIds
from zdyn.rpc import Hub

CPUS_ENV = "ZDYN_BENCH_CPUS"  # a child pins itself to these CPUs ("0", "0,1"); empty or unset: no pinning


def pct(values: Sequence[float], p: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), p)) if values else float("nan")


def cpu_s(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


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
            await self.sock.send_multipart([server, encode({"ctl": "stats", "request_id": f"ctl-{i}"})])
            _, payload = await self.sock.recv_multipart()
            stats = decode(payload)["stats"]
            total.cpu_s += stats["cpu_s"]
            total.messages += stats["messages"]
        return total

    async def rtt(self, spec: RttSpec) -> list[float]:
        server = self.servers[0]
        prompt = list(range(FIRST_TOKEN, FIRST_TOKEN + spec.prompt_tokens))
        samples = []
        for i in range(spec.warmup + spec.count):
            request = encode({"request_id": f"rtt-{i}", "token_ids": prompt, "max_tokens": 1})
            t0 = time.perf_counter()
            await self.sock.send_multipart([server, request])
            _, payload = await self.sock.recv_multipart()
            reply = decode(payload)
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
            request = encode({"request_id": rid, "token_ids": prompt, "max_tokens": spec.deltas})
            self.sock.send_multipart([server, request])

        t0 = time.perf_counter()
        for _ in range(min(spec.concurrency, total)):
            send_next()
        while finished < total:
            _, payload = await self.sock.recv_multipart()
            msg = decode(payload)
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
        self.hub = Hub(endpoint, role=Role.WORKER)

    async def start(self, n: int) -> None:
        await self.hub.start()
        await self.hub.wait_for_peers(n, timeout_s=30)

    async def server_stats(self) -> ServerStats:
        total = ServerStats()
        for i, peer in enumerate(self.hub.live_peers()):
            request = Generate(request_id=f"ctl-{time.monotonic_ns()}-{i}", token_ids=TokenIds())
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
            request = Generate(request_id=f"rtt-{i}", token_ids=TokenIds(prompt), sampling=sampling)
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
                request = Generate(request_id=f"{tag}-{i}", token_ids=TokenIds(prompt), sampling=sampling)
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
    return f"tcp://127.0.0.1:{free_port()}"


def _module_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "zdyn.bench.zmq_pair", *args]


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
    env = dict(os.environ)
    busy0, kids0, self0 = machine_busy_s(), cpu_s(resource.RUSAGE_CHILDREN), cpu_s(resource.RUSAGE_SELF)
    wall0 = time.monotonic()
    servers = [
        subprocess.Popen(_module_argv("server", impl, endpoint, f"srv{i}"), env={**env, CPUS_ENV: server_cpus})
        for i in range(num_servers)
    ]
    try:
        spec_json = json.dumps(asdict(spec))
        client = subprocess.run(
            _module_argv("client", impl, endpoint, str(num_servers), spec_json),
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
    ours = cpu_s(resource.RUSAGE_CHILDREN) - kids0 + cpu_s(resource.RUSAGE_SELF) - self0
    result["foreign_cpu_s"] = max(0.0, machine_busy_s() - busy0 - ours)
    result["wall_s"] = time.monotonic() - wall0
    if endpoint.startswith("ipc://"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(endpoint[len("ipc://") :])
    return result


def run_loop(main: Any) -> Any:
    """uvloop, as zdyn's roles run."""
    import uvloop

    return uvloop.run(main)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if os.environ.get(CPUS_ENV):
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
    print("usage: python -m zdyn.bench.zmq_pair server|client ...", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
