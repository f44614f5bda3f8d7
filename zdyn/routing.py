"""How a processor picks the worker for a request. The KV-aware router plugs in here."""

from __future__ import annotations

import random
from typing import Protocol

from zdyn.rpc import Peer


class Selector(Protocol):
    async def select(self, token_ids: list[int], peers: list[Peer]) -> Peer:
        """Choose one of ``peers`` (never empty) for a prompt."""
        ...


class RoundRobin:
    def __init__(self) -> None:
        self._next = 0

    async def select(self, token_ids: list[int], peers: list[Peer]) -> Peer:
        peer = peers[self._next % len(peers)]
        self._next += 1
        return peer


class Random:
    def __init__(self, seed: int | None = None) -> None:
        self._random = random.Random(seed)

    async def select(self, token_ids: list[int], peers: list[Peer]) -> Peer:
        return self._random.choice(peers)


SELECTORS: dict[str, type[RoundRobin] | type[Random]] = {"round-robin": RoundRobin, "random": Random}


def make_selector(name: str) -> Selector:
    try:
        return SELECTORS[name]()
    except KeyError:
        raise ValueError(f"unknown router mode {name!r}; choose from {', '.join(SELECTORS)}") from None
