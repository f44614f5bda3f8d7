"""The HTTP edge of the frontend: its settings, API keys, and a request body read within bounds."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

import msgspec
from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from zdyn.errors import RequestError
from zdyn.frontend.responses import error_body

_json = msgspec.json.Encoder()

MiB = 2**20
OPEN_PATHS = frozenset({"/health", "/metrics"})  # open without a key unless protect_health_and_metrics


@dataclass(frozen=True, slots=True)
class HttpSettings:
    """What the HTTP server accepts.

    ``api_keys``: clients must send ``Authorization: Bearer <one of them>`` (none: no authentication).
    ``protect_health_and_metrics``: ``/health`` and ``/metrics`` need a key too (open by default, as in vLLM).
    ``max_body_bytes``: a larger request body is refused with a 413 while it streams in.
    ``max_json_depth``: how deeply a body's JSON may nest (``{}`` is one level); deeper is a 400.
    """

    api_keys: tuple[str, ...] = ()
    protect_health_and_metrics: bool = False
    max_body_bytes: int = 16 * MiB
    max_json_depth: int = 64

    def __post_init__(self) -> None:
        object.__setattr__(self, "api_keys", tuple(self.api_keys))
        for key in self.api_keys:
            if not isinstance(key, str) or not key or key != key.strip() or " " in key:
                raise ValueError("an API key must be a non-empty string without spaces")
        if self.protect_health_and_metrics and not self.api_keys:
            raise ValueError("protect_health_and_metrics needs at least one API key")
        if self.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes must be at least 1024, got {self.max_body_bytes}")
        if not 2 <= self.max_json_depth <= 512:  # msgspec (and Python) stop near 1000 levels anyway
            raise ValueError(f"max_json_depth must be between 2 and 512, got {self.max_json_depth}")


def json_response(body: Any, status: int = 200) -> Response:
    return Response(_json.encode(body), status, media_type="application/json")


RETRY_AFTER_S = "1"  # seconds a client should wait after a 429 or 503 (no capacity right now)


def error_response(error: RequestError) -> Response:
    response = json_response(error_body(error.message, error.type, error.status, error.param), error.status)
    if error.status in (429, 503):
        response.headers["retry-after"] = RETRY_AFTER_S
    return response


class ClientGone(Exception):
    """The client hung up before its response was sent."""


def check_json_content_type(headers: Headers) -> None:
    """Refuse a body that is not declared JSON, as OpenAI and vLLM do (400)."""
    declared = headers.get("content-type")
    if declared is None:
        raise RequestError("missing Content-Type header: this endpoint accepts only 'application/json' bodies")
    if declared.split(";", 1)[0].strip().lower() != "application/json":
        raise RequestError(
            f"unsupported Content-Type '{declared}': this endpoint accepts only 'application/json' bodies"
        )


def too_large(limit: int) -> RequestError:
    return RequestError(f"the request body is larger than the server's limit of {limit} bytes", 413)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) as soon as it is known to exceed ``limit`` bytes: by its Content-Length
    header, or while it streams in, so that no more than ``limit`` bytes are ever held."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_large(limit)
    chunks: list[bytes] = []
    size = 0
    try:
        async with aclosing(request.stream()) as stream:
            async for chunk in stream:
                size += len(chunk)
                if size > limit:
                    raise too_large(limit)
                chunks.append(chunk)
    except ClientDisconnect:
        raise ClientGone from None
    return b"".join(chunks)


class ApiKeys:
    """ASGI middleware: a request without one of the API keys gets a 401 OpenAI-style error.

    Keys are compared as SHA-256 digests with ``secrets.compare_digest``, each of them every time, so that
    the time taken says nothing about how much of a key matched. CORS preflights (OPTIONS) pass.
    """

    def __init__(
        self,
        app: ASGIApp,
        keys: tuple[str, ...],
        open_paths: frozenset[str],
        rejected: Callable[[str], None],
    ) -> None:
        self.app = app
        self.digests = [hashlib.sha256(key.encode()).digest() for key in keys]
        self.open_paths = open_paths
        self.rejected = rejected

    def verify(self, headers: Headers) -> str | None:
        """None if the request carries a valid key, else why not."""
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return "missing API key: send it as the header 'Authorization: Bearer <key>'"
        digest = hashlib.sha256(token.strip().encode()).digest()
        if not any([secrets.compare_digest(digest, d) for d in self.digests]):
            return "incorrect API key provided"
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] == "OPTIONS" or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        problem = self.verify(Headers(scope=scope))
        if problem is None:
            await self.app(scope, receive, send)
            return
        self.rejected(scope["path"])
        response = error_response(RequestError(problem, 401, "invalid_request_error"))
        response.headers["www-authenticate"] = "Bearer"
        await response(scope, receive, send)
