"""Worker choice: router-tracked in-flight load, and the policy that weighs prefix overlap against load."""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from zdyn.router.selector import Random, RoundRobin

MODES = ("kv", "kv-load", "round-robin", "random")


@dataclass(slots=True)
class WorkerState:
    """What the router knows about a worker: capacity from READY, load from its heartbeats."""

    worker: str
    num_kv_blocks: int = 0
    max_num_seqs: int = 0  # 0: unknown
    num_running: int = 0
    num_waiting: int = 0
    kv_usage: float = 0.0  # fraction of KV blocks in use, 0..1


@dataclass(slots=True)
class Decision:
    worker: str
    overlap_blocks: int
    cost: float
    reason: str


@dataclass(slots=True)
class _Request:
    worker: str
    new_blocks: int
    started: float
    prefilling: bool = True


class ActiveRequests:
    """Load the router itself has sent to each worker and not yet seen finish.

    A request counts its new blocks (prompt blocks minus those the worker had cached), as pending prefill until
    ``prefilled`` and as held blocks until ``finish``. Counting only new blocks approximates Dynamo's de-duplicated
    active blocks: requests sharing a cached prefix share its blocks.

    A request whose end the router never hears of (its processor died) would count as load for good, so
    ``expire`` drops requests started before a given time.
    """

    def __init__(self) -> None:
        self._requests: dict[str, _Request] = {}
        self._prefill: dict[str, int] = {}
        self._decode: dict[str, int] = {}
        self._count: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._requests)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._requests

    def add(self, request_id: str, worker: str, prompt_blocks: int, overlap_blocks: int, now: float = 0.0) -> None:
        """Track a request just sent to ``worker`` at ``now`` (an id already tracked is finished first)."""
        self.finish(request_id)
        new_blocks = max(prompt_blocks - overlap_blocks, 0)
        self._requests[request_id] = _Request(worker, new_blocks, now)
        self._prefill[worker] = self._prefill.get(worker, 0) + new_blocks
        self._decode[worker] = self._decode.get(worker, 0) + new_blocks
        self._count[worker] = self._count.get(worker, 0) + 1

    def prefilled(self, request_id: str) -> None:
        """The request's prefill is done (first token seen): it no longer counts as pending prefill."""
        req = self._requests.get(request_id)
        if req is not None and req.prefilling:
            req.prefilling = False
            self._prefill[req.worker] -= req.new_blocks

    def finish(self, request_id: str) -> None:
        """Stop tracking the request; unknown or already finished ids are ignored."""
        req = self._requests.pop(request_id, None)
        if req is None:
            return
        if req.prefilling:
            self._prefill[req.worker] -= req.new_blocks
        self._decode[req.worker] -= req.new_blocks
        self._count[req.worker] -= 1

    def expire(self, started_before: float) -> int:
        """Stop tracking requests started before ``started_before``; how many there were. The oldest come first
        (``add`` appends), so this looks at no request that stays."""
        stale = [r for r, _ in itertools.takewhile(lambda i: i[1].started < started_before, self._requests.items())]
        for request_id in stale:
            self.finish(request_id)
        return len(stale)

    def remove_worker(self, worker: str) -> None:
        for request_id in [r for r, req in self._requests.items() if req.worker == worker]:
            del self._requests[request_id]
        for table in (self._prefill, self._decode, self._count):
            table.pop(worker, None)

    def prefill_blocks(self, worker: str) -> int:
        return self._prefill.get(worker, 0)

    def decode_blocks(self, worker: str) -> int:
        return self._decode.get(worker, 0)

    def num_requests(self, worker: str) -> int:
        return self._count.get(worker, 0)


