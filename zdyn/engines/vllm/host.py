"""The vLLM settings zdyn chooses for this host, and the ``VLLM_*`` variables it sets, in one place."""

from __future__ import annotations

import glob
import logging
import os
import socket
from dataclasses import dataclass
from typing import Any

from zdyn.transport import free_tcp_ports

UCX_DEVICES_ENV = "UCX_NET_DEVICES"
log = logging.getLogger(__name__)

CPU_KV_CACHE_BYTES = 512 * 2**20  # vLLM on CPU needs an explicit KV cache size
NIXL_KV_LEASE_S = 30  # NixlConnector's default kv_lease_duration: unread prefill KV is freed after this
MIN_KV_LEASE_S = 6  # vLLM renews a lease every lease // 6 s: less would renew on every step
IN_PROCESS_ENV = "VLLM_ENABLE_V1_MULTIPROCESSING"  # "0": the model runs inside vLLM's EngineCore process
SIDE_CHANNEL_HOST_ENV = "VLLM_NIXL_SIDE_CHANNEL_HOST"
SIDE_CHANNEL_PORT_ENV = "VLLM_NIXL_SIDE_CHANNEL_PORT"
CPU_KV_SPACE_ENV = "VLLM_CPU_KVCACHE_SPACE"
CPU_BIND_ENV = "VLLM_CPU_OMP_THREADS_BIND"


@dataclass(slots=True)
class HostSettings:
    """What a zdyn worker asks of its vLLM engine beyond the user's own engine arguments."""

    model: str  # the model folder or id to load
    served_model_name: str
    embedded_default: bool = False  # serving the embedded SmolLM2 (no --model given)
    kv_transfer: bool = False  # a prefill or decode worker of a disagg deployment: NIXL moves the KV
    kv_lease_s: int = NIXL_KV_LEASE_S
    advertise_host: str = "127.0.0.1"  # where other workers reach this one (NIXL's side channel)
    kv_events: tuple[str, str] | None = None  # bind endpoints of the KV-event publisher and its replay socket
    nixl_side_channel_port: int = 0  # 0: $VLLM_NIXL_SIDE_CHANNEL_PORT, else a free port

    def __post_init__(self) -> None:
        if self.kv_transfer and self.kv_lease_s < MIN_KV_LEASE_S:
            raise ValueError(f"--kv-lease must be at least {MIN_KV_LEASE_S} seconds, got {self.kv_lease_s}")


def make_parser(**kwargs: Any) -> Any:
    """vLLM's own parser class, which understands its JSON- and dict-valued flags."""
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return FlexibleArgumentParser(**kwargs)


def add_cli_args(parser: Any) -> None:
    """Every vLLM engine argument (``--max-model-len``, ``--block-size``, ...) on the worker's command line."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    AsyncEngineArgs.add_cli_args(parser)


def on_cpu() -> bool:
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def engine_args(parsed: Any, host: HostSettings) -> Any:
    """vLLM's ``AsyncEngineArgs`` from the worker's parsed command line, completed for this host: the model,
    a KV-cache size and fp32 for the embedded model on CPU, NIXL for disaggregated prefill, KV events."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    args = AsyncEngineArgs.from_cli_args(parsed)
    args.model, args.served_model_name = host.model, [host.served_model_name]
    cpu = on_cpu()
    if host.embedded_default and args.dtype == "auto" and cpu:
        args.dtype = "float32"
        log.info("embedded SmolLM2 on CPU: dtype float32 (bfloat16 is ~1.5x faster but answers less accurately)")
    if host.kv_transfer:
        if args.kv_transfer_config is None:
            args.kv_transfer_config = nixl_transfer_config(cpu, host.kv_lease_s)
        _nixl_side_channel(host.advertise_host, host.nixl_side_channel_port)
        _ucx_devices(host.advertise_host)
        if cpu and IN_PROCESS_ENV not in os.environ:
            # With NIXL loaded, vLLM's separate model-worker process made every prefill 10-40x slower on CPU
            # (benchmarks/nixl_spike/NOTES.md, gotcha 2); inside EngineCore it runs at full speed.
            os.environ[IN_PROCESS_ENV] = "0"
            log.info("CPU + NIXL: the model runs inside vLLM's EngineCore process (%s=0)", IN_PROCESS_ENV)
    if args.kv_events_config is None and host.kv_events is not None:
        args.kv_events_config = kv_events_config(*host.kv_events)
    if cpu:
        external = args.data_parallel_rank is not None or args.data_parallel_external_lb
        local_ranks = 1 if external else args.data_parallel_size_local or args.data_parallel_size
        per_node = args.tensor_parallel_size * args.pipeline_parallel_size // max(1, args.nnodes)
        _split_cpus(per_node, local_ranks)
    if args.kv_cache_memory_bytes is None and not os.environ.get(CPU_KV_SPACE_ENV) and cpu:
        args.kv_cache_memory_bytes = CPU_KV_CACHE_BYTES
        log.info("CPU: KV cache size set to %d MiB (--kv-cache-memory-bytes)", CPU_KV_CACHE_BYTES >> 20)
    return args


