"""One output sequence (a "choice") of a request, carried to its end across worker failures.

A failure that is not the request's fault (the worker died, was unreachable, is draining, or its engine
failed) does not fail the request: before the first token it is *retried* on another worker; after it, the
request *migrates*: the prompt plus the tokens generated so far go to another worker with the remaining
``max_tokens``, and the client's stream goes on with no token duplicated or missing. The detokenizer, the
stop-string state and the usage stay here, so the client cannot tell. Requests whose state lives in the
engine (guided decoding) are retried but never migrated.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator
from contextlib import aclosing
from dataclasses import dataclass, field

import msgspec
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from zdyn.detokenizer import Detokenizer
from zdyn.errors import RequestError, retryable, unavailable
from zdyn.protocol import Delta, Finish, Generate, SamplingParams
from zdyn.router.selector import Route
from zdyn.rpc import Peer
from zdyn.token_ids import TokenIds

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Resilience:
    """How hard a request is carried across failures."""

    migration_limit: int = 3  # re-issues of one choice (retries + migrations) before it fails
    worker_wait_s: float = 30.0  # how long a request waits for a worker when none is live

    def __post_init__(self) -> None:
        if self.migration_limit < 0 or self.worker_wait_s < 0:
            raise ValueError(f"migration limit and worker wait must be >= 0, got {self}")


@dataclass(slots=True)
class Reissues:
    """Requests re-issued to another peer, by kind (``retry`` before the first token, ``migration`` after)
    and cause (the failed peer's error type)."""

    counts: Counter[tuple[str, str]] = field(default_factory=Counter)

    def add(self, kind: str, cause: str) -> None:
        self.counts[(kind, cause)] += 1

    def total(self, kind: str) -> int:
        return sum(n for (k, _), n in self.counts.items() if k == kind)


class ReissueCollector(Collector):
    """``zdyn_reissued_requests_total{kind, cause}`` for Prometheus."""

    def __init__(self, reissues: Reissues, role: str) -> None:
        self.reissues = reissues
        self.role = role

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "zdyn_reissued_requests",
            "Requests re-issued after a peer failed: retry (before the first token) or migration (after)",
            labels=["role", "kind", "cause"],
        )
        for (kind, cause), n in sorted(self.reissues.counts.items()):
            family.add_metric([self.role, kind, cause], n)
        yield family


def movable(sampling: SamplingParams) -> bool:
    """Can a choice move to another worker mid-stream? Not when its state lives in the engine (guided
    decoding's grammar state); every other sampling setting is re-created from the tokens so far."""
    return sampling.structured is None


# (choice request id, prompt + tokens so far, sampling for the rest, peers to avoid) -> a worker and route
Choose = Callable[[str, TokenIds, set[str]], Awaitable[Route]]
Stream = Callable[[Peer, Generate], AsyncGenerator[Delta]]


@dataclass(slots=True)
class ChoiceSpec:
    request_id: str  # the id sent to workers (``rid`` or ``rid-i`` for n > 1)
    index: int
    prompt: TokenIds
    sampling: SamplingParams
    model: str
    detokenizer: Detokenizer
    movable: bool = True  # False: its state lives in the engine (guided decoding); retried, never migrated


class ChoiceRun:
    """Runs one choice to its end: ``async for delta in run.deltas(choose, stream)``."""

    def __init__(self, spec: ChoiceSpec, resilience: Resilience, reissues: Reissues) -> None:
        self.spec = spec
        self.resilience = resilience
        self.reissues = reissues
        self.generated: list[int] = []  # every token handed out, across workers
        self.cached = 0
        self.attempts = 0
        self.workers: list[str] = []

    def resume(self, token_ids: list[int]) -> None:
        """Continue a choice another processor started: the client already has these tokens' text."""
        self.spec.detokenizer.step(token_ids)  # releases exactly the text the first processor released
        self.generated = list(token_ids)

    async def deltas(self, choose: Choose, stream: Stream) -> AsyncGenerator[Delta]:
        avoid: set[str] = set()
        while True:
            route = await choose(self.spec.request_id, self.spec.prompt + self.generated, avoid)
            self.workers.append(route.peer.id)
            self.attempts += 1
            try:
                async for delta in self._attempt(route, stream):
                    yield delta
                return
            except RequestError as e:
                kind = "migration" if self.generated else "retry"
                if not retryable(e) or (kind == "migration" and not self.spec.movable):
                    raise
                if self.attempts > self.resilience.migration_limit:
                    raise unavailable(f"gave up after {self.attempts} attempt(s); last: {e.message}") from e
                self.reissues.add(kind, e.type)
                avoid.add(route.peer.id)
                log.warning("request %s: %s on %s after %d token(s): %s", self.spec.request_id, kind,
                            route.peer.id, len(self.generated), e.message)  # fmt: skip

    def _request(self, route: Route) -> Generate:
        spec, done = self.spec, len(self.generated)
        sampling = spec.sampling
        if done:
            sampling = msgspec.structs.replace(
                sampling, max_tokens=sampling.max_tokens - done, min_tokens=max(0, sampling.min_tokens - done)
            )
        return Generate(
            request_id=spec.request_id,
            token_ids=spec.prompt + self.generated,
            sampling=sampling,
            model=spec.model,
            overlap_blocks=route.overlap_blocks,
        )

    async def _attempt(self, route: Route, stream: Stream) -> AsyncGenerator[Delta]:
        spec, detok = self.spec, self.spec.detokenizer
        started, first = time.perf_counter(), not self.generated
        outcome = "cancelled"
        try:
            async with aclosing(stream(route.peer, self._request(route))) as deltas:
                async for delta in deltas:
                    out = self._convert(delta, first)
                    yield out
                    if out.finish is not None:
                        outcome = f"finish={out.finish.reason}"
                        return
            outcome = "stream ended without finish"
            raise RequestError(f"worker {route.peer.id} ended the stream without finishing", 502, "bad_gateway")
        except RequestError as e:
            outcome = f"failed: {e.message}"
            raise
        finally:
            log.info(
                "request %s: worker=%s (%s) prompt=%d cached=%d output=%d %s in %.3fs",
                spec.request_id, route.peer.id, route.reason, len(spec.prompt), self.cached,
                len(detok.token_ids), outcome, time.perf_counter() - started,
            )  # fmt: skip

    def _convert(self, delta: Delta, first: bool) -> Delta:
        """A worker's delta -> the client's: text, stop strings, the whole choice's usage."""
        spec, detok = self.spec, self.spec.detokenizer
        if first and delta.num_cached_tokens is not None:
            self.cached = delta.num_cached_tokens
        elif first and delta.finish is not None:
            self.cached = delta.finish.cached_tokens
        self.generated.extend(delta.token_ids)
        text = detok.step(delta.token_ids)
        finish = delta.finish
        if detok.stop is not None:
            finish = Finish(reason="stop", stop_reason=detok.stop)
        elif finish is not None:
            text += detok.finish()
        if finish is not None:  # usage of the whole choice, whichever workers produced it
            finish.prompt_tokens = len(spec.prompt)
            finish.completion_tokens = len(detok.token_ids)
            finish.cached_tokens = self.cached
        out = Delta(request_id=spec.request_id, index=spec.index, token_ids=delta.token_ids, text=text)
        out.finish, out.logprobs = finish, delta.logprobs
        return out
