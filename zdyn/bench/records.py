"""Shared vocabulary: what a dataset asks for and what the client measured."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True, frozen=True)
class Blocks:
    """A prompt made of trace blocks: equal ids stand for equal token blocks (Mooncake ``hash_ids``)."""

    hash_ids: tuple[int, ...]
    num_tokens: int
    block_size: int


@dataclass(slots=True, frozen=True)
class Synthetic:
    """``num_tokens`` synthetic tokens determined by ``key``."""

    key: tuple[int, ...]
    num_tokens: int


# Content of one message; the tokens and text are materialised only when the request is sent.
Content = list[int] | Blocks | Synthetic


@dataclass(slots=True)
class BenchRequest:
    """One request of a dataset.

    ``messages`` is the new content this request adds, as (role, content) pairs. Requests of a multi-turn
    ``session`` also resend the earlier turns, so they wait for the previous turn of their session.
    """

    index: int
    messages: list[tuple[str, Content]]
    prompt_len: int
    output_len: int
    arrival_s: float | None = None
    session: int | None = None
    turn: int = 0
    synthetic_answer: Content | None = None


@dataclass(slots=True)
class RequestRecord:
    """What the client measured for one request, in seconds; ``start``/``end`` are perf_counter values."""

    index: int
    success: bool = False
    error: str | None = None
    error_detail: str = ""
    status: int | None = None
    start: float = 0.0
    end: float = 0.0
    scheduled: float | None = None
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int | None = None
    num_chunks: int = 0
    text: str = ""

    @property
    def latency(self) -> float:
        return self.end - self.start

    def to_json(self, origin: float) -> dict[str, Any]:
        """Plain dict with times relative to ``origin`` (the run's start), text left out."""
        return {
            "index": self.index,
            "success": self.success,
            "error": self.error,
            "error_detail": self.error_detail,
            "status": self.status,
            "start_s": self.start - origin,
            "end_s": self.end - origin,
            "scheduled_s": None if self.scheduled is None else self.scheduled - origin,
            "ttft_s": self.ttft,
            "latency_s": self.latency,
            "itl_s": self.itl,
            "prompt_tokens": self.prompt_tokens,
            "output_tokens": self.output_tokens,
            "cached_tokens": self.cached_tokens,
            "num_chunks": self.num_chunks,
        }
