"""``zdyn worker --headless``: vLLM engine ranks without a zdyn front, for the nodes beyond the first.

A model spread over nodes with vLLM's data parallelism has one front (a ``zdyn worker`` whose ``AsyncLLM`` sends
requests to every rank) and, on each other node, engine cores that connect to the front's DP coordinator
(``--data-parallel-address``, ``--data-parallel-rpc-port``). This runs vLLM's own ``vllm serve --headless``
(``run_headless``) with the engine arguments a zdyn worker would give (model folder, CPU KV-cache size, KV events),
so nothing registers here: the front registers each rank as a worker. With ``--data-parallel-size 1`` and
``--node-rank`` > 0 it is vLLM's headless multiprocessing executor (TP/PP workers of another node).

KV events: each rank publishes with vLLM's own publisher on this node's address (``VLLM_HOST_IP``, else the
address vLLM finds, a free port per rank: ``tcp://*:0``), and reports it to the front in its handshake; the front
relays them to the router (over CURVE with keys). vLLM's DP handshake, its coordinator and torch.distributed do not
authenticate either: nodes of one model belong on a trusted network.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
from typing import Any

from zdyn.engines.vllm.host import HostSettings, engine_args
from zdyn.engines.vllm.plugin import WORKER_PID_ENV

log = logging.getLogger(__name__)
NODE_KV_EVENTS = ("tcp://*:0", "tcp://*:0")  # vLLM binds this node's address and a free port, per rank
HOST_IP_ENV = "VLLM_HOST_IP"


def run_headless(parsed: Any, host: HostSettings, advertise_host: str | None = None) -> int:
    """Run this node's engine ranks until SIGTERM or SIGINT (vLLM's handler shuts them down); the exit code."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.cli.serve import run_headless as vllm_run_headless

    if advertise_host:
        os.environ.setdefault(HOST_IP_ENV, advertise_host)
    os.environ[WORKER_PID_ENV] = str(os.getpid())  # zdyn's plugin acts in these engine cores (plugin.py)
    args = engine_args(parsed, host)
    namespace = copy.copy(parsed)  # the worker's parsed command line (an argparse Namespace)
    for field in dataclasses.fields(AsyncEngineArgs):  # vLLM builds its engine arguments again from the namespace
        setattr(namespace, field.name, getattr(args, field.name))
    namespace.api_server_count = 0
    namespace.headless = True
    local = args.data_parallel_size_local
    log.info(
        "headless: %s data-parallel rank(s) from %s of %d, front at %s:%s", local if local is not None else "all",
        args.data_parallel_start_rank or 0, args.data_parallel_size, args.data_parallel_address,
        args.data_parallel_rpc_port,
    )  # fmt: skip
    try:
        vllm_run_headless(namespace)
    except SystemExit as e:  # vLLM's SIGTERM/SIGINT handler, after shutting the engines down
        return e.code if isinstance(e.code, int) else 0
    except (ValueError, RuntimeError) as e:
        log.error("headless vLLM failed: %s", e)
        return 1
    return 0
