"""Worker choice on the command line: the routing flags of a frontend, processor or router, and the selector."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from zdyn.router.core import DEFAULT_REQUEST_TTL_S, KvRouter
from zdyn.router.selector import MODES, Random, RoundRobin, Selector
from zdyn.rpc import Hub


@dataclass(slots=True)
class RoutingConfig:
    """How a processor picks workers: a mode, or a separate router to ask; and the KV router's own settings."""

    mode: str = "round-robin"
    router_endpoint: str | None = None  # a separate `zdyn router`
    router_timeout_s: float = 0.25
    overlap_weight: float = 1.0
    temperature: float = 0.0
    block_size: int = 0  # 0: the first worker's
    request_ttl_s: float = DEFAULT_REQUEST_TTL_S

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"router mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.router_timeout_s <= 0:
            raise ValueError(f"--router-timeout must be positive, got {self.router_timeout_s}")
        if self.temperature < 0:
            raise ValueError(f"--router-temperature must be >= 0, got {self.temperature}")
        if self.block_size < 0 or self.request_ttl_s < 0:
            raise ValueError("--block-size and --router-request-ttl must be >= 0")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> RoutingConfig:
        return cls(
            mode=args.router_mode,
            router_endpoint=getattr(args, "router_endpoint", None),
            router_timeout_s=getattr(args, "router_timeout", 0.25),
            overlap_weight=args.kv_overlap_weight,
            temperature=args.router_temperature,
            block_size=args.block_size,
            request_ttl_s=args.router_request_ttl,
        )

    def kv_router(self) -> KvRouter:
        return KvRouter(
            block_size=self.block_size,
            mode=self.mode,
            overlap_weight=self.overlap_weight,
            temperature=self.temperature,
            request_ttl_s=self.request_ttl_s,
        )


def add_router_args(parser: argparse.ArgumentParser, default_mode: str = "round-robin") -> None:
    """Routing flags of a frontend or processor: the policy, or a separate router to ask."""
    group = parser.add_argument_group("routing")
    add_policy_args(group, default_mode, MODES)
    group.add_argument(
        "--router-endpoint",
        help="ask a separate `zdyn router` at this endpoint (e.g. tcp://host:5570) instead of routing here",
    )
    group.add_argument(
        "--router-timeout", type=float, default=0.25, help="seconds to wait for the router before round-robin"
    )


def add_policy_args(parser: argparse._ActionsContainer, default_mode: str, modes: tuple[str, ...]) -> None:
    """The KV router's own settings, for in-process routing and for ``zdyn router``."""
    parser.add_argument(
        "--router-mode", "--router", dest="router_mode", default=default_mode, choices=modes, help="worker choice"
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


def make_selector(config: RoutingConfig, workers: Hub) -> Selector:
    """The selector ``config`` asks for; a KV router follows the KV events of ``workers``' peers."""
    if config.router_endpoint:
        from zdyn.router.client import RemoteSelector, RouterClient

        return RemoteSelector(RouterClient(config.router_endpoint, timeout_s=config.router_timeout_s))
    if config.mode == "round-robin":
        return RoundRobin()
    if config.mode == "random":
        return Random()
    from zdyn.router.feed import LocalSelector

    return LocalSelector(config.kv_router(), workers)
