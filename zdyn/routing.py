"""How a processor picks the worker for a request: round-robin, random, or the KV-aware router.

A ``Selector`` chooses among the live workers and hears when a routed request has finished its prefill
and when it has ended, so a KV router can count each worker's load. ``make_selector`` builds the one the
command line asks for: in this process (``--router-mode kv``) or a separate ``zdyn router``
(``--router-endpoint``).
"""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass
from typing import Protocol

from zdyn.router.core import DEFAULT_REQUEST_TTL_S
from zdyn.rpc import Hub, Peer

MODES = ("kv", "kv-load", "round-robin", "random")
PREFILLED, FINISHED = "prefilled", "finished"


@dataclass(slots=True)
class Route:
    peer: Peer
    overlap_blocks: int = 0  # leading prompt blocks the worker is expected to hold in its KV cache
    reason: str = ""


class Selector(Protocol):
    async def select(self, request_id: str, token_ids: list[int], peers: list[Peer]) -> Route:
        """Choose one of ``peers`` (never empty) for a prompt."""
        ...

    def update(self, request_id: str, event: str) -> None:
        """A routed request's prefill is done (``PREFILLED``) or it has ended (``FINISHED``)."""
        ...

    async def aclose(self) -> None: ...


class RoundRobin:
    def __init__(self) -> None:
        self._next = 0

    async def select(self, request_id: str, token_ids: list[int], peers: list[Peer]) -> Route:
        peer = peers[self._next % len(peers)]
        self._next += 1
        return Route(peer, reason="round-robin")

    def update(self, request_id: str, event: str) -> None:
        pass

    async def aclose(self) -> None:
        pass


class Random(RoundRobin):
    def __init__(self, seed: int | None = None) -> None:
        self._random = random.Random(seed)

    async def select(self, request_id: str, token_ids: list[int], peers: list[Peer]) -> Route:
        return Route(self._random.choice(peers), reason="random")


def add_router_args(parser: argparse.ArgumentParser, default_mode: str = "round-robin") -> None:
    """Routing flags of a frontend or processor: the policy, or a separate router to ask."""
    group = parser.add_argument_group("routing")
    add_policy_args(group, default_mode)
    group.add_argument(
        "--router-endpoint",
        help="ask a separate `zdyn router` at this endpoint (e.g. tcp://host:5570) instead of routing here",
    )
    group.add_argument(
        "--router-timeout", type=float, default=0.25, help="seconds to wait for the router before round-robin"
    )


def add_policy_args(parser: argparse._ActionsContainer, default_mode: str) -> None:
    """The KV router's own settings, for in-process routing and for ``zdyn router``."""
    parser.add_argument(
        "--router-mode", "--router", dest="router_mode", default=default_mode, choices=MODES, help="worker choice"
    )
    parser.add_argument("--kv-overlap-weight", type=float, default=1.0, help="weight of prefill blocks in kv cost")
    parser.add_argument("--router-temperature", type=float, default=0.0, help="0: best worker; >0: softmax sampling")
    parser.add_argument("--block-size", type=int, default=0, help="KV block size (default: the first worker's)")
    parser.add_argument(
        "--router-request-ttl",
        type=float,
        default=DEFAULT_REQUEST_TTL_S,
        help="seconds after which a routed request the router never heard finish (its processor died) no longer "
        "counts as load; 0: never",
    )


def make_selector(args: argparse.Namespace, workers: Hub) -> Selector:
    """The selector the flags ask for; a KV router follows the KV events of ``workers``' peers."""
    if getattr(args, "router_endpoint", None):
        from zdyn.router.client import RemoteSelector, RouterClient

        return RemoteSelector(RouterClient(args.router_endpoint, timeout_s=args.router_timeout))
    mode = getattr(args, "router_mode", "round-robin")
    if mode == "round-robin":
        return RoundRobin()
    if mode == "random":
        return Random()
    from zdyn.router.feed import LocalSelector, router_from_args

    return LocalSelector(router_from_args(args), workers)
