"""vLLM behind zdyn's Engine interface: the only package that imports vLLM (always lazily).

``engine``: ``VllmEngine`` around vLLM's ``AsyncLLM``. ``ranks``: one engine per data-parallel rank of it.
``headless``: vLLM's headless engine ranks for the nodes beyond the first. ``host``: the engine arguments and
``VLLM_*`` settings zdyn chooses for this host (CPU defaults, NIXL for disaggregated prefill, KV events).
``plugin``: what zdyn changes inside its own workers' vLLM processes. ``quiet``: vLLM's harmless CPU messages,
filtered before vLLM is imported.
"""

from zdyn.engines.vllm.engine import VllmEngine
from zdyn.engines.vllm.headless import NODE_KV_EVENTS, run_headless
from zdyn.engines.vllm.host import HostSettings, add_cli_args, engine_args, make_parser, on_cpu
from zdyn.engines.vllm.plugin import setup_vllm_process
from zdyn.engines.vllm.quiet import quiet_harmless_messages
from zdyn.engines.vllm.ranks import RankEngine, rank_engines

quiet_harmless_messages()  # the modules above import vLLM only lazily: this comes first

__all__ = [
    "NODE_KV_EVENTS",
    "HostSettings",
    "RankEngine",
    "VllmEngine",
    "add_cli_args",
    "engine_args",
    "make_parser",
    "on_cpu",
    "rank_engines",
    "run_headless",
    "setup_vllm_process",
]
