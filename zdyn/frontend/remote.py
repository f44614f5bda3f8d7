"""The frontend's backend when processors run as their own processes: they register at a hub of processors."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from zdyn.errors import unavailable
from zdyn.protocol import Delta, Process, TextRequest
from zdyn.router.selector import RoundRobin
from zdyn.rpc import Hub


class RemoteBackend:
    """Separate processors register at ``processors``; requests go to them round-robin."""

    def __init__(self, processors: Hub) -> None:
        self.processors = processors
        self.selector = RoundRobin()

    async def process(self, request_id: str, request: TextRequest) -> AsyncIterator[Delta]:
        peers = [p for p in self.processors.live_peers() if p.load.worker_ids]
        if not peers:
            raise unavailable("no processor with a live worker is registered")
        peer = (await self.selector.select(request_id, [], peers)).peer
        async for delta in self.processors.stream(peer, Process(request_id=request_id, request=request)):
            yield delta

    def models(self) -> list[str]:
        return sorted({p.ready.model for p in self.processors.live_peers()})

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
