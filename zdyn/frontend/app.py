"""The OpenAI-compatible HTTP frontend (starlette)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol, TypeVar

import msgspec
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from zdyn.errors import RequestError
from zdyn.frontend.metrics import Metrics
from zdyn.frontend.openai import ParsedRequest, ResponseBuilder, error_body, parse_request
from zdyn.protocol import Delta, TextRequest

log = logging.getLogger(__name__)
T = TypeVar("T")
_json = msgspec.json.Encoder()


class Backend(Protocol):
    """Where the frontend sends validated requests: an embedded processor or separate ones."""

    def process(self, request_id: str, request: TextRequest) -> AsyncIterator[Delta]: ...

    def models(self) -> list[str]: ...

    def workers(self) -> list[dict[str, Any]]: ...


class ClientGone(Exception):
    pass


class EventStream(Response):
    """Server-sent events from an async iterator; a client that hangs up cancels the iteration.

    Leaner than starlette's StreamingResponse (no anyio task group per response): one watcher task waits
    for ``http.disconnect`` and cancels the sending task, whose iterator's cleanup then aborts the request.
    """

    media_type = "text/event-stream"
    HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]

    def __init__(self, chunks: AsyncIterator[bytes]) -> None:
        self.status_code = 200
        self.raw_headers = list(self.HEADERS)
        self.chunks = chunks

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        sender = asyncio.current_task()
        assert sender is not None

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            sender.cancel()

        watcher = asyncio.ensure_future(watch())
        try:
            async for chunk in self.chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not watcher.done():
                raise  # cancelled by the server, not by the client
        finally:
            watcher.cancel()
            await self.chunks.aclose()  # type: ignore[attr-defined]


def json_response(body: Any, status: int = 200) -> Response:
    return Response(_json.encode(body), status, media_type="application/json")


def error_response(status: int, message: str, type: str, param: str | None = None) -> Response:
    return json_response(error_body(message, type, status, param), status)


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``, cancelling it if the client hangs up first."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        task.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        return await task
    except asyncio.CancelledError:
        if watcher.done():
            raise ClientGone from None
        raise
    finally:
        watcher.cancel()


class Frontend:
    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.metrics = Metrics()

    def app(
        self, lifespan: Callable[[Starlette], contextlib.AbstractAsyncContextManager[None]] | None = None
    ) -> Starlette:
        routes = [
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/models", self.list_models, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", self.prometheus, methods=["GET"]),
        ]
        handlers = {HTTPException: self.http_error, Exception: self.internal_error}
        return Starlette(routes=routes, exception_handlers=handlers, lifespan=lifespan)  # type: ignore[arg-type]

    async def http_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", kind)

    async def internal_error(self, request: Request, exc: Exception) -> Response:
        log.exception("unexpected error serving %s", request.url.path, exc_info=exc)
        return error_response(500, f"internal error: {type(exc).__name__}", "internal_error")

    async def list_models(self, request: Request) -> Response:
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "zdyn"} for m in self.backend.models()]
        return json_response({"object": "list", "data": data})

    async def health(self, request: Request) -> Response:
        workers = self.backend.workers()
        self.metrics.live_workers.set(len(workers))
        if workers:
            return json_response({"status": "healthy", "workers": workers})
        return json_response({"status": "unhealthy", "message": "no worker is live", "workers": []}, 503)

    async def prometheus(self, request: Request) -> Response:
        self.metrics.live_workers.set(len(self.backend.workers()))
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def chat(self, request: Request) -> Response:
        return await self.serve(request, "chat")

    async def completions(self, request: Request) -> Response:
        return await self.serve(request, "completions")

    async def serve(self, request: Request, endpoint: str) -> Response:
        started = time.perf_counter()
        try:
            body = msgspec.json.decode(await request.body())
        except msgspec.DecodeError as e:
            return self._fail(endpoint, 400, f"invalid JSON body: {e}", "invalid_request_error")
        try:
            parsed = parse_request(endpoint, body)
        except RequestError as e:
            return self._fail(endpoint, e.status, e.message, e.type, e.param)
        if parsed.model not in self.backend.models():
            return self._fail(endpoint, 404, f"The model '{parsed.model}' does not exist.", "not_found_error", "model")
        request_id = uuid.uuid4().hex
        deltas = self.backend.process(request_id, parsed.text)
        self.metrics.in_flight.inc()
        try:
            first = await until_disconnect(request, anext(deltas))
        except (RequestError, ClientGone, StopAsyncIteration) as e:
            self.metrics.in_flight.dec()
            await deltas.aclose()
            if isinstance(e, RequestError):
                return self._fail(endpoint, e.status, e.message, e.type)
            if isinstance(e, ClientGone):
                return self._fail(endpoint, 499, "client closed the request", "client_closed_request")
            return self._fail(endpoint, 502, "the request ended without output", "bad_gateway")
        self.metrics.ttft.observe(time.perf_counter() - started)
        if parsed.stream:
            return EventStream(self._stream(parsed, request_id, first, deltas, started))
        try:
            result = await until_disconnect(request, self._collect(parsed, request_id, first, deltas))
        except (RequestError, ClientGone) as e:
            if isinstance(e, RequestError):
                return self._fail(endpoint, e.status, e.message, e.type)
            return self._fail(endpoint, 499, "client closed the request", "client_closed_request")
        finally:
            self.metrics.in_flight.dec()
            await deltas.aclose()
        self._succeed(endpoint, result["usage"], started)
        return json_response(result)

    async def _collect(
        self, parsed: ParsedRequest, request_id: str, first: Delta, deltas: AsyncIterator[Delta]
    ) -> dict[str, Any]:
        builder = ResponseBuilder(parsed, request_id)
        builder.add(first)
        last = time.perf_counter()
        async for delta in deltas:
            now = time.perf_counter()
            self.metrics.itl.observe(now - last)
            last = now
            builder.add(delta)
        return builder.response()

    async def _stream(
        self,
        parsed: ParsedRequest,
        request_id: str,
        first: Delta,
        deltas: AsyncIterator[Delta],
        started: float,
    ) -> AsyncIterator[bytes]:
        builder = ResponseBuilder(parsed, request_id)
        status = "cancelled"
        try:
            for chunk in builder.chunks(first):
                yield b"data: " + _json.encode(chunk) + b"\n\n"
            last = time.perf_counter()
            async for delta in deltas:
                now = time.perf_counter()
                self.metrics.itl.observe(now - last)
                last = now
                for chunk in builder.chunks(delta):
                    yield b"data: " + _json.encode(chunk) + b"\n\n"
            if parsed.include_usage:
                yield b"data: " + _json.encode(builder.usage_chunk()) + b"\n\n"
            yield b"data: [DONE]\n\n"
            status = "success"
        except RequestError as e:
            status = f"error_{e.status}"
            yield b"data: " + _json.encode(error_body(e.message, e.type, e.status)) + b"\n\n"
            yield b"data: [DONE]\n\n"
        finally:
            self.metrics.in_flight.dec()
            await deltas.aclose()
            if status == "success":
                self._succeed(parsed.endpoint, builder.usage_chunk()["usage"], started)
            else:
                self.metrics.requests.labels(parsed.endpoint, status).inc()

    def _succeed(self, endpoint: str, usage: dict[str, Any], started: float) -> None:
        self.metrics.requests.labels(endpoint, "success").inc()
        self.metrics.e2e.observe(time.perf_counter() - started)
        self.metrics.prompt_tokens.inc(usage["prompt_tokens"])
        self.metrics.output_tokens.inc(usage["completion_tokens"])
        self.metrics.cached_tokens.inc(usage["prompt_tokens_details"]["cached_tokens"])

    def _fail(self, endpoint: str, status: int, message: str, type: str, param: str | None = None) -> Response:
        self.metrics.requests.labels(endpoint, f"error_{status}").inc()
        if status >= 500:
            log.warning("%s request failed (%d): %s", endpoint, status, message)
        return error_response(status, message, type, param)
