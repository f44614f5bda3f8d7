"""``zdyn worker``: an inference engine (vLLM or the mocker) serving one or more processors.

Every vLLM engine argument can be given on the command line (``zdyn worker --max-model-len 2048 ...``).
The worker connects to each processor it is given, registers with READY, streams one Outputs message per
engine step, and beats its load (running, waiting, KV usage) to them.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

from zdyn.cli import add_common_args, freeze_startup_objects, liveness, parse_args, run, setup_logging
from zdyn.engines.base import Engine, EngineDeadError
from zdyn.errors import RequestError
from zdyn.protocol import Delta, Generate, Ready
from zdyn.rpc import RefusedError, Request, Spoke
from zdyn.transport import advertised, host_towards

log = logging.getLogger(__name__)
ENGINES = ("vllm", "mocker")
CPU_KV_CACHE_BYTES = 512 * 2**20  # vLLM on CPU needs an explicit KV cache size
IN_PROCESS_ENV = "VLLM_ENABLE_V1_MULTIPROCESSING"  # "0": the model runs inside vLLM's EngineCore process


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
        help="port of the KV-event publisher the KV router subscribes to; replay is on the next port "
        "(default: free ports; vLLM's --kv-events-config or the mocker's --kv-events-endpoint win)",
    )
    group.add_argument("--no-kv-events", action="store_true", help="publish no KV-cache events")
    disagg = parser.add_argument_group("zdyn disaggregated prefill")
    disagg.add_argument(
        "--prefill",
        action="store_true",
        help="be a prefill worker: take prefill jobs from the prefill queue given in --connect",
    )
    disagg.add_argument(
        "--prefill-queue",
        help="be a decode worker that sends long prefills to this prefill queue (its jobs endpoint, e.g. "
        "tcp://host:5590; the queue's status is read from the port after next)",
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
    disagg.add_argument("--metrics-port", type=int, default=0, help="serve Prometheus metrics (decisions) here")
    disagg.add_argument(
        "--disagg-settings",
        help="YAML file with max-local-prefill-length / max-prefill-queue-size, re-read when it changes",
    )
    group.add_argument(
        "--advertise-host",
        help="host name or address other hosts reach this worker at (default: this host's address on the "
        "route to the first processor)",
    )
    add_common_args(parser)


def build_parser(engine: str) -> argparse.ArgumentParser:
    if engine == "vllm":
        from zdyn.engines import vllm

        parser = vllm.make_parser(prog="zdyn worker", description=__doc__)
        vllm.add_cli_args(parser)
        add_worker_args(parser)
        parser.set_defaults(model=None)  # no --model: the embedded default model
    else:
        from zdyn.engines.mocker import config as mocker

        parser = argparse.ArgumentParser(prog="zdyn worker", description=__doc__)
        add_worker_args(parser)
        parser.add_argument("--model", help="model folder: only config.json and the tokenizer are used")
        parser.add_argument("--served-model-name", help="name clients use (default: the model folder's name)")
        mocker.add_cli_args(parser)
    return parser


def make_engine(args: argparse.Namespace, index: int = 0) -> Engine:
    """The engine the flags describe; ``index`` numbers the simulated workers of one process."""
    from zdyn.models import resolve_model, served_model_name

    model = resolve_model(args.model)
    if args.engine == "vllm":
        from zdyn.engines import vllm
        from zdyn.engines.vllm import VllmEngine

        names = args.served_model_name or [served_model_name(model)]
        if args.model is None and args.dtype == "auto" and _on_cpu():
            args.dtype = "float32"
            log.info("embedded SmolLM2 on CPU: dtype float32 (bfloat16 is ~1.5x faster but answers less accurately)")
        args.model, args.served_model_name = model, names
        if args.prefill or args.prefill_queue:
            if args.kv_transfer_config is None:
                if args.kv_lease < 6:  # vLLM renews a lease every lease // 6 s: 0 would renew on every step
                    raise ValueError(f"--kv-lease must be at least 6 seconds, got {args.kv_lease}")
                args.kv_transfer_config = vllm.nixl_transfer_config(_on_cpu(), args.kv_lease)
            nixl_side_channel(args.advertise_host or host_towards(hub_endpoints(args.connect)[0]))
            if _on_cpu() and IN_PROCESS_ENV not in os.environ:
                # With NIXL loaded, vLLM's separate model-worker process made every prefill 10-40x slower on CPU
                # (benchmarks/nixl_spike/NOTES.md, gotcha 2); inside EngineCore it runs at full speed.
                os.environ[IN_PROCESS_ENV] = "0"
                log.info("CPU + NIXL: the model runs inside vLLM's EngineCore process (%s=0)", IN_PROCESS_ENV)
        if args.kv_events_config is None and not args.no_kv_events:
            args.kv_events_config = vllm.kv_events_config(*kv_event_endpoints(args.kv_events_port, index))
        if args.kv_cache_memory_bytes is None and not os.environ.get("VLLM_CPU_KVCACHE_SPACE") and _on_cpu():
            args.kv_cache_memory_bytes = CPU_KV_CACHE_BYTES
            log.info("CPU: KV cache size set to %d MiB (--kv-cache-memory-bytes)", CPU_KV_CACHE_BYTES >> 20)
        return VllmEngine(args, names[0])
    from zdyn.engines.mocker.config import from_cli_args
    from zdyn.engines.mocker.engine import MockerEngine

    args.model_path = model
    args.model_name = args.served_model_name or served_model_name(model)
    config = from_cli_args(args)
    config.seed += index
    if config.kv_events_endpoint:  # given: one port per simulated worker from there on
        config.kv_events_endpoint = offset_port(config.kv_events_endpoint, 2 * index)
        config.kv_events_replay_endpoint = offset_port(config.kv_events_replay_endpoint, 2 * index)
    elif not args.no_kv_events:
        config.kv_events_endpoint, config.kv_events_replay_endpoint = kv_event_endpoints(args.kv_events_port, index)
    return MockerEngine(config)


def with_disagg(engine: Engine, args: argparse.Namespace) -> Engine:
    """A decode worker (``--prefill-queue``) wraps its engine to send long prefills to prefill workers."""
    if not args.prefill_queue or args.prefill:
        return engine
    from zdyn.disagg.decode import DisaggEngine, PrefillClient
    from zdyn.disagg.policy import DisaggPolicy

    status = args.prefill_queue_status or offset_port(args.prefill_queue, 2)
    client = PrefillClient(args.prefill_queue, status or "", args.advertise_host or host_towards(args.prefill_queue))
    policy = DisaggPolicy(args.max_local_prefill_length, args.max_prefill_queue_size)
    return DisaggEngine(
        engine, client, policy, timeout_s=args.remote_prefill_timeout, settings_file=args.disagg_settings
    )


def nixl_side_channel(host: str) -> None:
    """Where this worker's vLLM answers NIXL handshakes (read by its EngineCore when it starts)."""
    from zdyn.launch import free_port

    os.environ.setdefault("VLLM_NIXL_SIDE_CHANNEL_HOST", host)
    os.environ.setdefault("VLLM_NIXL_SIDE_CHANNEL_PORT", str(free_port()))
    log.info("NIXL side channel at %s:%s", os.environ["VLLM_NIXL_SIDE_CHANNEL_HOST"],
             os.environ["VLLM_NIXL_SIDE_CHANNEL_PORT"])  # fmt: skip


