"""How a processor picks the worker for a request: the ``Selector`` seam and its two simple selectors.

A ``Selector`` chooses among the live workers and hears when a routed request has finished its prefill
and when it has ended, so a KV router can count each worker's load. ``RoundRobin`` and ``Random`` need no
state about workers; the KV-aware selectors are ``feed.LocalSelector`` (the router in this process) and
``client.RemoteSelector`` (a separate ``zdyn router``).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from zdyn.protocol import RouteEvent
from zdyn.rpc import Peer

# Worker choice of a processor: the two KV modes use the KV router (see ``policy.RoutingPolicy``).
MODES = ("kv", "kv-load", "round-robin", "random")
T = TypeVar("T")


@dataclass(slots=True)
class Route:
    peer: Peer
    overlap_blocks: int = 0  # leading prompt blocks the worker is expected to hold in its KV cache
    reason: str = ""


class Selector(Protocol):
    async def select(self, request_id: str, token_ids: Sequence[int], peers: list[Peer]) -> Route:
        """Choose one of ``peers`` (never empty) for a prompt."""
        ...

    def update(self, request_id: str, event: RouteEvent) -> None:
        """A routed request's prefill is done (``PREFILLED``) or it has ended (``FINISHED``)."""
        ...

    async def aclose(self) -> None: ...


class RoundRobin:
    """Takes turns. ``pick`` serves any sequence (the KV router's policy uses it on its worker states)."""

    reason = "round-robin"

    def __init__(self) -> None:
        self._next = 0

    def pick(self, items: Sequence[T]) -> T:
        item = items[self._next % len(items)]
        self._next += 1
        return item

    async def select(self, request_id: str, token_ids: Sequence[int], peers: list[Peer]) -> Route:
        return Route(self.pick(peers), reason=self.reason)

    def update(self, request_id: str, event: RouteEvent) -> None:
        pass

    async def aclose(self) -> None:
        pass


class Random(RoundRobin):
    reason = "random"

    def __init__(self, seed: int | None = None) -> None:
        self._random = random.Random(seed)

    def pick(self, items: Sequence[T]) -> T:
        return self._random.choice(items)
