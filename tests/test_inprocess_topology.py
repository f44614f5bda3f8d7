"""Every role in one event loop: the frontend's ASGI app with its processor, a separate KV router, the prefill
queue, two decode mocker workers and a prefill mocker worker, joined over loopback as ``examples/disagg_route``
joins them, and built through the role layer as ``zdyn ROLE`` builds them. Assertions read counters."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from frontend_fake import call_asgi, count
from helpers import eventually, sample

from zdyn.disagg.decode import DisaggEngine
from zdyn.disagg.queue_service import PrefillQueueService
from zdyn.frontend.app import Frontend
from zdyn.frontend.http import HttpSettings
from zdyn.processor import Processor
from zdyn.protocol import Role
from zdyn.roles import worker as worker_role
from zdyn.roles.common import CommonConfig
from zdyn.roles.frontend import FrontendConfig, build_backend
from zdyn.roles.routing import RoutingConfig
from zdyn.roles.worker_metrics import WorkerCollector
from zdyn.router.client import RemoteSelector
from zdyn.router.service import RouterService
from zdyn.rpc import Hub
from zdyn.transport import Liveness
from zdyn.worker import Worker

# One loop runs every role here, so a busy moment of the test machine must not look like a dead peer.
LIVENESS = Liveness(interval_s=0.2, misses=10)
BLOCK = 16
MAX_LOCAL_PREFILL = 64
LONG = [(i * 37) % 900 + 20 for i in range(300)]  # token ids: 300 prompt tokens, beyond MAX_LOCAL_PREFILL


class Topology:
    """The roles, started by ``start`` and stopped by ``stop``; ``client`` speaks HTTP to the frontend app.

    Each port is bound as soon as it is picked (hubs and services first, then one worker at a time, whose engine
    picks free ports for its KV events), so that no two roles are ever handed the same free port.
    """

    def __init__(self, model: Path, endpoint: Callable[[], str], speedup: float) -> None:
        self.model, self.endpoint, self.speedup = model, endpoint, speedup
        self.hubs: list[Hub] = []
        self.services: list[Worker | RouterService | PrefillQueueService] = []
        self.tasks: list[asyncio.Task[Any]] = []
        self.workers: list[Worker] = []
        self.client: httpx.AsyncClient | None = None
        self.processor: Processor | None = None

    async def start(self) -> None:
        self.router_hub = await self._hub(Role.WORKER)
        self.router = RouterService(self.endpoint(), self.router_hub, RoutingConfig(mode="kv").kv_router())
        self.queue_hub = await self._hub(Role.PREFILL)
        jobs, status = self.endpoint(), self.endpoint()
        self.queue = PrefillQueueService(jobs, status, self.queue_hub, max_jobs_per_worker=2)
        self._run(self.router, self.queue)
        await asyncio.sleep(0)  # both bind their sockets first thing in run()

        routing = RoutingConfig(mode="kv", router_endpoint=self.router.endpoint, router_timeout_s=2.0)
        config = FrontendConfig(model=str(self.model), workers_endpoint=self.endpoint(), routing=routing,
                                common=CommonConfig(liveness=LIVENESS))  # fmt: skip
        backend, self.hub, _ = build_backend(config)
        assert isinstance(backend, Processor) and isinstance(backend.selector, RemoteSelector)
        await self.hub.start()
        self.hubs.append(self.hub)
        self.processor = backend
        self.frontend = Frontend(backend, HttpSettings())
        self.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=self.frontend.app()), base_url="http://t")

        mocker = ["--engine", "mocker", "--model", str(self.model), "--speedup", str(self.speedup),
                  "--block-size", str(BLOCK), "--heartbeat-interval", str(LIVENESS.interval_s),
                  "--heartbeat-misses", str(LIVENESS.misses)]  # fmt: skip
        await self._workers([*mocker, "--connect", f"{self.hub.endpoint},{self.router_hub.endpoint}",
                             "--worker-id", "decode", "--num-workers", "2", "--prefill-queue", jobs,
                             "--prefill-queue-status", status, "--max-local-prefill-length", str(MAX_LOCAL_PREFILL)],
                            Role.WORKER)  # fmt: skip
        await self._workers([*mocker, "--connect", self.queue_hub.endpoint, "--worker-id", "prefill", "--prefill"],
                            Role.PREFILL)  # fmt: skip
        self.decode = [w.engine for w in self.workers if isinstance(w.engine, DisaggEngine)]
        await self.hub.wait_for_peers(2, timeout_s=20)
        await self.router_hub.wait_for_peers(2, timeout_s=20)
        await self.queue_hub.wait_for_peers(1, timeout_s=20)
        await eventually(lambda: all(e.client.queue_live for e in self.decode), timeout_s=20)

    async def _hub(self, role: Role) -> Hub:
        hub = Hub(self.endpoint(), role=role, liveness=LIVENESS)
        await hub.start()
        self.hubs.append(hub)
        return hub

    def _run(self, *services: Worker | RouterService | PrefillQueueService) -> None:
        self.services += services
        self.tasks += [asyncio.get_running_loop().create_task(s.run()) for s in services]

    async def _workers(self, argv: list[str], role: Role) -> None:
        """What ``zdyn worker ARGV`` serves, built by the role layer, started one by one."""
        config = worker_role.WorkerConfig.from_args(worker_role.build_parser("mocker").parse_args(argv))
        for i, worker_id in enumerate(config.worker_ids()):
            engine = worker_role.with_disagg(worker_role.make_engine(config, i), config)
            worker = Worker(engine, config.hubs, worker_id, advertise_host="127.0.0.1", role=role, liveness=LIVENESS)
            self.workers.append(worker)
            self._run(worker)
            await eventually(lambda w=worker: w.spoke is not None, timeout_s=20)  # its engine has bound its ports

    async def stop(self) -> None:
        """Stop whatever was started; every worker must exit cleanly."""
        if self.client is not None:
            await self.client.aclose()
        for service in self.services:
            service.close()
        results = await asyncio.wait_for(asyncio.gather(*self.tasks, return_exceptions=True), 20)
        if self.processor is not None:
            await self.processor.selector.aclose()
        for hub in self.hubs:
            await hub.close()
        exits = {s.worker_id: r for s, r in zip(self.services, results, strict=True) if isinstance(s, Worker)}
        assert set(exits.values()) <= {0}, exits

    def decisions(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for engine in self.decode:
            for decision, n in engine.decisions.items():
                total[decision] = total.get(decision, 0) + n
        return total

    def idle(self) -> bool:
        """No request left anywhere: engines, hubs, router, queue, frontend."""
        engines = all(w.engine.load().num_running == 0 and w.engine.load().num_waiting == 0 for w in self.workers)
        hubs = all(p.num_inflight == 0 for h in (self.hub, self.queue_hub) for p in h.live_peers())
        queue = self.queue.queue.queued == 0 and self.queue.queue.running == 0
        return engines and hubs and queue and len(self.router.router.active) == 0 and self.in_flight() == 0

    def in_flight(self) -> float:
        return count(self.frontend, "zdyn_requests_in_flight")


@pytest.fixture
async def topology(tiny_model: Path, tcp_endpoint: Callable[[], str]) -> AsyncIterator[Topology]:
    t = Topology(tiny_model, tcp_endpoint, speedup=1)
    try:
        await t.start()
        yield t
    finally:
        await t.stop()


async def completion(t: Topology, prompt: list[int] | str, **fields: Any) -> dict[str, Any]:
    body = {"model": "tiny-llama", "prompt": prompt, "max_tokens": 8, "ignore_eos": True, **fields}
    response = await t.client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    return dict(response.json())


async def test_requests_cross_every_role_and_every_counter_agrees(topology: Topology) -> None:
    t = topology
    chat = await t.client.post(
        "/v1/chat/completions", json={"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}],
                                      "max_tokens": 5, "ignore_eos": True},
    )  # fmt: skip
    assert chat.status_code == 200 and chat.json()["usage"]["completion_tokens"] == 5
    assert t.decisions() == {"local": 1}  # a short prompt prefills where it decodes

    first = await completion(t, LONG)
    assert (first["usage"]["prompt_tokens"], first["usage"]["completion_tokens"]) == (300, 8)
    assert t.decisions() == {"local": 1, "remote": 1}  # 300 uncached tokens > MAX_LOCAL_PREFILL: a prefill worker
    assert (t.queue.stats["submitted"], t.queue.stats["done"], t.queue.stats["failed"]) == (1, 1, 0)

    # The decode worker that pulled the prompt's KV publishes it; the router hears it over the KV events ...
    await eventually(lambda: t.router.router.indexer.num_blocks() >= len(LONG) // BLOCK, timeout_s=10)
    overlap_before = t.router.overlap_blocks
    second = await completion(t, LONG)
    assert second["usage"]["prompt_tokens"] == 300
    # ... so the same prompt goes to that worker, which has it cached and prefills the rest itself.
    assert t.router.overlap_blocks - overlap_before >= len(LONG) // BLOCK - 1
    assert t.decisions() == {"local": 2, "remote": 1}
    assert t.queue.stats["submitted"] == 1

    await eventually(t.idle)
    assert (t.router.decisions, t.router.no_decision) == (3, 0)
    assert t.processor.selector.client.failures == 0  # every route came from the router, none from the fallback
    assert count(t.frontend, "zdyn_requests_total", endpoint="chat", status="success") == 1
    assert count(t.frontend, "zdyn_requests_total", endpoint="completions", status="success") == 2
    assert count(t.frontend, "zdyn_internal_errors_total") == 0
    assert t.hub.malformed.count == t.router.malformed.count == t.queue.malformed.count == 0


async def test_a_client_hanging_up_cancels_down_to_the_engines(topology: Topology) -> None:
    t = topology
    hang_up = asyncio.Event()
    body = {"model": "tiny-llama", "prompt": LONG, "max_tokens": 1500, "ignore_eos": True, "stream": True}

    async def hang_up_once_streaming() -> None:  # several tokens have reached the client
        await eventually(lambda: count(t.frontend, "zdyn_inter_token_latency_seconds_count") >= 3, timeout_s=10)
        hang_up.set()

    watcher = asyncio.ensure_future(hang_up_once_streaming())
    sent = await call_asgi(t.frontend, "/v1/completions", [msgspec.json.encode(body)], hang_up=hang_up)
    await watcher
    assert sent[0]["status"] == 200 and b"[DONE]" not in b"".join(m.get("body", b"") for m in sent)
    # Well before the 1500 tokens would have been generated (seconds at speedup 1): the engine stopped, the
    # router forgot the request, nothing is left in flight.
    await eventually(t.idle, timeout_s=3)
    assert count(t.frontend, "zdyn_requests_total", endpoint="completions", status="cancelled") == 1
    assert t.decisions() == {"remote": 1}
    # the worker's own metrics (zdyn worker --metrics-port): one Cancel heard mid-stream, one request cancelled
    metrics = WorkerCollector(t.workers)
    ids = [w.worker_id for w in t.workers]
    assert sum(sample(metrics, "zdyn_worker_cancels_total", worker=w, when="in_flight") for w in ids) == 1
    assert sum(sample(metrics, "zdyn_worker_requests_total", worker=w, outcome="cancelled") for w in ids) == 1
    assert sum(sample(metrics, "zdyn_worker_requests_in_flight", worker=w) for w in ids) == 0

    # The deployment still serves afterwards.
    assert (await completion(t, "hello"))["usage"]["completion_tokens"] == 8


async def test_a_decode_worker_that_leaves_is_forgotten_and_the_other_serves(topology: Topology) -> None:
    t = topology
    leaving = t.workers[0]
    leaving.close()
    await eventually(lambda: [p.id for p in t.hub.live_peers()] == ["decode-1"], timeout_s=10)
    await eventually(lambda: t.router.router.workers == ["decode-1"], timeout_s=10)
    for _ in range(3):
        await completion(t, "hello there")
    assert t.decode[0].decisions == {} and t.decode[1].decisions["local"] == 3
    assert t.processor.selector.client.failures == 0
    await eventually(t.idle)


async def test_the_choices_of_one_request_share_one_remote_prefill(topology: Topology) -> None:
    t = topology
    both = await completion(t, [x + 1 for x in LONG], n=2, seed=3)
    assert [c["index"] for c in both["choices"]] == [0, 1] and both["usage"]["completion_tokens"] == 16
    # Both choices went to one decode worker; the second read the first one's remotely prefilled KV from its cache.
    assert [dict(e.decisions) for e in t.decode if e.decisions] == [{"remote": 1, "shared": 1}]
    assert t.queue.stats["submitted"] == 1
    await eventually(lambda: _frontend_decisions(t) == 2)  # and the frontend's /metrics has them


def _frontend_decisions(t: Topology) -> float:
    """The decode workers' decisions on the frontend's /metrics (from their heartbeats), summed."""
    return sum(
        count(t.frontend, "zdyn_disagg_decisions_total", worker=w["id"], decision=d)
        for w in t.processor.workers()
        for d in ("remote", "shared", "local", "fallback")
    )
