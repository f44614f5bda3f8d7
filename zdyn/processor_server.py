"""``zdyn processor``: a processor in its own process, between the frontend and the workers."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
from collections.abc import AsyncIterator

from zdyn.cli import add_common_args, freeze_startup_objects, liveness, parse_args, run, setup_logging
from zdyn.errors import RequestError
from zdyn.processor import Processor, accept_model
from zdyn.protocol import Delta, Heartbeat, Process, Ready
from zdyn.routing import add_router_args, make_selector
from zdyn.rpc import Hub, RefusedError, Request, Spoke

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zdyn processor", description=__doc__)
    parser.add_argument("--frontend", default="tcp://127.0.0.1:5550", help="the frontend's processors endpoint")
    parser.add_argument("--workers-endpoint", default="tcp://*:5556", help="where this processor's workers connect")
    parser.add_argument("--model", help="model folder or HF id (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--served-model-name", help="name clients use (default: the model folder's name)")
    parser.add_argument("--tokenizer", help="tokenizer folder or id, if not the model's")
    add_router_args(parser)
    parser.add_argument("--processor-id", default=f"processor-{socket.gethostname()}-{os.getpid()}")
    add_common_args(parser)
    return parser


async def serve(args: argparse.Namespace) -> int:
    from zdyn.models import resolve_model, served_model_name

    model = resolve_model(args.model)
    name = args.served_model_name or served_model_name(model)
    workers = Hub(args.workers_endpoint, role="worker", liveness=liveness(args), accept=accept_model(name))
    processor = Processor(args.tokenizer or model, name, workers, make_selector(args, workers))

    def handle(request: Request) -> AsyncIterator[Delta]:
        if not isinstance(request, Process):
            raise RequestError("a processor serves Process requests, not token-level Generate", 400)
        return processor.process(request.request_id, request.request)

    def load() -> Heartbeat:
        return Heartbeat(num_running=spoke.num_requests, worker_ids=[p.id for p in workers.live_peers()])

    ready = Ready(peer_id=args.processor_id, role="processor", model=name)
    spoke = Spoke([args.frontend], ready, handle, load=load, liveness=liveness(args))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, spoke.close)
    await workers.start()
    freeze_startup_objects()
    log.info("processor %s serving %s: frontend %s, workers at %s", args.processor_id, name, args.frontend,
             args.workers_endpoint)  # fmt: skip
    try:
        await spoke.run()
    except RefusedError as e:
        log.error("%s", e)
        return 2
    finally:
        await processor.selector.aclose()
        await workers.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv, "Processor")
    setup_logging(args)
    return run(serve(args))


if __name__ == "__main__":
    raise SystemExit(main())
