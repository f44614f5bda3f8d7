"""The frontend's backend when processors run as their own processes: they register at a hub of processors."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any

from zdyn.choice import Reissues, Resilience, movable
from zdyn.errors import DRAINING, PEER_LOST, RequestError, unavailable
from zdyn.protocol import ChoiceProgress, Delta, Process, TextRequest
from zdyn.router.selector import RoundRobin
from zdyn.rpc import Hub, Peer, PeerEvent


class RemoteBackend:
    """Separate processors register at ``processors``; requests go to them round-robin.

    A processor that dies or drains mid-request does not fail it: the request goes to another processor with
    the tokens each choice already produced (``Process.resume``), and the client's stream goes on."""

    def __init__(self, processors: Hub, resilience: Resilience | None = None) -> None:
        self.processors = processors
        self.selector = RoundRobin()
        self.resilience = resilience or Resilience()
        self.reissues = Reissues()
        # Models any processor has served: while all of a model's processors restart, its requests wait for
        # one (then 503), they are not refused as an unknown model (404).
        self.known_models: set[str] = set()
        processors.listeners.append(self._on_processor)

    def _on_processor(self, event: PeerEvent) -> None:
        if event.kind == "joined" and event.peer.ready.model:
            self.known_models.add(event.peer.ready.model)

    async def process(self, request_id: str, request: TextRequest) -> AsyncGenerator[Delta]:
        progress: dict[int, ChoiceProgress] = {}
        avoid: set[str] = set()
        attempts = 0
        while True:
            peer = await self._processor(avoid)
            attempts += 1
            msg = Process(request_id=request_id, request=request, resume=list(progress.values()))
            try:
                async with aclosing(self.processors.stream(peer, msg)) as deltas:
                    async for delta in deltas:
                        choice = progress.get(delta.index)
                        if choice is None:
                            choice = progress[delta.index] = ChoiceProgress(index=delta.index, token_ids=[])
                        choice.token_ids.extend(delta.token_ids)
                        choice.finished = delta.finish is not None
                        yield delta
                return
            except RequestError as e:
                lost = e.type in (PEER_LOST, DRAINING)  # the processor itself is gone, not the request's fault
                if not lost or (progress and not movable(request.sampling)):
                    raise
                if attempts > self.resilience.migration_limit:
                    raise unavailable(f"gave up after {attempts} processor(s); last: {e.message}") from e
                self.reissues.add("migration" if progress else "retry", e.type)
                avoid.add(peer.id)

    async def _processor(self, avoid: set[str]) -> Peer:
        """A live processor with a live worker, preferring one not in ``avoid``; waits for one up to
        ``worker_wait_s`` (a processor restarting)."""
        hub, loop_wait = self.processors, self.resilience.worker_wait_s
        loop = asyncio.get_running_loop()
        started = loop.time()
        while True:
            live = [p for p in hub.live_peers() if p.load.worker_ids]
            preferred = [p for p in live if p.id not in avoid] or live
            if preferred:
                return (await self.selector.select("", [], preferred)).peer
            waited = loop.time() - started
            if waited >= loop_wait:
                raise unavailable("no processor with a live worker is registered")
            await hub.wait_for_change(max(0.01, min(1.0, loop_wait - waited)))

    def models(self) -> list[str]:
        return sorted(self.known_models | {p.ready.model for p in self.processors.live_peers()})

    def workers(self) -> list[dict[str, Any]]:
        """Each live worker once, with the processors that reach it (a worker may serve several)."""
        seen: dict[str, dict[str, Any]] = {}
        for p in self.processors.live_peers():
            hosts = p.load.worker_hosts if len(p.load.worker_hosts) == len(p.load.worker_ids) else []
            for i, worker in enumerate(p.load.worker_ids):
                entry = seen.setdefault(worker, {"id": worker, "model": p.ready.model, "processors": []})
                entry["processors"].append(p.id)
                if hosts:
                    entry["host"] = hosts[i]
        return list(seen.values())

    def processors_view(self) -> list[dict[str, Any]]:
        """Each separate processor with its host, workers and router link (``/health``)."""
        return [
            {
                "id": p.id,
                "host": p.ready.host,
                "model": p.ready.model,
                "workers": len(p.load.worker_ids),
                **({"router": p.load.router} if p.load.router else {}),
            }  # fmt: skip
            for p in self.processors.live_peers()
        ]
