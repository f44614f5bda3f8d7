"""``zdyn worker``: an inference engine (vLLM or the mocker) serving one or more processors.

Every vLLM engine argument can be given on the command line (``zdyn worker --max-model-len 2048 ...``).
The worker connects to each processor it is given, registers with READY, streams one Outputs message per
engine step, and beats its load (running, waiting, KV usage) to them. With ``--prefill`` it is a prefill
worker of the prefill queue given in ``--connect``; with ``--prefill-queue`` a decode worker that sends long
prefills there.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import sys
from dataclasses import dataclass, field
from typing import Any

from zdyn.engines.base import Engine
from zdyn.protocol import Role
from zdyn.roles.common import CommonConfig, add_common_args, on_stop_signals, role_main, serve_metrics
from zdyn.roles.discovery import DiscoveryConfig, add_discovery_args
from zdyn.roles.ports import WorkerPorts, add_port_base_arg, check_port
from zdyn.roles.worker_dp import check_headless, data_parallel_ranks, rank_engines, serve_headless, vllm_host
from zdyn.roles.worker_kv import kv_relay_endpoints, private_kv_endpoints, relays_kv_events, remove_private_dir
from zdyn.transport import check_endpoint, host_towards, is_loopback, is_remote
from zdyn.worker import Worker

log = logging.getLogger("zdyn.worker")
ENGINES = ("vllm", "mocker")


@dataclass(slots=True)
class DisaggConfig:
    """A worker's part in disaggregated prefill: none, a prefill worker, or a decode worker."""

    prefill: bool = False  # a prefill worker: takes jobs from the prefill queue it connects to
    prefill_queue: str | None = None  # a decode worker: sends long prefills to this queue's jobs endpoint
    prefill_queue_status: str | None = None  # the queue's status endpoint (default: jobs port + 2)
    max_local_prefill_length: int = 512
    max_prefill_queue_size: int = 8
    remote_prefill_timeout_s: float = 30.0
    kv_lease_s: int = 30
    settings_file: str | None = None  # re-read max-local-prefill-length / max-prefill-queue-size from here

    def __post_init__(self) -> None:
        if self.prefill and self.prefill_queue:
            raise ValueError("--prefill (a prefill worker) and --prefill-queue (a decode worker) exclude each other")
        if self.prefill_queue:
            queues = self.prefill_queue.split(",")
            for queue in queues:
                check_endpoint(queue)
            statuses = (self.prefill_queue_status or "").split(",") if self.prefill_queue_status else []
            if statuses and len(statuses) != len(queues):
                raise ValueError("--prefill-queue-status needs one endpoint per --prefill-queue endpoint")
            self.prefill_queue_status = ",".join(statuses or [str(offset_port(q, 2)) for q in queues])
        if self.remote_prefill_timeout_s <= 0:
            raise ValueError(f"--remote-prefill-timeout must be positive, got {self.remote_prefill_timeout_s}")

    @property
    def kv_transfer(self) -> bool:
        return self.prefill or bool(self.prefill_queue)


