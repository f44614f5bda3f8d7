"""A ``zdyn worker`` over vLLM's own distributed execution: one worker per data-parallel rank, headless ranks.

- ``--data-parallel-size N`` without ``--data-parallel-rank`` (vLLM's internal load balancing): one vLLM engine
  whose ranks run here or, with ``--data-parallel-size-local``, on other nodes; this process registers one
  worker per rank (``<worker-id>-dp<r>``, ``Ready.data_parallel_rank`` r) and relays each rank's KV events.
- ``--data-parallel-rank R`` (external load balancing): one zdyn worker per rank, as before.
- ``--headless``: only vLLM's engine ranks (or, with ``--node-rank`` > 0, TP/PP workers), no zdyn front.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from zdyn.engines.base import Engine
    from zdyn.engines.vllm import HostSettings
    from zdyn.roles.worker import WorkerConfig


def data_parallel_ranks(config: WorkerConfig) -> list[int]:
    """The data-parallel ranks this process registers as workers of their own ([]: one worker, no ranks)."""
    flags = config.engine_flags
    size = int(getattr(flags, "data_parallel_size", None) or 1)
    rank, external_lb = getattr(flags, "data_parallel_rank", None), getattr(flags, "data_parallel_external_lb", False)
    external = rank is not None or external_lb
    if config.engine != "vllm" or config.headless or external or size <= 1:
        return []
    start = getattr(flags, "data_parallel_start_rank", None)
    local = getattr(flags, "data_parallel_size_local", None)
    if start is not None and local:  # vLLM's hybrid load balancing: this front sends to its own node's ranks
        return list(range(start, start + local))
    return list(range(size))


def check_headless(config: WorkerConfig) -> None:
    if not config.headless:
        return
    if config.engine != "vllm":
        raise ValueError("--headless runs vLLM engine ranks: it needs --engine vllm")
    if config.disagg.kv_transfer:
        raise ValueError("--headless ranks take no part in disaggregated prefill of their own: leave out --prefill*")


def vllm_host(config: WorkerConfig, kv_events: tuple[str, str] | None) -> HostSettings:
    """What a zdyn worker asks of its vLLM engine beyond the command line's engine arguments."""
    from zdyn.engines import vllm
    from zdyn.models import resolve_model, served_model_name

    model = resolve_model(config.model)
    return vllm.HostSettings(
        model=model,
        served_model_name=config.served_model_name or served_model_name(model),
        embedded_default=config.model is None,
        kv_transfer=config.disagg.kv_transfer,
        kv_lease_s=config.disagg.kv_lease_s,
        advertise_host=config.host_towards(config.hubs[0]),
        kv_events=kv_events,
        nixl_side_channel_port=config.ports(0).nixl_side_channel,
    )


def rank_engines(engine: Engine, ranks: list[int]) -> list[Any]:
    """``engine`` (a ``VllmEngine``) as one engine per data-parallel rank."""
    from zdyn.engines import vllm

    assert isinstance(engine, vllm.VllmEngine)
    return list(vllm.rank_engines(engine, ranks))


async def serve_headless(config: WorkerConfig) -> int:
    """This node's vLLM engine ranks until SIGTERM or SIGINT; nothing registers (the front does, per rank)."""
    from zdyn.engines import vllm

    host = vllm_host(config, vllm.NODE_KV_EVENTS if config.kv_events else None)
    return vllm.run_headless(config.engine_flags, host, config.advertise_host)
