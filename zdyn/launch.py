"""Moved to ``zdyn.bench.procs`` (and ``zdyn.bench.deploy``). Only ``zdyn/worker.py`` still imports these two from
here; delete this module once it no longer does."""

from zdyn.bench.procs import free_port, free_ports

__all__ = ["free_port", "free_ports"]
