"""Exceptions shared by roles: a failed request versus a dead engine."""

from __future__ import annotations


class RequestError(Exception):
    """One request cannot be served; everything else keeps running.

    ``status`` follows HTTP (400 bad request, 404 unknown model, 429/503 no capacity, 500 a bug, 504 timeout),
    ``type`` is OpenAI's error type and ``param`` names the request field at fault, when one is.
    """

    def __init__(
        self, message: str, status: int = 400, type: str = "invalid_request_error", param: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.param = param


class EngineDeadError(Exception):
    """The engine stopped working; the worker must exit."""
