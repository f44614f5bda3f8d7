"""The fixed port layout of every role: ``--port-base`` and the offsets from it (docs/multinode.md's port table).

Each role that listens has a base port and puts its sockets at fixed offsets from it, so a firewall can open
a known range per host. An endpoint flag (or config key) given explicitly wins over the base.

| role           | default base | sockets (offset)                                                          |
|----------------|--------------|---------------------------------------------------------------------------|
| frontend       | 5555         | workers hub (+0); HTTP is ``--port`` (8000)                                |
| processor      | 5556         | workers hub (+0)                                                          |
| router         | 5570         | route queries (+0), workers hub (+1)                                      |
| prefill-queue  | 5590         | jobs (+0), prefill-workers hub (+1), status (+2)                          |
| worker         | none (free)  | KV events (+0), KV replay (+1), +2 unused, NIXL side channel (+3), the     |
|                |              | next simulated worker (``--num-workers``) 4 ports further                 |
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

FRONTEND_BASE = 5555
PROCESSOR_BASE = 5556
ROUTER_BASE = 5570
QUEUE_BASE = 5590
WORKER_PORTS = 4  # ports per worker (and per simulated worker of a process): events, replay, (unused), NIXL
KV_EVENTS, KV_REPLAY, NIXL_SIDE_CHANNEL = 0, 1, 3


def bind_endpoint(port: int) -> str:
    """Where a role listens: every interface of its host."""
    return f"tcp://*:{port}"


def add_port_base_arg(parser: argparse.ArgumentParser | argparse._ArgumentGroup, default: int, layout: str) -> None:
    parser.add_argument(
        "--port-base",
        type=int,
        default=default,
        help=f"first of this role's fixed ports: {layout} (default {default}); an endpoint flag given wins",
    )


def check_port(name: str, port: int, span: int = 1) -> None:
    if not 0 <= port <= 65535 - span:
        raise ValueError(f"{name} must be in [0, {65535 - span}], got {port}")


def endpoint_or_base(explicit: str | None, base: int, offset: int = 0) -> str:
    """The endpoint flag's value if given, else the role's fixed port ``base + offset`` on every interface."""
    return explicit or bind_endpoint(base + offset)


@dataclass(frozen=True, slots=True)
class WorkerPorts:
    """The ports one (simulated) worker listens on; 0 = a free port chosen at start."""

    kv_events: int = 0
    kv_replay: int = 0
    nixl_side_channel: int = 0  # vLLM's NIXL handshake listener (a prefill or decode worker with NIXL)

    @classmethod
    def layout(cls, base: int, kv_events_port: int, nixl_port: int, index: int = 0) -> WorkerPorts:
        """Ports of simulated worker ``index``: explicit flags first (``--kv-events-port`` K gives K, K+1 and two
        further per simulated worker; ``--nixl-side-channel-port`` one further), then ``--port-base`` (4 per
        worker), else 0 (free)."""
        first = base + WORKER_PORTS * index if base else 0
        if kv_events_port:
            events, replay = kv_events_port + 2 * index, kv_events_port + 2 * index + 1
        elif first:
            events, replay = first + KV_EVENTS, first + KV_REPLAY
        else:
            events, replay = 0, 0
        nixl = nixl_port + index if nixl_port else (first + NIXL_SIDE_CHANNEL if first else 0)
        return cls(events, replay, nixl)
