"""What every role's command line shares: the config file, logging, heartbeats, metrics, running, stopping."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import zmq.asyncio

from zdyn.roles.config import config_argv
from zdyn.rpc.hub import DEFAULT_MAX_PEERS
from zdyn.security import DEFAULT_KEYS_DIR, INSECURE_ENV, KEYS_DIR_ENV, SecuritySettings
from zdyn.transport import Liveness

LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(slots=True)
class CommonConfig:
    """Settings every role has."""

    log_level: str = "info"
    liveness: Liveness = field(default_factory=Liveness)
    security: SecuritySettings = field(default_factory=SecuritySettings)
    max_peers: int = DEFAULT_MAX_PEERS  # per hub
    drain_timeout_s: float = 30.0  # on SIGTERM: how long requests in flight may take to finish

    def __post_init__(self) -> None:
        if self.log_level not in LOG_LEVELS:
            raise ValueError(f"log level must be one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}")
        if self.max_peers < 1:
            raise ValueError(f"--max-peers must be >= 1, got {self.max_peers}")
        if self.drain_timeout_s < 0:
            raise ValueError(f"--drain-timeout must be >= 0, got {self.drain_timeout_s}")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> CommonConfig:
        return cls(
            log_level=str(getattr(args, "log_level", "info")).lower(),
            liveness=Liveness(args.heartbeat_interval, args.heartbeat_misses),
            security=SecuritySettings(args.keys_dir or None, args.insecure),
            max_peers=args.max_peers,
            drain_timeout_s=getattr(args, "drain_timeout", 30.0),
        )


def add_common_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("zdyn")
    group.add_argument("-f", "--config-file", help="YAML deployment config (Common + per-role sections)")
    if "--log-level" not in parser._option_string_actions:  # vLLM's parser has its own
        group.add_argument("--log-level", default="info", type=str.lower, choices=LOG_LEVELS)
    group.add_argument("--heartbeat-interval", type=float, default=1.0, help="seconds between heartbeats")
    group.add_argument(
        "--heartbeat-misses", type=int, default=3, help="missed heartbeats after which a peer is declared dead"
    )
    group.add_argument(
        "--keys-dir",
        default=os.environ.get(KEYS_DIR_ENV),
        help=f"the deployment's CURVE keys (`zdyn keys generate DIR`, e.g. {DEFAULT_KEYS_DIR}); every ZeroMQ "
        f"socket then authenticates and encrypts (default: ${KEYS_DIR_ENV})",
    )
    group.add_argument(
        "--insecure",
        action="store_true",
        default=os.environ.get(INSECURE_ENV, "") not in ("", "0"),
        help=f"allow listening on a non-loopback address without keys (default: ${INSECURE_ENV}=1)",
    )
    group.add_argument("--max-peers", type=int, default=DEFAULT_MAX_PEERS, help="registrations a hub accepts at most")
    group.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        help="on SIGTERM, seconds to finish the requests in flight (new ones go elsewhere) before handing the "
        "rest back to be moved; SIGINT stops at once",
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


def setup_logging(config: CommonConfig) -> None:
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def serve_metrics(port: int, *collectors: Any) -> None:
    """Prometheus metrics of a role without HTTP of its own, on ``port`` (all interfaces)."""
    from prometheus_client import REGISTRY, start_http_server

    for collector in collectors:
        REGISTRY.register(collector)
    start_http_server(port)


def on_stop_signals(stop: Callable[[], None], drain: Callable[[], Coroutine[Any, Any, Any]] | None = None) -> None:
    """SIGINT calls ``stop`` (it should only set an event; the role's own code then ends). SIGTERM runs
    ``drain`` (finish what is in flight, then stop) when the role has one, else ``stop``. A second signal
    stops at once."""
    loop = asyncio.get_running_loop()
    draining: list[asyncio.Task[Any]] = []

    def on_term() -> None:
        if drain is None or draining:
            stop()
        else:
            draining.append(loop.create_task(drain()))

    loop.add_signal_handler(signal.SIGINT, stop)
    loop.add_signal_handler(signal.SIGTERM, on_term)


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


class RoleConfig(Protocol):
    common: CommonConfig

    def key_role(self) -> str: ...  # whose keys this process holds (zdyn.security.ROLES)

    def binds(self) -> list[str]: ...  # the ZeroMQ endpoints it listens on


C = TypeVar("C", bound=RoleConfig)


def role_main(
    argv: list[str] | None,
    parser: argparse.ArgumentParser,
    sections: tuple[str, ...],
    make_config: Callable[[argparse.Namespace], C],
    serve: Callable[[C], Coroutine[Any, Any, int]],
) -> int:
    """A role's ``main``: flags (after the config file's ``sections``) -> typed config -> keys -> ``serve`` on
    uvloop. A setting that cannot work (also: listening beyond loopback without keys) is said on stderr with exit
    code 2, as argparse does."""
    args = parse_args(parser, argv, *sections)
    try:
        config = make_config(args)
        security = config.common.security
        warnings = security.check_binds(parser.prog, config.binds())
        security.install(zmq.asyncio.Context.instance(), config.key_role())
    except ValueError as e:  # KeysError too
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    setup_logging(config.common)
    for warning in warnings:
        logging.getLogger("zdyn.security").warning("%s", warning)
    if security.keys_dir:
        logging.getLogger("zdyn.security").info("CURVE keys from %s (as %s)", security.keys_dir, config.key_role())
    return run(serve(config))


class Service(Protocol):
    async def run(self) -> None: ...

    def close(self) -> None: ...


async def serve_behind_hub(
    service: Service, hub: Any, banner: str, drain_timeout_s: float = 30.0, directory: Any = None
) -> int:
    """Run a ``service`` whose peers register at ``hub`` until SIGINT or SIGTERM (which drains a service that
    has ``drain(timeout_s)``)."""
    drain = getattr(service, "drain", None)
    on_stop_signals(service.close, (lambda: drain(drain_timeout_s)) if drain is not None else None)
    await hub.start()
    if directory is not None:  # the hub's HubDirectory (discovery)
        directory.start()
    freeze_startup_objects()
    logging.getLogger(type(service).__module__).info("%s", banner)
    try:
        await service.run()
    finally:
        if directory is not None:
            await directory.close()
        await hub.close()
    return 0
