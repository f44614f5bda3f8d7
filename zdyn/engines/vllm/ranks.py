"""One zdyn worker per data-parallel rank of one vLLM engine (vLLM's internal load balancing, headless ranks).

A vLLM engine started with ``--data-parallel-size N`` (and no ``--data-parallel-rank``) runs N engine cores,
on this node or, with ``--data-parallel-size-local``, partly on other nodes (``zdyn worker --headless``); its
client (``AsyncLLM``) sends each request to the rank it is told. ``rank_engines`` turns that one engine into N
``Engine``s, one per rank: each starts the shared engine (once), runs requests on its own rank, reports its own
rank's load and names its own rank's KV-event publisher, so each registers as a worker of its own and the KV
router indexes and routes to each rank.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

from zdyn.engines.base import EngineInfo
from zdyn.engines.vllm.engine import VllmEngine
from zdyn.protocol import Delta, Generate, Heartbeat


class SharedEngine:
    """Starts ``engine`` once for all its ranks and shuts it down when the last rank has."""

    def __init__(self, engine: VllmEngine, num_users: int) -> None:
        self.engine = engine
        self._users = num_users
        self._start: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self._start is None:
            self._start = asyncio.ensure_future(self.engine.start())
        await asyncio.shield(self._start)

    async def release(self) -> None:
        self._users -= 1
        if self._users == 0:
            await self.engine.shutdown()


class RankEngine:
    """Data-parallel rank ``rank`` of a shared ``VllmEngine``, as an engine of its own."""

    def __init__(self, shared: SharedEngine, rank: int) -> None:
        self.shared = shared
        self.rank = rank
        self._info = EngineInfo(shared.engine.served_model_name, "vllm", 0, 0, 0, 0)

    @property
    def info(self) -> EngineInfo:
        return self._info

    @property
    def prompt_tokens(self) -> Any:
        return self.shared.engine.prompt_tokens  # of all ranks together

    async def start(self) -> None:
        await self.shared.start()
        engine = self.shared.engine
        if self.rank not in engine.ranks:
            raise ValueError(f"vLLM's engine serves data-parallel ranks {engine.ranks}, not rank {self.rank}")
        events, replay = engine.kv_event_sources.get(self.rank, ("", ""))
        self._info = dataclasses.replace(engine.info, kv_events_endpoint=events, kv_replay_endpoint=replay)

    def generate(self, request: Generate) -> AsyncIterator[Delta]:
        return self.shared.engine.generate(request, self.rank)

    def load(self) -> Heartbeat:
        return self.shared.engine.load(self.rank)

    async def release_kv(self, request_id: str, kv_transfer_params: dict[str, Any]) -> None:
        await self.shared.engine.release_kv(request_id, kv_transfer_params)

    async def shutdown(self) -> None:
        await self.shared.release()


def rank_engines(engine: VllmEngine, ranks: list[int]) -> list[RankEngine]:
    """One engine per data-parallel rank in ``ranks`` (the ranks ``engine``'s client will manage)."""
    shared = SharedEngine(engine, len(ranks))
    return [RankEngine(shared, rank) for rank in ranks]
