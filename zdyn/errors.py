"""Exceptions shared by roles: a failed request versus a dead engine."""

from __future__ import annotations


class RequestError(Exception):
    """One request cannot be served; everything else keeps running. ``status`` follows HTTP."""

    def __init__(self, message: str, status: int = 400, type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type


class EngineDeadError(Exception):
    """The engine stopped working; the worker must exit."""
