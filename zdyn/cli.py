"""Command line: ``zdyn <role> ...`` and the pieces every role's parser shares."""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib
import logging
import signal
import sys
from collections.abc import Coroutine
from typing import Any

from zdyn.config import config_argv
from zdyn.transport import Liveness

ROLES = {
    "frontend": "zdyn.frontend.server",
    "processor": "zdyn.processor_server",
    "worker": "zdyn.worker",
    "router": "zdyn.router.service",
    "prefill-queue": "zdyn.disagg.queue_service",
    "bench": "zdyn.bench.cli",
}


def add_common_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("zdyn")
    group.add_argument("-f", "--config-file", help="YAML deployment config (Common + per-role sections)")
    if "--log-level" not in parser._option_string_actions:  # vLLM's parser has its own
        group.add_argument("--log-level", default="info", type=str.lower, choices=["debug", "info", "warning", "error"])
    group.add_argument("--heartbeat-interval", type=float, default=1.0, help="seconds between heartbeats")
    group.add_argument(
        "--heartbeat-misses",
        type=int,
        default=3,
        help="missed heartbeats after which a peer is declared dead",
    )


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None, *sections: str) -> argparse.Namespace:
    """Parse ``argv`` after the flags of ``--config-file FILE``'s sections (command line wins)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("-f", "--config-file")
    known, _ = pre.parse_known_args(argv)
    if known.config_file:
        argv = config_argv(parser, known.config_file, *sections) + argv
    return parser.parse_args(argv)


def liveness(args: argparse.Namespace) -> Liveness:
    return Liveness(args.heartbeat_interval, args.heartbeat_misses)


def setup_logging(args: argparse.Namespace) -> None:
    logging.basicConfig(
        level=str(getattr(args, "log_level", "info")).upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def serve_metrics(port: int, *collectors: Any) -> None:
    """Prometheus metrics of a role without HTTP of its own, on ``port`` (all interfaces)."""
    from prometheus_client import REGISTRY, start_http_server

    for collector in collectors:
        REGISTRY.register(collector)
    start_http_server(port)


async def serve_behind_hub(service: Any, hub: Any, banner: str) -> int:
    """Run a role's ``service`` (``run()``/``close()``) whose peers register at ``hub``, until SIGINT/SIGTERM."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, service.close)
    await hub.start()
    freeze_startup_objects()
    logging.getLogger(type(service).__module__).info("%s", banner)
    try:
        await service.run()
    finally:
        await hub.close()
    return 0


def freeze_startup_objects() -> None:
    """Call once a role has started: the many objects made at start-up (tokenizers, vLLM, transformers)
    leave the garbage collector's view, so its collections stop rescanning them while serving."""
    gc.collect()
    gc.freeze()


def run(main: Coroutine[Any, Any, int | None]) -> int:
    """Run a role's main coroutine on uvloop when available."""
    try:
        import uvloop

        return uvloop.run(main) or 0
    except ImportError:
        return asyncio.run(main) or 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ROLES:
        print(f"usage: zdyn {{{','.join(ROLES)}}} [options]   (zdyn ROLE --help for a role's options)")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(ROLES[argv[0]])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
