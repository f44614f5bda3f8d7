"""A worker: one inference engine (vLLM or the mocker) served to every processor it registers with.

The worker connects to each hub it is given, registers with READY, streams one Outputs message per engine
step, and beats its load (running, waiting, KV usage) to them. ``zdyn worker`` (``roles/worker.py``) builds
the engine from the command line; a pipeline of your own can build one from ``Worker(engine, hubs, ...)``.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import AsyncIterator

import msgspec

from zdyn.engines.base import Engine, EngineDeadError
from zdyn.errors import RequestError, unavailable
from zdyn.kv_publisher import KvEventRelay
from zdyn.protocol import Delta, Generate, Ready, Role
from zdyn.rpc import RefusedError, Request, Spoke
from zdyn.rpc.directory import SpokeDiscovery
from zdyn.transport import Liveness, TransportError, advertised, host_towards, is_loopback

log = logging.getLogger(__name__)


class Worker:
    """One engine served to every hub in ``hubs``; ``role`` is ``PREFILL`` for a prefill worker."""

    def __init__(
        self,
        engine: Engine,
        hubs: list[str],
        worker_id: str,
        *,
        advertise_host: str | None = None,
        role: Role = Role.WORKER,
        liveness: Liveness | None = None,
        discover: bool = True,
        seeds: list[str] | None = None,
        data_parallel_rank: int = 0,
        kv_relay: tuple[str, str] | None = None,
    ) -> None:
        if not hubs:
            raise ValueError("a worker needs at least one hub to connect to")
        self.engine = engine
        self.hubs = hubs
        self.worker_id = worker_id
        self.advertise_host = advertise_host  # None: per hub, this host's address on the route to it
        self.role = role
        self.liveness = liveness or Liveness()
        self.discover = discover  # register at the hubs the hubs' directories name (zdyn.rpc.directory)
        self.seeds = seeds or []
        self.data_parallel_rank = data_parallel_rank  # vLLM's --data-parallel-rank: one zdyn worker per rank
        self.discovery: SpokeDiscovery | None = None
        self.kv_relay = kv_relay  # bind endpoints for relaying the engine's KV events off this host
        self.relay: KvEventRelay | None = None
        self.spoke: Spoke | None = None
        self.engine_dead = False

    async def run(self) -> int:
        """Start the engine, register and serve until ``close()``. Returns the process exit code."""
        started = time.perf_counter()
        await self.engine.start()
        info = self.engine.info
        log.info(
            "worker %s: %s engine for %s ready in %.1fs (max_model_len=%d max_num_seqs=%d block_size=%d kv_blocks=%d)",
            self.worker_id, info.engine, info.model, time.perf_counter() - started, info.max_model_len,
            info.max_num_seqs, info.block_size, info.num_kv_blocks,
        )  # fmt: skip
        events, replay = info.kv_events_endpoint, info.kv_replay_endpoint
        if events and self.kv_relay is not None:
            try:
                self.relay = KvEventRelay(events, replay, *self.kv_relay)
            except TransportError as e:
                log.error("worker %s cannot relay its KV events: %s", self.worker_id, e)
                await self.engine.shutdown()
                return 2
            await self.relay.start()
            events, replay = self.relay.endpoint, self.relay.replay_endpoint
        ready = Ready(
            peer_id=self.worker_id,
            role=self.role,
            model=info.model,
            engine=info.engine,
            max_num_seqs=info.max_num_seqs,
            max_model_len=info.max_model_len,
            block_size=info.block_size,
            num_kv_blocks=info.num_kv_blocks,
            kv_events_endpoint=events,  # bind form: each hub gets it with the address it reaches
            kv_replay_endpoint=replay,
            kv_lease_s=info.kv_lease_s,
            data_parallel_rank=self.data_parallel_rank,
        )
        if ready.kv_events_endpoint:
            log.info("worker %s publishes KV events at %s (replay %s)", self.worker_id, ready.kv_events_endpoint,
                     ready.kv_replay_endpoint or "none")  # fmt: skip
        self.spoke = Spoke(
            self.hubs, ready, self.handle, load=self.engine.load, liveness=self.liveness, ready_for=self.ready_for
        )
        gc.collect()
        gc.freeze()  # the engine's many start-up objects leave the collector's view
        log.info("worker %s serving at %s", self.worker_id, ", ".join(self.hubs))
        if self.discover:
            local = self.advertise_host is not None and is_loopback(self.advertise_host)
            self.discovery = SpokeDiscovery(self.spoke, model=info.model, seeds=self.seeds, local_only=local)
            self.discovery.start()
        try:
            await self.spoke.run()
        except RefusedError as e:
            log.error("%s", e)
            return 2
        finally:
            if self.discovery is not None:
                await self.discovery.close()
            if self.relay is not None:
                await self.relay.close()
            await self.engine.shutdown()
        return 1 if self.engine_dead else 0

    def ready_for(self, hub: str) -> Ready:
        """The READY for ``hub``: the KV-event endpoints at the address that hub's host reaches this one at."""
        assert self.spoke is not None
        ready = self.spoke.ready
        host = self.advertise_host or host_towards(hub)
        return msgspec.structs.replace(
            ready,
            host=host,
            kv_events_endpoint=advertised(ready.kv_events_endpoint, host),
            kv_replay_endpoint=advertised(ready.kv_replay_endpoint, host),
        )

    def close(self) -> None:
        if self.spoke is not None:
            self.spoke.close()

    async def drain(self, timeout_s: float) -> None:
        """Take nothing new, finish what is in flight (up to ``timeout_s``), hand the rest back, stop."""
        if self.spoke is not None:
            await self.spoke.drain(timeout_s)
        self.close()

    async def handle(self, request: Request) -> AsyncIterator[Delta]:
        if not isinstance(request, Generate):
            raise RequestError("a worker serves Generate requests, not text requests")
        try:
            async for delta in self.engine.generate(request):
                yield delta
        except EngineDeadError as e:
            log.error("engine died: %s; worker %s exits", e, self.worker_id)
            self.engine_dead = True
            self.close()
            raise unavailable(f"worker {self.worker_id}'s engine died") from e
