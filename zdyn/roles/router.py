"""``zdyn router``: the KV-aware router as its own process, shared by every processor.

Workers register here as they do at a processor (add this router's ``--workers-endpoint`` to their
``--connect``), which tells the router their KV-event publishers and loads; processors ask over
``--endpoint`` with one ``RouteQuery`` per request (``--router-endpoint`` on the processor or frontend).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from zdyn.protocol import Role
from zdyn.roles.common import CommonConfig, add_common_args, role_main, serve_behind_hub, serve_metrics
from zdyn.roles.discovery import DiscoveryConfig, add_discovery_args
from zdyn.roles.ports import ROUTER_BASE, add_port_base_arg, endpoint_or_base
from zdyn.roles.routing import RoutingConfig, add_policy_args
from zdyn.router.policy import MODES
from zdyn.router.service import RouterService
from zdyn.rpc import Hub
from zdyn.rpc.metrics import RefusalCollector
from zdyn.transport import check_endpoint


@dataclass(slots=True)
class RouterConfig:
    endpoint: str = "tcp://*:5570"  # processors ask here
    workers_endpoint: str = "tcp://*:5571"  # workers register here
    metrics_port: int = 0
    routing: RoutingConfig = field(default_factory=lambda: RoutingConfig(mode="kv"))
    discovery: DiscoveryConfig = field(default_factory=DiscoveryConfig)
    common: CommonConfig = field(default_factory=CommonConfig)

    def __post_init__(self) -> None:
        check_endpoint(self.endpoint)
        check_endpoint(self.workers_endpoint)
        if self.routing.mode not in MODES:
            raise ValueError(f"a router's mode is one of {', '.join(MODES)}, got {self.routing.mode!r}")

    def key_role(self) -> str:
        return "router"

    def binds(self) -> list[str]:
        return [self.endpoint, self.workers_endpoint]

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> RouterConfig:
        return cls(
            endpoint=endpoint_or_base(args.endpoint, args.port_base),
            workers_endpoint=endpoint_or_base(args.workers_endpoint, args.port_base, 1),
            metrics_port=args.metrics_port,
            routing=RoutingConfig.from_args(args),
            discovery=DiscoveryConfig.from_args(args),
            common=CommonConfig.from_args(args),
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zdyn router", description=__doc__)
    parser.add_argument("--endpoint", help="where processors ask for routes (default: tcp://*:PORT_BASE)")
    parser.add_argument("--workers-endpoint", help="where workers register (default: tcp://*:PORT_BASE+1)")
    add_port_base_arg(parser, ROUTER_BASE, "route queries +0, workers hub +1")
    add_policy_args(parser, "kv", MODES)
    parser.add_argument("--metrics-port", type=int, default=0, help="serve Prometheus metrics on this port")
    add_discovery_args(parser, hub=True)
    add_common_args(parser)
    return parser


async def serve(config: RouterConfig) -> int:
    workers = Hub(
        config.workers_endpoint, role=Role.WORKER, liveness=config.common.liveness, max_peers=config.common.max_peers
    )
    service = RouterService(config.endpoint, workers, config.routing.kv_router())
    if config.metrics_port:
        from zdyn.router.metrics import RouterCollector

        serve_metrics(config.metrics_port, RouterCollector(service=service), RefusalCollector([workers]))
    banner = (
        f"router ({config.routing.mode}) answering at {config.endpoint}; workers register at {config.workers_endpoint}"
    )
    directory = config.discovery.hub_directory(workers, "router")
    return await serve_behind_hub(service, workers, banner, config.common.drain_timeout_s, directory)


def main(argv: list[str] | None = None) -> int:
    return role_main(argv, build_parser(), ("Router",), RouterConfig.from_args, serve)


if __name__ == "__main__":
    raise SystemExit(main())
