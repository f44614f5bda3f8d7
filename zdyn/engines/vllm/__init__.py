"""vLLM behind zdyn's Engine interface: the only package that imports vLLM (always lazily).

``engine``: ``VllmEngine`` around vLLM's ``AsyncLLM``. ``host``: the engine arguments and ``VLLM_*`` settings zdyn
chooses for this host (CPU defaults, NIXL for disaggregated prefill, KV events). ``plugin``: what zdyn changes
inside its own workers' vLLM processes. ``quiet``: vLLM's harmless CPU messages, filtered before vLLM is imported.
"""

from zdyn.engines.vllm.engine import VllmEngine
from zdyn.engines.vllm.host import HostSettings, add_cli_args, engine_args, make_parser, on_cpu
from zdyn.engines.vllm.plugin import setup_vllm_process
from zdyn.engines.vllm.quiet import quiet_harmless_messages

quiet_harmless_messages()  # the modules above import vLLM only lazily: this comes first

__all__ = ["HostSettings", "VllmEngine", "add_cli_args", "engine_args", "make_parser", "on_cpu", "setup_vllm_process"]
