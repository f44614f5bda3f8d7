"""``zdyn frontend``: the HTTP server with an embedded processor, or in front of separate processors."""

from __future__ import annotations

import argparse
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import anyio
import uvicorn
from starlette.applications import Starlette

from zdyn.cli import add_common_args, freeze_startup_objects, liveness, parse_args, run, setup_logging
from zdyn.errors import RequestError
from zdyn.frontend.app import Frontend
from zdyn.processor import Processor, accept_model
from zdyn.protocol import Delta, Process, TextRequest
from zdyn.routing import RoundRobin, add_router_args, make_selector
from zdyn.rpc import Hub, RequestFailed

log = logging.getLogger(__name__)


KEEP_ALIVE_S = 75  # longer than clients' idle-connection pools (aiohttp 15 s), so they close first, not mid-request


class LocalBackend:
    """The processor runs in this process; workers register at its hub."""

    def __init__(self, processor: Processor) -> None:
        self.processor = processor

    def process(self, request_id: str, request: TextRequest) -> AsyncIterator[Delta]:
        return self.processor.process(request_id, request)

    def models(self) -> list[str]:
        return [self.processor.model]

    def workers(self) -> list[dict[str, Any]]:
        return [
            {
                "id": p.id,
                "model": p.ready.model,
                "engine": p.ready.engine,
                "running": p.load.num_running,
                "waiting": p.load.num_waiting,
                "kv_usage": round(p.load.kv_usage, 4),
                "in_flight": p.num_inflight,
            }
            for p in self.processor.workers.live_peers()
        ]


class RemoteBackend:
    """Separate processors register at this hub; requests go to them round-robin."""

    def __init__(self, processors: Hub) -> None:
        self.processors = processors
        self.selector = RoundRobin()

    async def process(self, request_id: str, request: TextRequest) -> AsyncIterator[Delta]:
        peers = [p for p in self.processors.live_peers() if p.load.worker_ids]
        if not peers:
            raise RequestError("no processor with a live worker is registered", 503, "unavailable")
        peer = (await self.selector.select(request_id, [], peers)).peer
        try:
            async for delta in self.processors.stream(peer, Process(request_id=request_id, request=request)):
                yield delta
        except RequestFailed as e:
            raise RequestError(e.error.message, e.error.status, e.error.type) from e

    def models(self) -> list[str]:
        return sorted({p.ready.model for p in self.processors.live_peers()})

    def workers(self) -> list[dict[str, Any]]:
        """Each live worker once, with the processors that reach it (a worker may serve several)."""
        seen: dict[str, dict[str, Any]] = {}
        for p in self.processors.live_peers():
            for worker in p.load.worker_ids:
                entry = seen.setdefault(worker, {"id": worker, "model": p.ready.model, "processors": []})
                entry["processors"].append(p.id)
        return list(seen.values())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zdyn frontend", description=__doc__)
    parser.add_argument("--host", default="0.0.0.0", help="HTTP host")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port")
    parser.add_argument("--model", help="model folder or HF id (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--served-model-name", help="name clients use (default: the model folder's name)")
    parser.add_argument("--tokenizer", help="tokenizer folder or id, if not the model's")
    parser.add_argument(
        "--workers-endpoint", default="tcp://*:5555", help="where the embedded processor's workers connect"
    )
    parser.add_argument(
        "--processors-endpoint",
        help="run no embedded processor; separate `zdyn processor`s register here (e.g. tcp://*:5550)",
    )
    add_router_args(parser)
    add_common_args(parser)
    return parser


async def serve(args: argparse.Namespace) -> None:
    from zdyn.models import resolve_model, served_model_name

    if args.processors_endpoint:
        hub = Hub(args.processors_endpoint, role="processor", liveness=liveness(args))
        backend: Any = RemoteBackend(hub)
        where = f"processors register at {args.processors_endpoint}"
    else:
        model = resolve_model(args.model)
        name = args.served_model_name or served_model_name(model)
        hub = Hub(args.workers_endpoint, role="worker", liveness=liveness(args), accept=accept_model(name))
        processor = Processor(args.tokenizer or model, name, hub, make_selector(args, hub))
        backend = LocalBackend(processor)
        where = f"serving {name}; workers connect to {args.workers_endpoint}"

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # Streaming responses use anyio task groups; anyio imports its backend lazily, which on the first
        # request blocked the event loop (and every stream) for seconds. Take that cost at start-up.
        async with anyio.create_task_group():
            pass
        await hub.start()
        freeze_startup_objects()
        log.info("frontend on http://%s:%d: %s", args.host, args.port, where)
        try:
            yield
        finally:
            if isinstance(backend, LocalBackend):
                await backend.processor.selector.aclose()
            await hub.close()

    frontend = Frontend(backend)
    if isinstance(backend, LocalBackend) and not isinstance(backend.processor.selector, RoundRobin):
        from zdyn.router.metrics import register

        register(frontend.metrics.registry, selector=backend.processor.selector)
    app = frontend.app(lifespan)
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=5,
        timeout_keep_alive=KEEP_ALIVE_S,
    )
    await uvicorn.Server(config).serve()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv, "Frontend")
    setup_logging(args)
    return run(serve(args))


if __name__ == "__main__":
    raise SystemExit(main())
