"""``KvRouter``: the KV-aware router as one object, for any pipeline that can feed it events and load."""

from __future__ import annotations

import time
from collections.abc import Sequence

from zdyn.kv_events import KvEventBatch
from zdyn.router.hashing import hash_blocks
from zdyn.router.indexer import KvIndexer
from zdyn.router.policy import ActiveRequests, Decision, RoutingPolicy, WorkerState

# A tracked request not finished after this is forgotten: its processor died or its updates were lost.
DEFAULT_REQUEST_TTL_S = 1800.0
DEFAULT_PREDICT_TTL_S = 10.0  # long enough for a queued prefill to finish and its BlockStored to arrive


class KvRouter:
    """Index + in-flight load + policy. Feed it workers, their KV events and load; ask it ``route``.

    ``block_size`` 0 means not known yet (``set_block_size`` once the first worker tells): until then requests
    are routed on load alone. Times (``now``) are ``time.monotonic()`` seconds unless the caller passes its own
    clock consistently.
    """

    def __init__(
        self,
        block_size: int,
        mode: str = "kv",
        overlap_weight: float = 1.0,
        temperature: float = 0.0,
        predict_ttl_s: float = DEFAULT_PREDICT_TTL_S,
        seed: int | None = None,
        request_ttl_s: float = DEFAULT_REQUEST_TTL_S,
    ) -> None:
        self.block_size = block_size
        self.predict_ttl_s = predict_ttl_s
        self.request_ttl_s = request_ttl_s
        self.expired_requests = 0  # tracked requests forgotten after request_ttl_s
        self.indexer = KvIndexer(block_size)
        self.active = ActiveRequests()
        self.policy = RoutingPolicy(mode, overlap_weight, temperature, seed)
        self.states: dict[str, WorkerState] = {}

    @property
    def workers(self) -> list[str]:
        return list(self.states)

    def set_block_size(self, block_size: int) -> None:
        """Change the block size; the index starts empty (meant for startup, before events arrive)."""
        if block_size != self.block_size:
            self.block_size = block_size
            self.indexer = KvIndexer(block_size)
            for worker in self.states:
                self.indexer.add_worker(worker)

    def add_worker(self, state: WorkerState | str) -> None:
        """Make a worker routable (a known one gets the new state; its index entries stay)."""
        if isinstance(state, str):
            state = WorkerState(state)
        self.states[state.worker] = state
        self.indexer.add_worker(state.worker)

    def update_load(self, worker: str, num_running: int, num_waiting: int, kv_usage: float) -> bool:
        """Record a worker's published load; False (and ignored) for an unknown worker."""
        state = self.states.get(worker)
        if state is None:
            return False
        state.num_running, state.num_waiting, state.kv_usage = num_running, num_waiting, kv_usage
        return True

    def remove_worker(self, worker: str) -> None:
        self.states.pop(worker, None)
        self.indexer.remove_worker(worker)
        self.active.remove_worker(worker)

    def clear_worker(self, worker: str) -> None:
        """Drop the worker's index entries (its cache was reset or its events cannot be trusted)."""
        self.indexer.clear_worker(worker)

    def apply_events(self, worker: str, batch: KvEventBatch) -> None:
        """Apply a worker's event batch (in seq order; see ``sequence.SeqTracker``)."""
        self.indexer.apply_batch(worker, batch)

    def route(
        self,
        request_id: str,
        token_ids: Sequence[int],
        candidates: Sequence[str] | None = None,
        now: float | None = None,
        lora_name: str | None = None,
    ) -> Decision:
        """Choose a worker among ``candidates`` (all known workers when None) and start tracking the request."""
        if candidates is None:
            states = list(self.states.values())
        else:
            states = [self.states[c] for c in candidates if c in self.states]
        if not states:
            raise LookupError(f"no known worker to route to (candidates: {candidates!r}, known: {self.workers})")
        now = time.monotonic() if now is None else now
        if self.block_size:
            hashes = hash_blocks(token_ids, self.block_size, lora_name)
            overlaps = self.indexer.overlaps(hashes, now)
            request_blocks = -(-len(token_ids) // self.block_size)
        else:
            hashes, overlaps, request_blocks = [], {}, 0
        if self.request_ttl_s > 0:
            self.expired_requests += self.active.expire(now - self.request_ttl_s)
        decision = self.policy.choose(states, overlaps, request_blocks, self.active)
        self.active.add(request_id, decision.worker, request_blocks, decision.overlap_blocks, now)
        if self.predict_ttl_s > 0 and len(hashes) > decision.overlap_blocks:
            # The leading overlap is there already (really, or predicted by an earlier request).
            self.indexer.predict(decision.worker, hashes[decision.overlap_blocks :], now, self.predict_ttl_s)
        return decision

    def prefilled(self, request_id: str) -> None:
        self.active.prefilled(request_id)

    def finished(self, request_id: str) -> None:
        self.active.finish(request_id)
