"""Exceptions shared by roles: a failed request versus a dead engine."""

from __future__ import annotations

from zdyn.protocol import Error


class RequestError(Exception):
    """One request cannot be served; everything else keeps running.

    ``status`` follows HTTP (400 bad request, 404 unknown model, 429/503 no capacity, 500 a bug, 504 timeout),
    ``type`` is OpenAI's error type and ``param`` names the request field at fault, when one is. It crosses
    process boundaries as an ``Error`` message (``to_wire`` / ``from_wire``).
    """

    def __init__(
        self, message: str, status: int = 400, type: str = "invalid_request_error", param: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.param = param

    @classmethod
    def from_wire(cls, error: Error) -> RequestError:
        return cls(error.message, error.status, error.type, error.param)

    def to_wire(self, request_id: str) -> Error:
        return Error(request_id=request_id, message=self.message, status=self.status, type=self.type, param=self.param)


def unavailable(message: str) -> RequestError:
    """No capacity, or the peer serving the request is gone: the client may retry (503)."""
    return RequestError(message, 503, "unavailable")


# Error types of failures that are not the request's fault: the processor (or the frontend) re-issues such
# a request to another peer instead of failing it.
PEER_LOST = "peer_lost"  # the peer died, vanished or was unreachable
DRAINING = "draining"  # the peer is shutting down and handed the request back


def peer_lost(message: str) -> RequestError:
    return RequestError(message, 503, PEER_LOST)


def draining(message: str) -> RequestError:
    return RequestError(message, 503, DRAINING)


def retryable(error: RequestError) -> bool:
    """Would another peer serve this request? Yes unless the request itself is at fault (4xx)."""
    return error.status >= 500 or error.type in (PEER_LOST, DRAINING)


class EngineDeadError(Exception):
    """The engine stopped working; the worker must exit."""
