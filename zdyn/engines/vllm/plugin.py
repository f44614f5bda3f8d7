"""What zdyn changes inside its own workers' vLLM processes (vLLM's ``general_plugins`` entry point).

vLLM calls ``setup_vllm_process`` at the start of every one of its processes in this environment, zdyn's or
not. It acts only in the processes of a zdyn worker (which sets ``ZDYN_WORKER_PID`` before it starts vLLM),
so installing zdyn leaves a plain ``vllm serve`` unchanged.
"""

from __future__ import annotations

import os
import sys
from typing import Any

WORKER_PID_ENV = "ZDYN_WORKER_PID"
ARCH_REQ_XCOMP_PERM = 0x1023
XFEATURE_XTILEDATA = 18
SYS_ARCH_PRCTL = 158  # x86_64


def setup_vllm_process() -> None:
    """vLLM general plugin: vLLM calls it at the start of each of its processes (EngineCore, workers)."""
    if WORKER_PID_ENV not in os.environ:
        return  # not a zdyn worker's vLLM
    if sys.platform.startswith("linux"):
        _allow_amx()
        _die_with_worker()
    _calm_nixl_progress_thread()
    _kv_events_per_rank_on_ipc()


def _kv_events_per_rank_on_ipc() -> None:
    """A zdyn worker's vLLM publishes KV events on a private ``ipc://`` endpoint. With data parallelism each engine
    core offsets that endpoint by its rank, which vLLM does for tcp ports and ``inproc://`` names but refuses for
    ``ipc://`` (``ValueError: Invalid endpoint``): here rank r > 0 gets ``<endpoint>-dp<r>``. The client learns
    each rank's endpoint from the rank itself (``AsyncLLM.get_kv_event_sources``)."""
    from vllm.distributed.kv_events import ZmqEventPublisher

    offset = ZmqEventPublisher.offset_endpoint_port
    if getattr(offset, "zdyn_ipc", False):
        return

    def per_rank(endpoint: str | None, data_parallel_rank: int) -> str | None:
        if endpoint and data_parallel_rank and endpoint.startswith("ipc://"):
            return f"{endpoint}-dp{data_parallel_rank}"
        return offset(endpoint, data_parallel_rank)

    per_rank.zdyn_ipc = True  # type: ignore[attr-defined]
    ZmqEventPublisher.offset_endpoint_port = staticmethod(per_rank)


NIXL_PROGRESS_ENV = "ZDYN_NIXL_PROGRESS_THREAD"
NIXL_APIS = ("nixl_cu12._api", "nixl_cu13._api", "nixl._api")


def _calm_nixl_progress_thread() -> None:
    """NIXL's Python agent runs a UCX progress thread that polls with no pause (``pthrDelay = 0``): a whole core
    per agent, idle or not. With a decode and a prefill worker on a 2-core CPU box that starves everything else
    (heartbeats stop, transfers stall). vLLM exposes neither setting, so when NIXL's module is imported its agent
    constructor is wrapped. ``ZDYN_NIXL_PROGRESS_THREAD``: ``off`` (the default without a GPU: vLLM's per-step
    polling drives UCX), a pause in microseconds between polls, or ``spin`` (NIXL's own behaviour, the default
    with a GPU)."""
    default = "spin" if os.environ.get("CUDA_VISIBLE_DEVICES") or _has_nvidia_gpu() else "off"
    mode = os.environ.get(NIXL_PROGRESS_ENV, default).strip().lower()
    if mode in ("spin", "0", ""):
        return
    import importlib.abc
    import importlib.util

    def patch(module: Any) -> None:
        make_agent = module.nixlBind.nixlAgent
        if getattr(make_agent, "zdyn_calmed", False):
            return

        def agent(name: str, config: Any) -> Any:
            if mode == "off":
                config.useProgThread = False
            else:
                config.pthrDelay = int(mode)
            return make_agent(name, config)

        agent.zdyn_calmed = True  # type: ignore[attr-defined]
        module.nixlBind.nixlAgent = agent

    class Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
            if fullname not in NIXL_APIS:
                return None
            sys.meta_path.remove(self)
            try:
                spec = importlib.util.find_spec(fullname)
            finally:
                sys.meta_path.insert(0, self)
            if spec is not None and spec.loader is not None:
                load = spec.loader.exec_module

                def exec_module(module: Any) -> None:
                    load(module)
                    patch(module)

                spec.loader.exec_module = exec_module  # type: ignore[method-assign]
            return spec

    loaded = [sys.modules[name] for name in NIXL_APIS if name in sys.modules]
    for module in loaded:  # imported before this plugin ran
        patch(module)
    sys.meta_path.insert(0, Finder())


def _has_nvidia_gpu() -> bool:
    return os.path.exists("/dev/nvidiactl")


def _allow_amx() -> None:
    """Ask Linux for the AMX tile state before any kernel uses it: without that permission the first AMX
    instruction (vLLM's CPU bf16 kernels on AMX Xeons) kills the process with SIGILL."""
    import ctypes
    import platform

    if platform.machine() != "x86_64":
        return
    try:
        with open("/proc/cpuinfo") as f:
            has_amx = "amx_tile" in f.read()
    except OSError:
        return
    if has_amx:
        ctypes.CDLL(None, use_errno=True).syscall(SYS_ARCH_PRCTL, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)


def _die_with_worker() -> None:
    """An EngineCore whose zdyn worker dies (even by SIGKILL) gets SIGTERM from the kernel instead of living
    on as an orphan holding the model's memory."""
    import ctypes
    import signal

    if os.environ.get(WORKER_PID_ENV) != str(os.getppid()):
        return
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM))
    if os.environ.get(WORKER_PID_ENV) != str(os.getppid()):  # the worker died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)
