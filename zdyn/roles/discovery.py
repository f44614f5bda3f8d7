"""Discovery on the command line: ``--seed-hubs`` and ``--no-discover`` for hubs and workers (zdyn.rpc.directory)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from zdyn.rpc import Hub
from zdyn.rpc.directory import HubDirectory
from zdyn.transport import check_endpoint


@dataclass(slots=True)
class DiscoveryConfig:
    enabled: bool = True
    seeds: list[str] = field(default_factory=list)
    advertise_host: str | None = None  # a hub's: the host other hosts dial it at (default: learned)

    def __post_init__(self) -> None:
        for seed in self.seeds:
            check_endpoint(seed)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> DiscoveryConfig:
        seeds = [s.strip() for s in (getattr(args, "seed_hubs", None) or "").split(",") if s.strip()]
        return cls(
            enabled=not getattr(args, "no_discover", False),
            seeds=list(dict.fromkeys(seeds)),
            advertise_host=getattr(args, "hub_advertise_host", None),
        )

    def hub_directory(self, hub: Hub, kind: str, model: str = "") -> HubDirectory | None:
        """The directory a role's hub keeps and tells its peers, unless discovery is off."""
        if not self.enabled:
            return None
        return HubDirectory(hub, kind, model=model, seeds=self.seeds, advertise_host=self.advertise_host)


def add_discovery_args(parser: argparse.ArgumentParser, hub: bool) -> None:
    group = parser.add_argument_group("discovery")
    if hub:
        group.add_argument(
            "--seed-hubs",
            help="comma-separated hub endpoints of a running deployment (e.g. a processor's workers endpoint): this "
            "hub announces itself there, and the workers registered there register here too",
        )
        group.add_argument(
            "--hub-advertise-host",
            help="host name or address other hosts dial this hub at (default: the address its workers dial)",
        )
    else:
        group.add_argument(
            "--seed-hubs",
            help="comma-separated hub endpoints to learn the deployment's hubs from, besides --connect",
        )
    group.add_argument(
        "--no-discover",
        action="store_true",
        help="no discovery: a hub tells its peers of no other hub; a worker registers only at --connect",
    )
