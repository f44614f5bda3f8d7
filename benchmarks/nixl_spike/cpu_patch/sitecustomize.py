"""Stop NIXL's progress thread from spinning a whole core on CPU-only boxes (research spike, see ../NOTES.md).

nixl 1.5.1's Python ``nixl_agent`` hard-codes ``pthrDelay = 0`` for its progress thread, so every agent (one per
vLLM worker with NixlConnector) busy-polls UCX at 100 % of a core, even when idle. vLLM exposes neither
``enable_prog_thread`` nor the delay. This module is put on PYTHONPATH for the engine processes only; when
``NIXL_PROG_THREAD`` is set it patches ``nixl_cu12._api`` right after that module is imported:

    NIXL_PROG_THREAD=off    -> no progress thread (vLLM's per-step polling drives UCX)
    NIXL_PROG_THREAD=<us>   -> keep the thread, sleeping <us> microseconds between progress calls
"""

import importlib.abc
import importlib.util
import os
import sys

_MODE = os.environ.get("NIXL_PROG_THREAD", "").strip()
_TARGETS = ("nixl_cu12._api", "nixl_cu13._api")


def _patch(api):  # type: ignore[no-untyped-def]
    orig = api.nixlBind.nixlAgent

    def nixl_agent(name, config):  # type: ignore[no-untyped-def]
        if _MODE == "off":
            config.useProgThread = False
        else:
            config.pthrDelay = int(_MODE)
        return orig(name, config)

    api.nixlBind.nixlAgent = nixl_agent


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):  # type: ignore[no-untyped-def]
        if fullname not in _TARGETS:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):  # type: ignore[no-untyped-def]
            exec_module(module)
            _patch(module)

        spec.loader.exec_module = exec_and_patch  # type: ignore[method-assign]
        return spec


if _MODE:
    sys.meta_path.insert(0, _Finder())
