"""``zdyn frontend``: the HTTP server with an embedded processor, or in front of separate processors."""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import uvicorn
from starlette.applications import Starlette

from zdyn.admission import Admission, AdmissionCollector, AdmissionConfig
from zdyn.choice import ReissueCollector, Resilience
from zdyn.frontend.app import Backend, Frontend
from zdyn.frontend.http import HttpSettings, MiB
from zdyn.frontend.remote import RemoteBackend
from zdyn.processor import Processor, accept_model
from zdyn.prompt_encoder import PromptEncoderCollector
from zdyn.protocol import Role
from zdyn.roles.common import CommonConfig, add_common_args, freeze_startup_objects, role_main
from zdyn.roles.discovery import DiscoveryConfig, add_discovery_args
from zdyn.roles.output_parsing import OutputParsingConfig, add_output_parsing_args
from zdyn.roles.ports import FRONTEND_BASE, add_port_base_arg, endpoint_or_base
from zdyn.roles.resilience import add_admission_args, add_resilience_args, admission_from_args, resilience_from_args
from zdyn.roles.routing import RoutingConfig, add_router_args, make_selector
from zdyn.router.selector import RoundRobin
from zdyn.rpc import Hub
from zdyn.rpc.metrics import RefusalCollector
from zdyn.security import is_local
from zdyn.transport import check_endpoint

log = logging.getLogger("zdyn.frontend")

API_KEY_ENV = "ZDYN_API_KEY"  # one key, or several separated by commas
KEEP_ALIVE_S = 75  # longer than clients' idle-connection pools (aiohttp 15 s), so they close first, not mid-request