class RoutingPolicy:
    """Picks a worker for a request. Modes: kv (prefix overlap against router-tracked load), kv-load (kv, plus
    the load workers publish), and round-robin and random (``selector``'s, for comparisons in one topology).

    kv cost, lower is better (Dynamo's form)::

        overlap_weight * (new_blocks + pending_prefill_blocks) + held_blocks + new_blocks

    where ``new_blocks = request_blocks - overlap`` are the blocks the worker would have to compute and hold.
    kv-load also weighs the load the worker publishes: ``held_blocks = max(tracked, kv_usage * num_kv_blocks)``
    and ``pending_prefill_blocks = max(tracked, num_waiting * request_blocks)``. A worker at capacity (tracked
    requests >= max_num_seqs) is picked only when every candidate is.
    """

    def __init__(
        self, mode: str = "kv", overlap_weight: float = 1.0, temperature: float = 0.0, seed: int | None = None
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown routing mode {mode!r}; choose one of {', '.join(MODES)}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        self.mode = mode
        self.overlap_weight = overlap_weight
        self.temperature = temperature
        self._rng = random.Random(seed)
        self._simple = RoundRobin() if mode == "round-robin" else Random(seed) if mode == "random" else None

    def choose(
        self,
        candidates: Sequence[WorkerState],
        overlaps: Mapping[str, int],
        request_blocks: int,
        active: ActiveRequests,
    ) -> Decision:
        if not candidates:
            raise LookupError("no candidate workers to route to")
        pool = self._below_capacity(candidates, active)
        note = "" if len(pool) == len(candidates) else f", {len(candidates) - len(pool)} at capacity skipped"
        if not pool:
            pool, note = list(candidates), ", all at capacity"
        if self._simple is not None:  # the same choice a processor makes without a router
            state = self._simple.pick(pool)
            return Decision(state.worker, overlaps.get(state.worker, 0), 0.0, f"{self.mode}{note}")
        costs = self._costs(pool, overlaps, request_blocks, active)
        i, how = self._argmin(pool, costs, active) if self.temperature == 0 else self._sample(costs)
        worker = pool[i].worker
        overlap = overlaps.get(worker, 0)
        reason = f"{self.mode}: overlap {overlap}/{request_blocks} blocks, cost {costs[i]:.1f}{how}{note}"
        return Decision(worker, overlap, costs[i], reason)

    def _below_capacity(self, candidates: Sequence[WorkerState], active: ActiveRequests) -> list[WorkerState]:
        # Only a hard limit excludes a worker: a published waiting queue is priced in kv-load's cost instead (with
        # chunked prefill nearly every busy worker has one, and heartbeats make it up to a second old).
        count = active._count
        return [s for s in candidates if not 0 < s.max_num_seqs <= count.get(s.worker, 0)]

    def _costs(
        self, pool: Sequence[WorkerState], overlaps: Mapping[str, int], request_blocks: int, active: ActiveRequests
    ) -> list[float]:
        weight, kv_load = self.overlap_weight, self.mode == "kv-load"
        prefill_of, held_of = active._prefill, active._decode
        costs = []
        for s in pool:
            new_blocks = max(request_blocks - overlaps.get(s.worker, 0), 0)
            prefill: float = prefill_of.get(s.worker, 0)
            held: float = held_of.get(s.worker, 0)
            if kv_load:
                prefill = max(prefill, s.num_waiting * request_blocks)
                held = max(held, s.kv_usage * s.num_kv_blocks)
            costs.append(weight * (new_blocks + prefill) + held + new_blocks)
        return costs

    def _argmin(self, pool: Sequence[WorkerState], costs: list[float], active: ActiveRequests) -> tuple[int, str]:
        best = min(costs)
        tied = [i for i, c in enumerate(costs) if c - best <= 1e-9 * max(1.0, abs(best))]
        if len(tied) == 1:
            return tied[0], ""
        # Ties go to the least busy, then at random: always taking the first would make a hot spot.
        fewest = min(active.num_requests(pool[i].worker) for i in tied)
        tied = [i for i in tied if active.num_requests(pool[i].worker) == fewest]
        return self._rng.choice(tied), (f", tie of {len(tied)}" if len(tied) > 1 else "")

    def _sample(self, costs: list[float]) -> tuple[int, str]:
        """Softmax over costs scaled to [0, 1]: the cheapest has weight 1, the dearest exp(-1/temperature)."""
        lo, hi = min(costs), max(costs)
        span = hi - lo or 1.0
        weights = [math.exp(-(c - lo) / span / self.temperature) for c in costs]
        return self._rng.choices(range(len(costs)), weights)[0], f", sampled at temperature {self.temperature:g}"
