"""``zdyn router``: the KV-aware router as its own process, shared by every processor.

Workers register here as they do at a processor (add this router's ``--workers-endpoint`` to their
``--connect``), which tells the router their KV-event publishers and loads; processors ask over
``--endpoint`` with one ``RouteQuery`` per request (``--router-endpoint`` on the processor or frontend).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time

import zmq
import zmq.asyncio

from zdyn.cli import add_common_args, liveness, parse_args, run, serve_behind_hub, serve_metrics, setup_logging
from zdyn.protocol import RouteQuery, RouteReply, RouteUpdate
from zdyn.router.core import KvRouter
from zdyn.router.feed import WorkerFeed, router_from_args
from zdyn.routing import FINISHED, PREFILLED, add_policy_args
from zdyn.rpc import Hub
from zdyn.transport import READ_BATCH, MalformedCounter, decode_or_count, log_send_error, make_socket, send

log = logging.getLogger(__name__)
SUMMARY_INTERVAL_S = 10.0


class RouterService:
    """Answers ``RouteQuery``s at ``endpoint`` for the workers registered at ``workers``."""

    def __init__(self, endpoint: str, workers: Hub, router: KvRouter, ctx: zmq.asyncio.Context | None = None) -> None:
        self.endpoint = endpoint
        self.workers = workers
        self.router = router
        self.ctx = ctx or zmq.asyncio.Context.instance()
        self.feed = WorkerFeed(workers, router, self.ctx)
        self.malformed = MalformedCounter(f"router {endpoint}")
        self.decisions = 0
        self.no_decision = 0
        self.overlap_blocks = 0
        self._sock: zmq.asyncio.Socket | None = None
        self._stop = asyncio.Event()

    async def run(self) -> None:
        self._sock = make_socket(self.ctx, zmq.ROUTER, self.endpoint, bind=True)
        summary = asyncio.get_running_loop().create_task(self._summaries())
        reader = asyncio.get_running_loop().create_task(self._read())
        try:
            await self._stop.wait()
        finally:
            for task in (summary, reader):
                task.cancel()
            await asyncio.gather(summary, reader, return_exceptions=True)
            await self.feed.aclose()
            self._sock.close(linger=0)

    def close(self) -> None:
        self._stop.set()

    async def _read(self) -> None:
        assert self._sock is not None
        sock = self._sock
        while True:
            for _ in range(READ_BATCH):
                frames = await sock.recv_multipart()
                if len(frames) < 3:
                    self.malformed.drop(f"{len(frames)} frames")
                    continue
                msg = decode_or_count(frames[1:], self.malformed)
                if isinstance(msg, RouteQuery):
                    send(sock, self.answer(msg), frames[0]).add_done_callback(log_send_error)
                elif isinstance(msg, RouteUpdate):
                    self.update(msg)
                elif msg is not None:
                    self.malformed.drop(f"unexpected {type(msg).__name__}")
                if not sock.poll(0):
                    break
            await asyncio.sleep(0)

    def answer(self, query: RouteQuery) -> RouteReply:
        self.feed.refresh_loads()
        try:
            d = self.router.route(
                query.request_id, query.token_ids, query.candidates or None, now=time.monotonic(),
                lora_name=query.lora_name,
            )  # fmt: skip
        except LookupError as e:
            self.no_decision += 1
            return RouteReply(request_id=query.request_id, error=str(e))
        self.decisions += 1
        self.overlap_blocks += d.overlap_blocks
        log.debug("route %s -> %s (%s)", query.request_id, d.worker, d.reason)
        return RouteReply(
            request_id=query.request_id, worker=d.worker, overlap_blocks=d.overlap_blocks, reason=d.reason
        )

    def update(self, msg: RouteUpdate) -> None:
        if msg.event == PREFILLED:
            self.router.prefilled(msg.request_id)
        elif msg.event == FINISHED:
            self.router.finished(msg.request_id)
        else:
            self.malformed.drop(f"unknown route update {msg.event!r}")

    async def _summaries(self) -> None:
        last = 0
        while True:
            await asyncio.sleep(SUMMARY_INTERVAL_S)
            if self.decisions != last:
                routed = self.decisions - last
                last = self.decisions
                log.info(
                    "router: %d requests routed in %.0fs (mean overlap %.1f blocks); %d workers, %d blocks indexed",
                    routed, SUMMARY_INTERVAL_S, self.overlap_blocks / max(1, self.decisions), len(self.feed.peers),
                    self.router.indexer.num_blocks(),
                )  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zdyn router", description=__doc__)
    parser.add_argument("--endpoint", default="tcp://*:5570", help="where processors ask for routes")
    parser.add_argument("--workers-endpoint", default="tcp://*:5571", help="where workers register")
    add_policy_args(parser, default_mode="kv")
    parser.add_argument("--metrics-port", type=int, default=0, help="serve Prometheus metrics on this port")
    add_common_args(parser)
    return parser


async def serve(args: argparse.Namespace) -> int:
    workers = Hub(args.workers_endpoint, role="worker", liveness=liveness(args))
    service = RouterService(args.endpoint, workers, router_from_args(args))
    if args.metrics_port:
        from zdyn.router.metrics import RouterCollector

        serve_metrics(args.metrics_port, RouterCollector(service=service))
    banner = f"router ({args.router_mode}) answering at {args.endpoint}; workers register at {args.workers_endpoint}"
    return await serve_behind_hub(service, workers, banner)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv, "Router")
    setup_logging(args)
    return run(serve(args))


if __name__ == "__main__":
    raise SystemExit(main())