@dataclass(slots=True)
class WorkerConfig:
    engine: str = "vllm"
    hubs: list[str] = field(default_factory=lambda: ["tcp://127.0.0.1:5555"])
    worker_id: str = field(default_factory=lambda: f"worker-{socket.gethostname()}-{os.getpid()}")
    num_workers: int = 1  # mocker only: simulated workers in this process
    model: str | None = None  # None: the embedded SmolLM2-135M-Instruct
    served_model_name: str | None = None
    kv_events: bool = True
    kv_events_port: int = 0  # 0: free ports
    port_base: int = 0  # 0: free ports for what no port flag fixes
    nixl_side_channel_port: int = 0
    advertise_host: str | None = None  # None: per hub, this host's address on the route to it
    metrics_port: int = 0
    headless: bool = False  # only vLLM's engine ranks of this node (worker_dp.py): nothing registers
    disagg: DisaggConfig = field(default_factory=DisaggConfig)
    discovery: DiscoveryConfig = field(default_factory=DiscoveryConfig)
    common: CommonConfig = field(default_factory=CommonConfig)
    engine_flags: Any = None  # the parsed engine flags: vLLM's (for AsyncEngineArgs) or the mocker's

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"--engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if not self.hubs:
            raise ValueError("--connect needs at least one endpoint")
        for hub in self.hubs:
            check_endpoint(hub)
        if self.num_workers < 1 or (self.num_workers > 1 and self.engine != "mocker"):
            raise ValueError("--num-workers > 1 is for the mocker; start one process per vLLM worker")
        check_port("--kv-events-port", self.kv_events_port, 2 * self.num_workers)
        check_port("--port-base", self.port_base, 4 * self.num_workers)
        check_port("--nixl-side-channel-port", self.nixl_side_channel_port, self.num_workers)
        if self.advertise_host and is_loopback(self.advertise_host):
            remote = [e for e in [*self.hubs, self.disagg.prefill_queue or ""] if is_remote(e)]
            if remote:
                raise ValueError(
                    f"--advertise-host {self.advertise_host} is this host only, but {remote[0]} is on another host "
                    "and could not reach this worker there: leave --advertise-host out (each hub then gets this "
                    "host's address on the route to it) or give an address that host reaches"
                )
        check_headless(self)

    def ports(self, index: int = 0) -> WorkerPorts:
        return WorkerPorts.layout(self.port_base, self.kv_events_port, self.nixl_side_channel_port, index)

    def key_role(self) -> str:
        return "prefill" if self.disagg.prefill else "worker"

    def binds(self) -> list[str]:
        """The KV-event relay's endpoint (loopback, or every interface when a hub is on another host)."""
        if not relays_kv_events(self) or self.headless:
            return []
        return [kv_relay_endpoints(self, 0)[0]]

    def host_towards(self, endpoint: str) -> str:
        """The address peers at ``endpoint`` reach this worker at."""
        return self.advertise_host or host_towards(endpoint)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> WorkerConfig:
        served = args.served_model_name
        return cls(
            engine=args.engine,
            hubs=list(dict.fromkeys(e.strip() for e in args.connect.split(",") if e.strip())),
            worker_id=args.worker_id or f"worker-{socket.gethostname()}-{os.getpid()}",
            num_workers=args.num_workers,
            model=args.model,
            served_model_name=served[0] if isinstance(served, list) else served,
            kv_events=not args.no_kv_events,
            kv_events_port=args.kv_events_port,
            port_base=args.port_base,
            nixl_side_channel_port=args.nixl_side_channel_port,
            advertise_host=args.advertise_host,
            metrics_port=args.metrics_port,
            headless=getattr(args, "headless", False),
            disagg=DisaggConfig(
                prefill=args.prefill,
                prefill_queue=args.prefill_queue,
                prefill_queue_status=args.prefill_queue_status,
                max_local_prefill_length=args.max_local_prefill_length,
                max_prefill_queue_size=args.max_prefill_queue_size,
                remote_prefill_timeout_s=args.remote_prefill_timeout,
                kv_lease_s=args.kv_lease,
                settings_file=args.disagg_settings,
            ),
            discovery=DiscoveryConfig.from_args(args),
            common=CommonConfig.from_args(args),
            engine_flags=args,
        )

    def worker_ids(self) -> list[str]:
        if ranks := data_parallel_ranks(self):  # one vLLM engine with data-parallel ranks: a worker per rank
            return [f"{self.worker_id}-dp{rank}" for rank in ranks]
        return [self.worker_id] if self.num_workers == 1 else [f"{self.worker_id}-{i}" for i in range(self.num_workers)]