def _split_cpus(world_size: int, local_ranks: int) -> None:
    """vLLM's CPU build gives each TP/PP worker of a node a NUMA node of its own and refuses to start on fewer
    (``AssertionError: Not enough allowed NUMA nodes to bind threads of 2 local CPUWorkers``): on such a host, the
    allowed CPUs are split evenly among the workers of this node's data-parallel ranks (``VLLM_CPU_OMP_THREADS_BIND``,
    one ``|``-separated list per worker, ranks first)."""
    if world_size <= 1 or CPU_BIND_ENV in os.environ:
        return
    nodes = len(glob.glob("/sys/devices/system/node/node[0-9]*")) or 1
    cpus = sorted(os.sched_getaffinity(0))
    workers = world_size * local_ranks
    if nodes >= world_size or len(cpus) < workers:
        return  # vLLM's own binding works, or says why not
    share = len(cpus) // workers
    os.environ[CPU_BIND_ENV] = "|".join(",".join(map(str, cpus[i * share : (i + 1) * share])) for i in range(workers))
    log.info("CPU: %d NUMA node(s) for %d workers per rank: %s=%s", nodes, world_size, CPU_BIND_ENV,
             os.environ[CPU_BIND_ENV])  # fmt: skip


def kv_events_config(endpoint: str, replay_endpoint: str) -> Any:
    """vLLM's own ZMQ publisher of KV-cache events (what the KV router subscribes to)."""
    from vllm.config import KVEventsConfig

    return KVEventsConfig(
        enable_kv_cache_events=True, publisher="zmq", endpoint=endpoint, replay_endpoint=replay_endpoint
    )


def nixl_transfer_config(cpu: bool, lease_s: int = NIXL_KV_LEASE_S) -> Any:
    """vLLM's NixlConnector for disaggregated prefill: the decode side pulls the prompt's KV from the prefill
    side (on CPU through UCX from host memory). A KV pull that fails is recomputed locally, not an error.
    The prefill side keeps a finished prompt's KV for ``lease_s`` seconds, renewed while a reader has it."""
    from vllm.config import KVTransferConfig

    return KVTransferConfig(
        kv_connector="NixlConnector",
        kv_role="kv_both",
        kv_buffer_device="cpu" if cpu else "cuda",
        kv_load_failure_policy="recompute",
        kv_connector_extra_config={"backends": ["UCX"], "kv_lease_duration": lease_s},
    )


def _nixl_side_channel(host: str, port: int = 0) -> None:
    """Where this worker's vLLM answers NIXL handshakes (read by its EngineCore when it starts): ``port`` if
    given (``--nixl-side-channel-port``, ``--port-base`` + 3), else the environment's, else a free one."""
    os.environ.setdefault(SIDE_CHANNEL_HOST_ENV, host)
    if port:
        os.environ[SIDE_CHANNEL_PORT_ENV] = str(port)
    os.environ.setdefault(SIDE_CHANNEL_PORT_ENV, str(free_tcp_ports(1)[0]))
    log.info("NIXL side channel at %s:%s", os.environ[SIDE_CHANNEL_HOST_ENV], os.environ[SIDE_CHANNEL_PORT_ENV])


def _ucx_devices(host: str) -> None:
    """UCX (NIXL's KV transfers) uses every network device unless told: on a worker reached over the network,
    only the interface of the advertised address. Loopback-only deployments leave UCX as it is (shared memory)."""
    if UCX_DEVICES_ENV in os.environ:
        return
    try:
        address = socket.gethostbyname(host)
    except OSError:
        return
    if address.startswith("127."):
        return
    import psutil

    for name, addresses in psutil.net_if_addrs().items():
        if any(a.address == address for a in addresses):
            os.environ[UCX_DEVICES_ENV] = name
            log.info("UCX (NIXL KV transfers) on %s only, the interface of %s (%s)", name, host, UCX_DEVICES_ENV)
            return
