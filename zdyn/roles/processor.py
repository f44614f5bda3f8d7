"""``zdyn processor``: a processor in its own process, between the frontend and the workers."""

from __future__ import annotations

import argparse
import logging
import os
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from zdyn.admission import Admission, AdmissionCollector, AdmissionConfig
from zdyn.choice import ReissueCollector, Resilience
from zdyn.errors import RequestError
from zdyn.processor import Processor, accept_model
from zdyn.prompt_encoder import PromptEncoderCollector
from zdyn.protocol import Delta, Heartbeat, Process, Ready, Role
from zdyn.roles.common import (
    CommonConfig,
    add_common_args,
    freeze_startup_objects,
    on_stop_signals,
    role_main,
    serve_metrics,
)
from zdyn.roles.discovery import DiscoveryConfig, add_discovery_args
from zdyn.roles.output_parsing import OutputParsingConfig, add_output_parsing_args
from zdyn.roles.ports import PROCESSOR_BASE, add_port_base_arg, endpoint_or_base
from zdyn.roles.resilience import add_admission_args, add_resilience_args, admission_from_args, resilience_from_args
from zdyn.roles.routing import RoutingConfig, add_router_args, make_selector
from zdyn.rpc import Hub, RefusedError, Request, Spoke
from zdyn.rpc.metrics import RefusalCollector
from zdyn.transport import check_endpoint, host_towards

log = logging.getLogger("zdyn.processor")


@dataclass(slots=True)
class ProcessorConfig:
    frontend: str = "tcp://127.0.0.1:5550"  # the frontend's processors endpoint
    workers_endpoint: str = "tcp://*:5556"
    model: str | None = None
    served_model_name: str | None = None
    tokenizer: str | None = None
    tiktoken: bool = True  # encode prompts with tiktoken's BPE where it is provably the model's tokenizer
    metrics_port: int = 0  # Prometheus metrics (re-issued requests, admission) on this port; 0 = none
    processor_id: str = field(default_factory=lambda: f"processor-{socket.gethostname()}-{os.getpid()}")
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    resilience: Resilience = field(default_factory=Resilience)
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)
    discovery: DiscoveryConfig = field(default_factory=DiscoveryConfig)
    common: CommonConfig = field(default_factory=CommonConfig)
    output_parsing: OutputParsingConfig = field(default_factory=OutputParsingConfig)

    def __post_init__(self) -> None:
        check_endpoint(self.frontend)
        check_endpoint(self.workers_endpoint)
        if not self.processor_id:
            raise ValueError("--processor-id must not be empty")

    def key_role(self) -> str:
        return "processor"

    def binds(self) -> list[str]:
        return [self.workers_endpoint]

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ProcessorConfig:
        return cls(
            frontend=args.frontend,
            workers_endpoint=endpoint_or_base(args.workers_endpoint, args.port_base),
            model=args.model,
            served_model_name=args.served_model_name,
            tokenizer=args.tokenizer,
            tiktoken=not args.no_tiktoken,
            metrics_port=args.metrics_port,
            processor_id=args.processor_id or f"processor-{socket.gethostname()}-{os.getpid()}",
            routing=RoutingConfig.from_args(args),
            resilience=resilience_from_args(args),
            admission=admission_from_args(args),
            discovery=DiscoveryConfig.from_args(args),
            common=CommonConfig.from_args(args),
            output_parsing=OutputParsingConfig.from_args(args),
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zdyn processor", description=__doc__)
    parser.add_argument("--frontend", default="tcp://127.0.0.1:5550", help="the frontend's processors endpoint")
    parser.add_argument(
        "--workers-endpoint", help="where this processor's workers connect (default: tcp://*:PORT_BASE)"
    )
    add_port_base_arg(parser, PROCESSOR_BASE, "the workers hub +0")
    parser.add_argument("--model", help="model folder or HF id (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--served-model-name", help="name clients use (default: the model folder's name)")
    parser.add_argument("--tokenizer", help="tokenizer folder or id, if not the model's")
    parser.add_argument("--no-tiktoken", action="store_true",
                        help="encode prompts with the model's Rust tokenizer only (default: tiktoken's 4-7x faster "
                        "byte-level BPE where it gives the same ids, checked at start and on samples)")  # fmt: skip
    add_router_args(parser)
    parser.add_argument("--metrics-port", type=int, default=0, help="serve Prometheus metrics on this port")
    parser.add_argument("--processor-id", help="unique id (default: processor-<host>-<pid>)")
    add_resilience_args(parser)
    add_admission_args(parser)
    add_discovery_args(parser, hub=True)
    add_output_parsing_args(parser)
    add_common_args(parser)
    return parser


async def serve(config: ProcessorConfig) -> int:
    from zdyn.models import resolve_model, served_model_name

    model = resolve_model(config.model)
    name = config.served_model_name or served_model_name(model)
    liveness = config.common.liveness
    workers = Hub(
        config.workers_endpoint, role=Role.WORKER, liveness=liveness, accept=accept_model(name),
        max_peers=config.common.max_peers,
    )  # fmt: skip
    selector = make_selector(config.routing, workers)
    admission = Admission(config.admission)
    processor = Processor(config.tokenizer or model, name, workers, selector, config.resilience, admission,
                          fast_tokenizer=config.tiktoken)  # fmt: skip
    try:
        processor.outputs = config.output_parsing.build(processor.tokenizer)
    except ValueError as e:  # an output parser that does not fit the model
        log.error("cannot start: %s", e)
        return 2
    if config.metrics_port:
        serve_metrics(
            config.metrics_port,
            ReissueCollector(processor.reissues, "processor"),
            AdmissionCollector(admission, "processor"),
            PromptEncoderCollector(processor.encoder, "processor"),
            RefusalCollector([workers]),
        )

    def handle(request: Request) -> AsyncIterator[Delta]:
        if not isinstance(request, Process):
            raise RequestError("a processor serves Process requests, not token-level Generate")
        return processor.process(request.request_id, request.request, request.resume)

    def load() -> Heartbeat:
        peers = workers.live_peers()
        client = getattr(processor.selector, "client", None)  # a separate router's
        return Heartbeat(
            num_running=spoke.num_requests,
            worker_ids=[p.id for p in peers],
            worker_hosts=[p.ready.host for p in peers],
            router=client.status if client is not None else "",
        )

    ready = Ready(peer_id=config.processor_id, role=Role.PROCESSOR, model=name, host=host_towards(config.frontend))
    spoke = Spoke([config.frontend], ready, handle, load=load, liveness=liveness)
    on_stop_signals(spoke.close, lambda: spoke.drain(config.common.drain_timeout_s))
    directory = config.discovery.hub_directory(workers, "processor", name)
    await workers.start()
    if directory is not None:
        directory.start()
    freeze_startup_objects()
    log.info("processor %s serving %s: frontend %s, workers at %s", config.processor_id, name, config.frontend,
             config.workers_endpoint)  # fmt: skip
    try:
        await spoke.run()
    except RefusedError as e:
        log.error("%s", e)
        return 2
    finally:
        await processor.selector.aclose()
        if directory is not None:
            await directory.close()
        await workers.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    return role_main(argv, build_parser(), ("Processor",), ProcessorConfig.from_args, serve)


if __name__ == "__main__":
    raise SystemExit(main())