def add_worker_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("zdyn worker")
    group.add_argument("--engine", default="vllm", choices=ENGINES, help="inference engine")
    group.add_argument(
        "--connect",
        default="tcp://127.0.0.1:5555",
        help="processor endpoint(s) to serve, comma-separated (default tcp://127.0.0.1:5555)",
    )
    group.add_argument("--worker-id", help="unique id (default: worker-<host>-<pid>)")
    group.add_argument(
        "--num-workers", type=int, default=1, help="mocker only: this many simulated workers in one process"
    )
    group.add_argument(
        "--kv-events-port",
        type=int,
        default=0,
        help="port of the KV-event relay the KV router subscribes to (CURVE with keys); replay is on the next port "
        "(default: --port-base, else free ports; vLLM's --kv-events-config or the mocker's --kv-events-endpoint, "
        "if given, are used as they are, without relay or CURVE)",
    )
    add_port_base_arg(
        group, 0, "KV events +0, KV replay +1, (+2 unused), NIXL side channel +3, the next simulated "
        "worker +4; 0: free ports"
    )  # fmt: skip
    group.add_argument(
        "--nixl-side-channel-port", type=int, default=0, help="vLLM with NIXL: port of its side channel for KV "
        "handshakes (default: $VLLM_NIXL_SIDE_CHANNEL_PORT, else --port-base + 3, else a free port)"
    )  # fmt: skip
    group.add_argument("--no-kv-events", action="store_true", help="publish no KV-cache events")
    group.add_argument(
        "--metrics-port", type=int, default=0, help="serve Prometheus metrics here (requests, cancels, load, "
        "the engine's own counts, prefill decisions); 0: none"
    )  # fmt: skip
    group.add_argument(
        "--advertise-host",
        help="host name or address other hosts reach this worker at (default: for each hub, this host's address "
        "on the route to that hub)",
    )
    disagg = parser.add_argument_group("zdyn disaggregated prefill")
    disagg.add_argument(
        "--prefill",
        action="store_true",
        help="be a prefill worker: take prefill jobs from the prefill queue given in --connect",
    )
    disagg.add_argument(
        "--prefill-queue",
        help="be a decode worker that sends long prefills to this prefill queue (its jobs endpoint, e.g. "
        "tcp://host:5590; the queue's status is read from the port after next); several, comma-separated, "
        "for high availability: each job goes to a live queue",
    )
    disagg.add_argument("--prefill-queue-status", help="the prefill queue's status endpoint, if not port + 2")
    disagg.add_argument(
        "--max-local-prefill-length",
        type=int,
        default=512,
        help="prefill remotely only when more prompt tokens than this are not cached here",
    )
    disagg.add_argument(
        "--max-prefill-queue-size", type=int, default=8, help="prefill locally while this many jobs wait"
    )
    disagg.add_argument(
        "--remote-prefill-timeout", type=float, default=30.0, help="seconds to wait for a remote prefill"
    )
    disagg.add_argument(
        "--kv-lease",
        type=int,
        default=30,
        help="prefill worker (vLLM): seconds a finished prefill's KV waits for its decode worker to read it "
        "(NixlConnector's kv_lease_duration); a decode worker uses a result only within half of this",
    )
    disagg.add_argument(
        "--disagg-settings",
        help="YAML file with max-local-prefill-length / max-prefill-queue-size, re-read when it changes",
    )
    add_discovery_args(parser, hub=False)
    add_common_args(parser)


def build_parser(engine: str) -> argparse.ArgumentParser:
    if engine == "vllm":
        from zdyn.engines import vllm

        parser: argparse.ArgumentParser = vllm.make_parser(prog="zdyn worker", description=__doc__)
        vllm.add_cli_args(parser)
        add_worker_args(parser)
        parser.add_argument(
            "--headless", action="store_true", help="run only this node's vLLM engine ranks (--data-parallel-size-"
            "local, --data-parallel-start-rank, --data-parallel-address of the front) or TP/PP workers (--node-rank); "
            "the front zdyn worker registers them"
        )  # fmt: skip
        parser.set_defaults(model=None)  # no --model: the embedded default model
    else:
        from zdyn.roles import mocker_flags

        parser = argparse.ArgumentParser(prog="zdyn worker", description=__doc__)
        add_worker_args(parser)
        parser.add_argument("--model", help="model folder: only config.json and the tokenizer are used")
        parser.add_argument("--served-model-name", help="name clients use (default: the model folder's name)")
        mocker_flags.add_cli_args(parser)
    return parser


def make_engine(config: WorkerConfig, index: int = 0) -> Engine:
    """The engine ``config`` describes; ``index`` numbers the simulated workers of one process."""
    from zdyn.models import resolve_model, served_model_name

    if config.engine == "vllm":
        from zdyn.engines import vllm

        host = vllm_host(config, private_kv_endpoints(index) if config.kv_events else None)
        return vllm.VllmEngine(vllm.engine_args(config.engine_flags, host))
    model = resolve_model(config.model)
    name = config.served_model_name or served_model_name(model)
    from zdyn.engines.mocker.engine import MockerEngine
    from zdyn.roles.mocker_flags import from_cli_args

    mocker = from_cli_args(config.engine_flags, model_path=model, model_name=name)
    mocker.seed += index
    if mocker.kv_events_endpoint:  # given: one port per simulated worker from there on
        mocker.kv_events_endpoint = offset_port(mocker.kv_events_endpoint, 2 * index)
        mocker.kv_events_replay_endpoint = offset_port(mocker.kv_events_replay_endpoint, 2 * index)
    elif config.kv_events:
        mocker.kv_events_endpoint, mocker.kv_events_replay_endpoint = private_kv_endpoints(index)
    return MockerEngine(mocker)


