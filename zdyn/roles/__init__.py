"""The role layer: one module per ``zdyn ROLE``, each with a typed config, ``build_parser``, ``serve`` and ``main``.

A role turns its command line (and the YAML config's sections) into a typed config, builds the library's
objects from it and serves until SIGINT or SIGTERM. Nothing below this layer reads argparse or environment
variables (apart from ``engines/vllm``'s ``VLLM_*`` settings).
"""

ROLES = {
    "frontend": "zdyn.roles.frontend",
    "processor": "zdyn.roles.processor",
    "worker": "zdyn.roles.worker",
    "router": "zdyn.roles.router",
    "prefill-queue": "zdyn.roles.prefill_queue",
    "keys": "zdyn.roles.keys",
    "bench": "zdyn.bench.cli",
    "models": "zdyn.roles.models",
}
