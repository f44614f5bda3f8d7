"""The OpenAI-compatible HTTP frontend (starlette)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, Protocol, TypeVar

import msgspec
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from zdyn.errors import RequestError
from zdyn.frontend.health import topology
from zdyn.frontend.http import (
    OPEN_PATHS,
    RETRY_AFTER_S,
    ApiKeys,
    ClientGone,
    HttpSettings,
    check_json_content_type,
    error_response,
    json_response,
    read_body,
)
from zdyn.frontend.metrics import Metrics, RequestMetrics, WorkerDisagg
from zdyn.frontend.openai import ParsedRequest, parse_request
from zdyn.frontend.responses import ResponseBuilder, error_body
from zdyn.protocol import Delta, TextRequest

log = logging.getLogger(__name__)
T = TypeVar("T")
_json = msgspec.json.Encoder()


class Backend(Protocol):
    """Where the frontend sends validated requests: an embedded processor or separate ones.

    ``process`` raises ``RequestError`` for a request it cannot serve; closing its iterator cancels the request.
    """

    def process(self, request_id: str, request: TextRequest) -> AsyncIterator[Delta]: ...

    def models(self) -> list[str]: ...

    def workers(self) -> list[dict[str, Any]]: ...


async def until_disconnect(receive: Receive, work: Coroutine[Any, Any, T]) -> T:
    """Run ``work``; if the client hangs up first, cancel it and raise ``ClientGone``.

    ``receive`` must have delivered the whole request body already: what it yields next is the disconnect.
    """
    task = asyncio.ensure_future(work)
    gone = False

    async def watch() -> None:
        nonlocal gone
        while (await receive())["type"] != "http.disconnect":
            pass
        gone = True
        task.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        return await task
    except asyncio.CancelledError:
        if gone:
            raise ClientGone from None
        raise  # cancelled by the server, not by the client
    finally:
        watcher.cancel()


class Reply:
    """The answer to one completion request over ASGI: a JSON body, or server-sent events."""

    JSON_HEADERS = [(b"content-type", b"application/json")]
    RETRY_HEADERS = [*JSON_HEADERS, (b"retry-after", RETRY_AFTER_S.encode())]  # 429 and 503: try again soon
    SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]

    def __init__(self, send: Send) -> None:
        self.send = send
        self.streaming = False
        self.done = False

    async def json(self, body: Any, status: int = 200) -> None:
        self.done = True
        headers = self.RETRY_HEADERS if status in (429, 503) else self.JSON_HEADERS
        await self.send({"type": "http.response.start", "status": status, "headers": headers})
        await self.send({"type": "http.response.body", "body": _json.encode(body)})

    async def start_events(self) -> None:
        self.streaming = True
        await self.send({"type": "http.response.start", "status": 200, "headers": self.SSE_HEADERS})

    async def event(self, body: Any) -> None:
        data = b"data: " + _json.encode(body) + b"\n\n"
        await self.send({"type": "http.response.body", "body": data, "more_body": True})

    async def end_events(self) -> None:
        self.done = True
        await self.send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})

    async def error(self, e: RequestError) -> None:
        """The error as the status and body of the response, or as its last event once streaming has begun."""
        if self.done:
            return
        body = error_body(e.message, e.type, e.status, e.param)
        if not self.streaming:
            await self.json(body, e.status)
            return
        await self.event(body)
        await self.end_events()


class Completion(Response):
    """Runs one validated request through the backend and answers it; a client that hangs up cancels it."""

    def __init__(self, frontend: Frontend, parsed: ParsedRequest, metrics: RequestMetrics) -> None:
        self.frontend = frontend
        self.parsed = parsed
        self.metrics = metrics
        self.status_code = 200

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request_id = uuid.uuid4().hex
        reply = Reply(send)
        deltas: AsyncIterator[Delta] | None = None
        try:
            deltas = self.frontend.backend.process(request_id, self.parsed.text)
            self.metrics.dispatched()
            await until_disconnect(receive, self._answer(request_id, deltas, reply))
        except ClientGone:
            self.metrics.finish("cancelled")
        except RequestError as e:  # raised by process() itself, before it returned an iterator
            await self._fail(e, reply)
        except Exception as e:
            await reply.error(self.frontend.bug(e, self.metrics))
        finally:
            self.metrics.finish("cancelled")  # the server shut down (does nothing if the request has finished)
            if deltas is not None and hasattr(deltas, "aclose"):
                await deltas.aclose()

    async def _answer(self, request_id: str, deltas: AsyncIterator[Delta], reply: Reply) -> None:
        try:
            await self._respond(ResponseBuilder(self.parsed, request_id), deltas, reply)
        except RequestError as e:
            await self._fail(e, reply)

    async def _respond(self, builder: ResponseBuilder, deltas: AsyncIterator[Delta], reply: Reply) -> None:
        first = await anext(deltas, None)
        if first is None:
            raise RequestError("the request ended without output", 502, "bad_gateway")
        self.metrics.output()
        if not self.parsed.stream:
            builder.add(first)
            async for delta in deltas:
                self.metrics.output()
                builder.add(delta)
            body = builder.response()
            await reply.json(body)
            self.metrics.finish("success", body["usage"])
            return
        await reply.start_events()
        for chunk in builder.chunks(first):
            await reply.event(chunk)
        async for delta in deltas:
            self.metrics.output()
            for chunk in builder.chunks(delta):
                await reply.event(chunk)
        usage = builder.usage_chunk()
        if self.parsed.include_usage:
            await reply.event(usage)
        await reply.end_events()
        self.metrics.finish("success", usage["usage"])

    async def _fail(self, e: RequestError, reply: Reply) -> None:
        self.metrics.finish(f"error_{e.status}")
        if e.status >= 500:
            log.warning("%s request failed (%d): %s", self.parsed.endpoint, e.status, e.message)
        await reply.error(e)


class Frontend:
    def __init__(self, backend: Backend, settings: HttpSettings | None = None) -> None:
        self.backend = backend
        self.settings = settings or HttpSettings()
        self.metrics = Metrics()
        self.metrics.registry.register(WorkerDisagg(backend.workers))  # decode workers' prefill decisions

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
        middleware = []
        if self.settings.api_keys:
            open_paths = frozenset() if self.settings.protect_health_and_metrics else OPEN_PATHS
            rejected = lambda path: self.metrics.rejected(path, 401)  # noqa: E731
            middleware.append(Middleware(ApiKeys, self.settings.api_keys, open_paths, rejected))
        handlers = {HTTPException: self.http_error, Exception: self.internal_error}
        return Starlette(
            routes=routes,
            middleware=middleware,
            exception_handlers=handlers,
            lifespan=lifespan,
        )

    def bug(self, exc: BaseException, metrics: RequestMetrics | None = None) -> RequestError:
        """A failure nobody foresaw: logged with its traceback, counted, and answered with a 500."""
        log.error("internal error", exc_info=exc)
        self.metrics.internal_errors.inc()
        if metrics is not None:
            metrics.finish("error_500")
        return RequestError(f"internal error: {type(exc).__name__}", 500, "internal_error")

    async def http_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return error_response(RequestError(message, exc.status_code, kind))

    async def internal_error(self, request: Request, exc: Exception) -> Response:
        return error_response(self.bug(exc))

    async def list_models(self, request: Request) -> Response:
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "zdyn"} for m in self.backend.models()]
        return json_response({"object": "list", "data": data})

    async def health(self, request: Request) -> Response:
        workers = self.backend.workers()
        self.metrics.live_workers.set(len(workers))
        processors: list[dict[str, Any]] = getattr(self.backend, "processors_view", list)()
        routers: list[dict[str, Any]] = getattr(self.backend, "routers", list)()
        more = topology(workers, processors, routers)
        if workers:
            return json_response({"status": "healthy", "workers": workers, **more})
        return json_response({"status": "unhealthy", "message": "no worker is live", "workers": [], **more}, 503)

    async def prometheus(self, request: Request) -> Response:
        self.metrics.live_workers.set(len(self.backend.workers()))
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def chat(self, request: Request) -> Response:
        return await self.serve(request, "chat")

    async def completions(self, request: Request) -> Response:
        return await self.serve(request, "completions")

    async def serve(self, request: Request, endpoint: str) -> Response:
        """Validate a completion request; the ``Completion`` response then runs it."""
        metrics = self.metrics.request(endpoint)
        try:
            check_json_content_type(request.headers)
            body = await read_body(request, self.settings.max_body_bytes)
            parsed = parse_request(endpoint, body, self.settings.max_json_depth)
            if parsed.model not in self.backend.models():
                raise RequestError(f"The model '{parsed.model}' does not exist.", 404, "not_found_error", "model")
        except RequestError as e:
            metrics.finish(f"error_{e.status}")
            return error_response(e)
        except ClientGone:
            metrics.finish("cancelled")
            return error_response(RequestError("client closed the request", 499, "client_closed_request"))
        except Exception as e:
            return error_response(self.bug(e, metrics))
        return Completion(self, parsed, metrics)
