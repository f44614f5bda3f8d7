"""Where a worker's KV events go: the engine's publisher on host-private ipc, the relay on tcp (CURVE with keys)."""

from __future__ import annotations

import shutil
import tempfile
from typing import TYPE_CHECKING

from zdyn.transport import is_loopback, is_remote

if TYPE_CHECKING:
    from zdyn.roles.worker import WorkerConfig


def private_kv_endpoints(index: int = 0) -> tuple[str, str]:
    """Where an engine publishes its KV events and answers replays: ipc in a folder only this user can open
    (``KvEventRelay`` carries them off the host, encrypted)."""
    global _private_dir
    if _private_dir is None:
        _private_dir = tempfile.mkdtemp(prefix="zdyn-kv-")  # mode 0700
    return f"ipc://{_private_dir}/events-{index}", f"ipc://{_private_dir}/replay-{index}"


_private_dir: str | None = None


def kv_relay_endpoints(config: WorkerConfig, index: int = 0) -> tuple[str, str]:
    """Bind endpoints of simulated worker ``index``'s KV-event relay and its replay socket: loopback when every
    hub (the readers) is on this host, else every interface (each hub is told the address it reaches)."""
    local = not any(is_remote(hub) for hub in config.hubs) and is_loopback(config.advertise_host or "127.0.0.1")
    host = "127.0.0.1" if local else "*"
    ports = config.ports(index)
    return f"tcp://{host}:{ports.kv_events or '*'}", f"tcp://{host}:{ports.kv_replay or '*'}"


def relays_kv_events(config: WorkerConfig) -> bool:
    """zdyn chose the engine's KV-event endpoints (private), so a relay publishes them; explicit engine settings
    (vLLM's --kv-events-config, the mocker's --kv-events-endpoint) are used as they are."""
    flags = config.engine_flags
    explicit = getattr(flags, "kv_events_config", None) or getattr(flags, "kv_events_endpoint", None)
    return config.kv_events and not explicit


def remove_private_dir() -> None:
    global _private_dir
    if _private_dir is not None:
        shutil.rmtree(_private_dir, ignore_errors=True)
        _private_dir = None