def kv_event_endpoints(port: int, index: int = 0) -> tuple[str, str]:
    """Bind endpoints of a KV-event publisher and its replay socket: ``port`` and ``port + 1`` (two ports
    further for each simulated worker of a process), or two free ports when ``port`` is 0."""
    if port:
        first = port + 2 * index
        return f"tcp://*:{first}", f"tcp://*:{first + 1}"
    from zdyn.launch import free_ports

    events, replay = free_ports(2)
    return f"tcp://*:{events}", f"tcp://*:{replay}"


def offset_port(endpoint: str | None, index: int) -> str | None:
    """``tcp://host:5557`` -> ``tcp://host:(5557 + index)``, as vLLM offsets data-parallel ranks."""
    if not endpoint or index == 0 or not endpoint.startswith("tcp://"):
        return endpoint
    head, _, port = endpoint.rpartition(":")
    return f"{head}:{int(port) + index}" if port.isdigit() else endpoint


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


class Worker:
    """One engine served to every processor in ``hubs``."""

    def __init__(self, engine: Engine, hubs: list[str], worker_id: str, args: argparse.Namespace) -> None:
        self.engine = engine
        self.hubs = hubs
        self.worker_id = worker_id
        self.advertise_host = args.advertise_host or host_towards(hubs[0])
        self.prefill = args.prefill
        self.liveness = liveness(args)
        self.spoke: Spoke | None = None
        self.engine_dead = False

    async def run(self) -> int:
        started = time.perf_counter()
        await self.engine.start()
        info = self.engine.info
        log.info(
            "worker %s: %s engine for %s ready in %.1fs (max_model_len=%d max_num_seqs=%d block_size=%d kv_blocks=%d)",
            self.worker_id, info.engine, info.model, time.perf_counter() - started, info.max_model_len,
            info.max_num_seqs, info.block_size, info.num_kv_blocks,
        )  # fmt: skip
        ready = Ready(
            peer_id=self.worker_id,
            role="prefill" if self.prefill else "worker",
            model=info.model,
            engine=info.engine,
            max_num_seqs=info.max_num_seqs,
            max_model_len=info.max_model_len,
            block_size=info.block_size,
            num_kv_blocks=info.num_kv_blocks,
            kv_events_endpoint=advertised(info.kv_events_endpoint, self.advertise_host),
            kv_replay_endpoint=advertised(info.kv_replay_endpoint, self.advertise_host),
            kv_lease_s=info.kv_lease_s,
        )
        if ready.kv_events_endpoint:
            log.info("worker %s publishes KV events at %s (replay %s)", self.worker_id, ready.kv_events_endpoint,
                     ready.kv_replay_endpoint or "none")  # fmt: skip
        self.spoke = Spoke(self.hubs, ready, self.handle, load=self.engine.load, liveness=self.liveness)
        freeze_startup_objects()
        log.info("worker %s serving processors at %s", self.worker_id, ", ".join(self.hubs))
        try:
            await self.spoke.run()
        except RefusedError as e:
            log.error("%s", e)
            return 2
        finally:
            await self.engine.shutdown()
        return 1 if self.engine_dead else 0

    def close(self) -> None:
        if self.spoke is not None:
            self.spoke.close()

    async def handle(self, request: Request) -> AsyncIterator[Delta]:
        if not isinstance(request, Generate):
            raise RequestError("a worker serves Generate requests, not text requests", 400)
        if self.prefill:  # a prefill job: prompt only, and keep the KV for the decode worker to pull
            if request.model and request.model != self.engine.info.model:
                raise RequestError(f"this prefill worker serves {self.engine.info.model!r}, not {request.model!r}")
            request.sampling.max_tokens, request.sampling.min_tokens = 1, 0
            request.kv_transfer_params = {**(request.kv_transfer_params or {}), "do_remote_decode": True}
        received = time.monotonic()
        try:
            async for delta in self.engine.generate(request):
                if self.prefill and delta.finish is not None:
                    delta.job_s = time.monotonic() - received  # the KV's lease starts about now
                yield delta
        except EngineDeadError as e:
            log.error("engine died: %s; worker %s exits", e, self.worker_id)
            self.engine_dead = True
            self.close()
            raise RequestError(f"worker {self.worker_id}'s engine died", 503, "unavailable") from e