@dataclass(slots=True)
class FrontendConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    model: str | None = None  # None: the embedded SmolLM2-135M-Instruct
    served_model_name: str | None = None
    tokenizer: str | None = None
    tiktoken: bool = True  # encode prompts with tiktoken's BPE where it is provably the model's tokenizer
    workers_endpoint: str = "tcp://*:5555"  # the embedded processor's hub
    processors_endpoint: str | None = None  # separate processors instead of an embedded one
    http: HttpSettings = field(default_factory=HttpSettings)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    resilience: Resilience = field(default_factory=Resilience)
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)
    discovery: DiscoveryConfig = field(default_factory=DiscoveryConfig)
    common: CommonConfig = field(default_factory=CommonConfig)
    output_parsing: OutputParsingConfig = field(default_factory=OutputParsingConfig)

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError(f"--port must be in [0, 65535], got {self.port}")
        check_endpoint(self.workers_endpoint)
        if self.processors_endpoint is not None:
            check_endpoint(self.processors_endpoint)

    def key_role(self) -> str:
        return "frontend"

    def binds(self) -> list[str]:
        return [self.processors_endpoint or self.workers_endpoint]

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> FrontendConfig:
        return cls(
            host=args.host,
            port=args.port,
            model=args.model,
            served_model_name=args.served_model_name,
            tokenizer=args.tokenizer,
            tiktoken=not args.no_tiktoken,
            workers_endpoint=endpoint_or_base(args.workers_endpoint, args.port_base),
            processors_endpoint=args.processors_endpoint,
            http=HttpSettings(
                api_keys=tuple(args.api_key or api_keys_from_env()),
                protect_health_and_metrics=args.protect_health_and_metrics,
                max_body_bytes=args.max_body_mib * MiB,
                max_json_depth=args.max_json_depth,
            ),
            routing=RoutingConfig.from_args(args),
            resilience=resilience_from_args(args),
            admission=admission_from_args(args),
            discovery=DiscoveryConfig.from_args(args),
            common=CommonConfig.from_args(args),
            output_parsing=OutputParsingConfig.from_args(args),
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zdyn frontend", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="HTTP host (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port")
    parser.add_argument("--model", help="model folder or HF id (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--served-model-name", help="name clients use (default: the model folder's name)")
    parser.add_argument("--tokenizer", help="tokenizer folder or id, if not the model's")
    parser.add_argument("--no-tiktoken", action="store_true",
                        help="encode prompts with the model's Rust tokenizer only (default: tiktoken's 4-7x faster "
                        "byte-level BPE where it gives the same ids, checked at start and on samples)")  # fmt: skip
    parser.add_argument(
        "--workers-endpoint", help="where the embedded processor's workers connect (default: tcp://*:PORT_BASE)"
    )
    add_port_base_arg(parser, FRONTEND_BASE, "the embedded processor's workers hub +0")
    parser.add_argument(
        "--processors-endpoint",
        help="run no embedded processor; separate `zdyn processor`s register here (e.g. tcp://*:5550)",
    )
    http = parser.add_argument_group("HTTP")
    http.add_argument(
        "--api-key",
        action="append",
        help=f"clients must send 'Authorization: Bearer KEY' (repeat for several keys; default: ${API_KEY_ENV}, "
        "comma-separated; none: no authentication)",
    )
    http.add_argument(
        "--protect-health-and-metrics", action="store_true", help="/health and /metrics need an API key too"
    )
    http.add_argument("--max-body-mib", type=int, default=16, help="larger request bodies get a 413")
    http.add_argument("--max-json-depth", type=int, default=64, help="more deeply nested JSON bodies get a 400")
    add_router_args(parser)
    add_resilience_args(parser)
    add_admission_args(parser)
    add_discovery_args(parser, hub=True)
    add_output_parsing_args(parser)
    add_common_args(parser)
    return parser


def api_keys_from_env() -> list[str]:
    return [key.strip() for key in os.environ.get(API_KEY_ENV, "").split(",") if key.strip()]


def listen(host: str, port: int) -> socket.socket:
    """The HTTP listening socket, bound before anything else starts so that a busy port is the first thing said."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise OSError(
                e.errno,
                f"port {port} on {host} is already in use: stop what holds it (`ss -ltnp 'sport = :{port}'` "
                "shows it) or choose another port with --port (ZDYN_PORT for the example scripts)",
            ) from None
        raise
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def build_backend(config: FrontendConfig) -> tuple[Backend, Hub, str]:
    """The backend the frontend serves through, the hub it needs started, and a line saying what it is."""
    if config.processors_endpoint:
        if config.output_parsing.tool_call_parser or config.output_parsing.reasoning_parser:
            log.warning("output parsers run in the processors: give --tool-call-parser/--reasoning-parser to them")
        hub = Hub(
            config.processors_endpoint, role=Role.PROCESSOR, liveness=config.common.liveness,
            max_peers=config.common.max_peers,
        )  # fmt: skip
        where = f"processors register at {config.processors_endpoint}"
        return RemoteBackend(hub, config.resilience), hub, where
    from zdyn.models import resolve_model, served_model_name

    model = resolve_model(config.model)
    name = config.served_model_name or served_model_name(model)
    hub = Hub(
        config.workers_endpoint, role=Role.WORKER, liveness=config.common.liveness, accept=accept_model(name),
        max_peers=config.common.max_peers,
    )  # fmt: skip
    selector = make_selector(config.routing, hub)
    admission = Admission(config.admission)
    processor = Processor(config.tokenizer or model, name, hub, selector, config.resilience, admission,
                          fast_tokenizer=config.tiktoken)  # fmt: skip
    processor.outputs = config.output_parsing.build(processor.tokenizer)
    return processor, hub, f"serving {name}; workers connect to {config.workers_endpoint}"


async def serve(config: FrontendConfig) -> int:
    try:
        sock = listen(config.host, config.port)
    except OSError as e:
        log.error("cannot start: %s", e.strerror or e)
        return 2
    try:
        backend, hub, where = build_backend(config)
    except ValueError as e:  # an output parser that does not fit the model
        log.error("cannot start: %s", e)
        sock.close()
        return 2
    # the embedded processor's workers hub tells its workers of the deployment's other hubs (discovery)
    directory = (
        config.discovery.hub_directory(hub, "frontend", backend.model) if isinstance(backend, Processor) else None
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await hub.start()
        if directory is not None:
            directory.start()
        freeze_startup_objects()
        auth = f"{len(config.http.api_keys)} API key(s)" if config.http.api_keys else "no API key"
        log.info("frontend serving on http://%s:%d (%s): %s", config.host, sock.getsockname()[1], auth, where)
        if not config.http.api_keys and not is_local(f"tcp://{config.host}:0"):
            log.warning("HTTP on %s without an API key: anyone who reaches it can use the model (--api-key)",
                        config.host)  # fmt: skip
        try:
            yield
        finally:
            if isinstance(backend, Processor):
                await backend.selector.aclose()
            if directory is not None:
                await directory.close()
            await hub.close()

    frontend = Frontend(backend, config.http)
    frontend.metrics.registry.register(RefusalCollector([hub]))  # READYs and CURVE keys kept out
    if isinstance(backend, Processor | RemoteBackend):  # requests re-issued after a peer failed
        frontend.metrics.registry.register(ReissueCollector(backend.reissues, "frontend"))
    if isinstance(backend, Processor):
        frontend.metrics.registry.register(AdmissionCollector(backend.admission, "frontend"))
        frontend.metrics.registry.register(PromptEncoderCollector(backend.encoder, "frontend"))
    if isinstance(backend, Processor) and not isinstance(backend.selector, RoundRobin):
        from zdyn.router.metrics import register

        register(frontend.metrics.registry, selector=backend.selector)
    uvicorn_config = uvicorn.Config(
        frontend.app(lifespan),
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=5,
        timeout_keep_alive=KEEP_ALIVE_S,
    )
    await uvicorn.Server(uvicorn_config).serve(sockets=[sock])
    return 0


def main(argv: list[str] | None = None) -> int:
    return role_main(argv, build_parser(), ("Frontend",), FrontendConfig.from_args, serve)


if __name__ == "__main__":
    raise SystemExit(main())