def with_disagg(engine: Engine, config: WorkerConfig, index: int = 0) -> Engine:
    """A prefill worker's engine runs prompts only; a decode worker's sends long prefills to prefill workers."""
    disagg = config.disagg
    if disagg.prefill:
        from zdyn.disagg.prefill import PrefillEngine

        return PrefillEngine(engine)
    if not disagg.prefill_queue:
        return engine
    from zdyn.disagg.decode import DisaggEngine, PrefillClient
    from zdyn.disagg.policy import DisaggPolicy

    assert disagg.prefill_queue_status is not None
    queues = zip(disagg.prefill_queue.split(","), disagg.prefill_queue_status.split(","), strict=True)
    clients = [PrefillClient(jobs, status, config.host_towards(jobs)) for jobs, status in queues]
    policy = DisaggPolicy(disagg.max_local_prefill_length, disagg.max_prefill_queue_size)
    return DisaggEngine(
        engine, clients, policy, timeout_s=disagg.remote_prefill_timeout_s, settings_file=disagg.settings_file
    )


def offset_port(endpoint: str | None, index: int) -> str | None:
    """``tcp://host:5557`` -> ``tcp://host:(5557 + index)``, as vLLM offsets data-parallel ranks."""
    if not endpoint or index == 0 or not endpoint.startswith("tcp://"):
        return endpoint
    head, _, port = endpoint.rpartition(":")
    return f"{head}:{int(port) + index}" if port.isdigit() else endpoint


async def serve(config: WorkerConfig) -> int:
    if config.headless:
        return await serve_headless(config)
    role = Role.PREFILL if config.disagg.prefill else Role.WORKER
    ranks = data_parallel_ranks(config)
    rank = int(getattr(config.engine_flags, "data_parallel_rank", None) or 0)
    try:
        ids = config.worker_ids()
        engines = (
            rank_engines(make_engine(config), ranks) if ranks else [make_engine(config, i) for i in range(len(ids))]
        )
        workers = [
            Worker(
                with_disagg(engines[i], config, i),
                config.hubs,
                worker_id,
                advertise_host=config.advertise_host,
                discover=config.discovery.enabled,
                seeds=config.discovery.seeds,
                data_parallel_rank=ranks[i] if ranks else rank,
                role=role,
                liveness=config.common.liveness,
                kv_relay=kv_relay_endpoints(config, i) if relays_kv_events(config) else None,
            )  # fmt: skip
            for i, worker_id in enumerate(ids)
        ]
    except ValueError as e:  # impossible settings
        log.error("cannot start: %s", e)
        return 2
    if config.metrics_port:
        from zdyn.disagg.decode import DisaggEngine
        from zdyn.disagg.metrics import DisaggCollector
        from zdyn.roles.worker_metrics import WorkerCollector

        disagg = [(w.worker_id, w.engine) for w in workers if isinstance(w.engine, DisaggEngine)]
        serve_metrics(config.metrics_port, WorkerCollector(workers), DisaggCollector(disagg))

    def stop() -> None:
        for worker in workers:
            worker.close()

    async def drain() -> None:
        await asyncio.gather(*(w.drain(config.common.drain_timeout_s) for w in workers))

    on_stop_signals(stop, drain)
    try:
        codes = await asyncio.gather(*(w.run() for w in workers))
    finally:
        remove_private_dir()
    return max(codes)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--engine", default=None)
    pre.add_argument("-f", "--config-file")
    known, _ = pre.parse_known_args(argv)
    engine = known.engine or _engine_from_config(known.config_file) or "vllm"
    if engine not in ENGINES:
        print(f"zdyn worker: --engine must be one of {', '.join(ENGINES)}", file=sys.stderr)
        return 2
    return role_main(argv, build_parser(engine), sections(argv, engine), WorkerConfig.from_args, serve)


def sections(argv: list[str], engine: str = "mocker") -> tuple[str, ...]:
    """The config file's sections a worker reads, later ones winning: a prefill worker's (or a headless node's) own
    last."""
    own = ["PrefillWorker"] if "--prefill" in argv else ["HeadlessWorker"] if "--headless" in argv else []
    return ("Worker", f"Worker.{engine}", *own)


def _engine_from_config(path: str | None) -> Any:
    if not path:
        return None
    from zdyn.roles.config import load_sections

    sections = load_sections(path)
    return sections.get("Worker", {}).get("engine") or sections.get("Common", {}).get("engine")


if __name__ == "__main__":
    raise SystemExit(main())