def hub_endpoints(value: str) -> list[str]:
    return list(dict.fromkeys(e.strip() for e in value.split(",") if e.strip()))


async def serve(args: argparse.Namespace) -> int:
    if args.num_workers > 1 and args.engine != "mocker":
        log.error("--num-workers > 1 is for the mocker; start one process per vLLM worker")
        return 2
    hubs = hub_endpoints(args.connect)
    ids = [args.worker_id] if args.num_workers == 1 else [f"{args.worker_id}-{i}" for i in range(args.num_workers)]
    try:
        workers = [
            Worker(with_disagg(make_engine(args, i), args), hubs, worker_id, args) for i, worker_id in enumerate(ids)
        ]
    except ValueError as e:  # impossible settings
        log.error("cannot start: %s", e)
        return 2
    if args.metrics_port:
        from zdyn.cli import serve_metrics
        from zdyn.disagg.decode import DisaggEngine
        from zdyn.disagg.metrics import DisaggCollector

        disagg = [(w.worker_id, w.engine) for w in workers if isinstance(w.engine, DisaggEngine)]
        serve_metrics(args.metrics_port, DisaggCollector(disagg))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda: [w.close() for w in workers])
    codes = await asyncio.gather(*(w.run() for w in workers))
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
    args = parse_args(build_parser(engine), argv, "Worker", f"Worker.{engine}")
    args.worker_id = args.worker_id or f"worker-{socket.gethostname()}-{os.getpid()}"
    setup_logging(args)
    return run(serve(args))


def _engine_from_config(path: str | None) -> Any:
    if not path:
        return None
    from zdyn.config import load_sections

    sections = load_sections(path)
    return sections.get("Worker", {}).get("engine") or sections.get("Common", {}).get("engine")


if __name__ == "__main__":
    raise SystemExit(main())
