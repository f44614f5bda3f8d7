"""``zdyn prefill-queue``: the prefill queue of the disagg scenarios, as its own small process.

Decode workers PUSH ``PrefillJob``s (and ``Cancel``s) to ``--jobs-endpoint`` (PULL). Prefill workers register
at ``--prefill-workers-endpoint`` exactly as workers register at a processor (READY, heartbeats) and get jobs
over that hub's streaming RPC, at most their capacity each, the emptiest first. When a prefill worker finishes,
the queue PUSHes ``PrefillDone`` (the KV-transfer parameters) to the decode worker that asked; when one dies,
its jobs run again elsewhere. ``QueueStatus`` goes out on ``--status-endpoint`` (PUB) on every change, at most
every 20 ms, and once a second, so decode workers know the queue depth.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from zdyn.disagg.metrics import DisaggCollector
from zdyn.disagg.queue_service import PrefillQueueService
from zdyn.protocol import Role
from zdyn.roles.common import CommonConfig, add_common_args, role_main, serve_behind_hub, serve_metrics
from zdyn.roles.discovery import DiscoveryConfig, add_discovery_args
from zdyn.roles.ports import QUEUE_BASE, add_port_base_arg, endpoint_or_base
from zdyn.rpc import Hub
from zdyn.rpc.metrics import RefusalCollector
from zdyn.transport import check_endpoint


@dataclass(slots=True)
class PrefillQueueConfig:
    jobs_endpoint: str = "tcp://*:5590"
    prefill_workers_endpoint: str = "tcp://*:5591"
    status_endpoint: str = "tcp://*:5592"
    max_attempts: int = 2
    max_jobs_per_worker: int = 2  # 0: each prefill worker's max_num_seqs
    metrics_port: int = 0
    discovery: DiscoveryConfig = field(default_factory=DiscoveryConfig)
    common: CommonConfig = field(default_factory=CommonConfig)

    def __post_init__(self) -> None:
        for endpoint in (self.jobs_endpoint, self.prefill_workers_endpoint, self.status_endpoint):
            check_endpoint(endpoint)
        if self.max_attempts < 1:
            raise ValueError(f"--max-attempts must be at least 1, got {self.max_attempts}")
        if self.max_jobs_per_worker < 0:
            raise ValueError(f"--max-jobs-per-worker must be >= 0, got {self.max_jobs_per_worker}")

    def key_role(self) -> str:
        return "prefill-queue"

    def binds(self) -> list[str]:
        return [self.jobs_endpoint, self.prefill_workers_endpoint, self.status_endpoint]

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> PrefillQueueConfig:
        return cls(
            jobs_endpoint=endpoint_or_base(args.jobs_endpoint, args.port_base),
            prefill_workers_endpoint=endpoint_or_base(args.prefill_workers_endpoint, args.port_base, 1),
            status_endpoint=endpoint_or_base(args.status_endpoint, args.port_base, 2),
            max_attempts=args.max_attempts,
            max_jobs_per_worker=args.max_jobs_per_worker,
            metrics_port=args.metrics_port,
            discovery=DiscoveryConfig.from_args(args),
            common=CommonConfig.from_args(args),
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zdyn prefill-queue", description=__doc__)
    parser.add_argument("--jobs-endpoint", help="decode workers push jobs here (PULL; default tcp://*:PORT_BASE)")
    parser.add_argument(
        "--prefill-workers-endpoint", help="prefill workers register here (default tcp://*:PORT_BASE+1)"
    )
    parser.add_argument("--status-endpoint", help="queue depth for decode workers (PUB; default tcp://*:PORT_BASE+2)")
    add_port_base_arg(parser, QUEUE_BASE, "jobs +0, prefill-workers hub +1, status +2")
    parser.add_argument("--max-attempts", type=int, default=2, help="runs of a job whose prefill worker died")
    parser.add_argument(
        "--max-jobs-per-worker",
        type=int,
        default=2,
        help="jobs a prefill worker runs at once (0: its max_num_seqs); beyond that they wait in the queue, "
        "which is the depth decode workers compare with --max-prefill-queue-size",
    )
    parser.add_argument("--metrics-port", type=int, default=0, help="serve Prometheus metrics on this port")
    add_discovery_args(parser, hub=True)
    add_common_args(parser)
    return parser


async def serve(config: PrefillQueueConfig) -> int:
    workers = Hub(
        config.prefill_workers_endpoint, role=Role.PREFILL, liveness=config.common.liveness,
        max_peers=config.common.max_peers,
    )  # fmt: skip
    service = PrefillQueueService(
        config.jobs_endpoint, config.status_endpoint, workers, max_attempts=config.max_attempts,
        max_jobs_per_worker=config.max_jobs_per_worker,
    )  # fmt: skip
    if config.metrics_port:
        serve_metrics(config.metrics_port, DisaggCollector(service=service), RefusalCollector([workers]))
    banner = (
        f"prefill queue: jobs at {config.jobs_endpoint}, prefill workers at {config.prefill_workers_endpoint}, "
        f"status at {config.status_endpoint}"
    )
    directory = config.discovery.hub_directory(workers, "prefill-queue")
    return await serve_behind_hub(service, workers, banner, config.common.drain_timeout_s, directory)


def main(argv: list[str] | None = None) -> int:
    return role_main(argv, build_parser(), ("PrefillQueue",), PrefillQueueConfig.from_args, serve)


if __name__ == "__main__":
    raise SystemExit(main())
