"""Which worker holds which KV blocks, from the workers' KV events; prefix overlap of a request per worker.

Every worker gets a bit; every router hash (``hashing.hash_blocks``) maps to an int bitmask of the workers that hold
the block. The overlap walk over a request's chained hashes is then ``active &= mask`` per block. Per worker the
index keeps ``engine hash -> router hash``, which resolves a BlockRemoved and a BlockStored's parent.
"""

from __future__ import annotations

import heapq
import itertools
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from zdyn.kv_events import MEDIUM_GPU, KvAllCleared, KvBlockRemoved, KvBlockStored, KvEvent, KvEventBatch
from zdyn.router.hashing import hash_blocks


@dataclass(slots=True, eq=False)
class _Worker:
    name: str
    bit: int
    blocks: dict[int, int] = field(default_factory=dict)  # engine hash -> router hash
    # Router hashes that more than one engine hash maps to (e.g. same tokens under another cache salt): the
    # number of extra engine hashes. The worker keeps its bit until the last of them is removed.
    extra: dict[int, int] = field(default_factory=dict)
    num_extra: int = 0
    predicted: dict[int, float] = field(default_factory=dict)  # router hash -> expiry; never also a real block


class KvIndexer:
    """Index of the blocks workers hold, fed by ``apply``; answers ``overlaps``. No IO, not thread-safe.

    Bad events are never raised: they are counted in ``stats`` and skipped. Only GPU-tier blocks are indexed
    (``medium`` "GPU" or unset); offload-tier events are counted as ``other_medium``. ``block_size`` 0 (not known)
    counts every BlockStored as ``block_size_mismatch``.
    """

    def __init__(self, block_size: int) -> None:
        if block_size < 0:
            raise ValueError(f"block_size must be >= 0, got {block_size}")
        self.block_size = block_size
        self.stats: Counter[str] = Counter()
        self._masks: dict[int, int] = {}  # router hash -> bitmask of workers holding it (real or predicted)
        self._workers: dict[str, _Worker] = {}
        self._by_bit: dict[int, _Worker] = {}
        self._free_bits: list[int] = []  # heap: reuse the lowest free bit so masks stay small
        self._next_bit = 0
        self._expiry: list[tuple[float, int, _Worker, list[int]]] = []  # heap of predictions by expiry
        self._tiebreak = itertools.count()

    @property
    def workers(self) -> list[str]:
        return list(self._workers)

    @property
    def num_hashes(self) -> int:
        """Distinct router hashes held by any worker (real or predicted)."""
        return len(self._masks)

    def num_blocks(self, worker: str | None = None) -> int:
        """Distinct blocks a worker holds (all workers summed when None); predictions not included."""
        if worker is None:
            return sum(len(w.blocks) - w.num_extra for w in self._workers.values())
        w = self._workers.get(worker)
        return 0 if w is None else len(w.blocks) - w.num_extra

    def add_worker(self, worker: str) -> None:
        self._worker(worker)

    def remove_worker(self, worker: str) -> None:
        """Forget the worker and free its bit."""
        w = self._workers.pop(worker, None)
        if w is None:
            return
        self._drop_entries(w)
        del self._by_bit[w.bit]
        heapq.heappush(self._free_bits, w.bit)

    def clear_worker(self, worker: str) -> None:
        """Drop the worker's blocks and predictions, keep the worker."""
        w = self._workers.get(worker)
        if w is not None:
            self._drop_entries(w)

    def apply_batch(self, worker: str, batch: KvEventBatch) -> None:
        if batch.num_skipped:
            self.stats["unknown_event_type"] += batch.num_skipped
        for event in batch.events:
            self.apply(worker, event)

    def apply(self, worker: str, event: KvEvent) -> None:
        w = self._worker(worker)
        if isinstance(event, KvBlockStored):
            self._store(w, event)
        elif isinstance(event, KvBlockRemoved):
            self._remove(w, event)
        elif isinstance(event, KvAllCleared):
            self._drop_entries(w)
            self.stats["events_applied"] += 1
        else:
            self.stats["unknown_event"] += 1

    def predict(self, worker: str, hashes: Sequence[int], now: float, ttl_s: float) -> None:
        """Pretend ``worker`` holds ``hashes`` until ``now + ttl_s`` unless a real BlockStored confirms them.

        Called right after routing, so that a burst of one prefix does not scatter before the worker's events
        arrive. Blocks the worker really holds are left alone; repeated predictions extend the expiry.
        """
        self._purge(now)
        w = self._worker(worker)
        expiry = now + ttl_s
        masks, bit, predicted = self._masks, 1 << w.bit, w.predicted
        added: list[int] = []
        for h in hashes:
            m = masks.get(h, 0)
            if not m & bit:
                masks[h] = m | bit
                predicted[h] = expiry
                added.append(h)
            elif predicted.get(h, expiry) < expiry:
                predicted[h] = expiry
                added.append(h)
        if added:
            heapq.heappush(self._expiry, (expiry, next(self._tiebreak), w, added))

    def overlaps(self, hashes: Sequence[int], now: float) -> dict[str, int]:
        """Per worker holding the first block: how many leading blocks of ``hashes`` it holds."""
        if self._expiry and self._expiry[0][0] <= now:
            self._purge(now)
        if not hashes:
            return {}
        get = self._masks.get
        active = get(hashes[0], 0)
        if not active:
            return {}
        scores: dict[str, int] = {}
        by_bit = self._by_bit
        depth = 1
        for i in range(1, len(hashes)):
            m = active & get(hashes[i], 0)
            if m != active:
                dropped = active ^ m
                while dropped:
                    low = dropped & -dropped
                    scores[by_bit[low.bit_length() - 1].name] = depth
                    dropped ^= low
                active = m
                if not active:
                    return scores
            depth += 1
        while active:
            low = active & -active
            scores[by_bit[low.bit_length() - 1].name] = depth
            active ^= low
        return scores

    def _worker(self, name: str) -> _Worker:
        w = self._workers.get(name)
        if w is None:
            if self._free_bits:
                bit = heapq.heappop(self._free_bits)
            else:
                bit, self._next_bit = self._next_bit, self._next_bit + 1
            w = self._workers[name] = self._by_bit[bit] = _Worker(name, bit)
        return w

    def _store(self, w: _Worker, event: KvBlockStored) -> None:
        stats = self.stats
        if event.medium not in (None, MEDIUM_GPU):
            stats["other_medium"] += 1
            return
        if event.block_size != self.block_size:
            stats["block_size_mismatch"] += 1
            return
        if len(event.token_ids) != len(event.block_hashes) * self.block_size:
            stats["token_count_mismatch"] += 1
            return
        parent = None
        if event.parent_hash is not None:
            parent = w.blocks.get(event.parent_hash)
            if parent is None:
                stats["unknown_parent"] += 1
                return
        try:
            router_hashes = hash_blocks(event.token_ids, self.block_size, event.lora_name, parent)
        except (TypeError, OverflowError):  # a token id that is not a uint32
            stats["bad_token_ids"] += 1
            return
        masks, blocks, bit = self._masks, w.blocks, 1 << w.bit
        num_stored = len(router_hashes)
        for engine_hash, h in zip(event.block_hashes, router_hashes, strict=True):
            old = blocks.get(engine_hash)
            if old is not None:
                if old == h:
                    num_stored -= 1
                    stats["duplicate_stored"] += 1
                    continue
                self._release(w, old)  # the engine reused a hash for other tokens: the old block is gone
            blocks[engine_hash] = h
            m = masks.get(h, 0)
            if not m & bit:
                masks[h] = m | bit
            elif w.predicted.pop(h, None) is None:  # a real duplicate, not a confirmed prediction
                w.extra[h] = w.extra.get(h, 0) + 1
                w.num_extra += 1
        stats["blocks_stored"] += num_stored
        stats["events_applied"] += 1

    def _remove(self, w: _Worker, event: KvBlockRemoved) -> None:
        if event.medium not in (None, MEDIUM_GPU):
            self.stats["other_medium"] += 1
            return
        blocks = w.blocks
        removed = 0
        for engine_hash in event.block_hashes:
            h = blocks.pop(engine_hash, None)
            if h is None:
                self.stats["unknown_block_removed"] += 1
            else:
                self._release(w, h)
                removed += 1
        self.stats["blocks_removed"] += removed
        self.stats["events_applied"] += 1

    def _release(self, w: _Worker, h: int) -> None:
        """One engine hash of ``w`` mapping to router hash ``h`` is gone."""
        n = w.extra.get(h)
        if n:
            w.num_extra -= 1
            if n == 1:
                del w.extra[h]
            else:
                w.extra[h] = n - 1
            return
        self._clear_bit(h, 1 << w.bit)

    def _clear_bit(self, h: int, bit: int) -> None:
        m = self._masks.get(h, 0) & ~bit
        if m:
            self._masks[h] = m
        else:
            self._masks.pop(h, None)

    def _drop_entries(self, w: _Worker) -> None:
        bit = 1 << w.bit
        for h in {*w.blocks.values(), *w.predicted}:
            self._clear_bit(h, bit)
        w.blocks.clear()
        w.extra.clear()
        w.num_extra = 0
        w.predicted.clear()

    def _purge(self, now: float) -> None:
        """Expire predictions due by ``now`` (lazily: a heap entry whose expiry was extended is skipped)."""
        heap = self._expiry
        while heap and heap[0][0] <= now:
            expiry, _, w, hashes = heapq.heappop(heap)
            predicted, bit = w.predicted, 1 << w.bit
            for h in hashes:
                if predicted.get(h) == expiry:
                    del predicted[h]
                    self._clear_bit(h, bit)
