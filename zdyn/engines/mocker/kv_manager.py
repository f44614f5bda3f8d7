"""Paged KV-cache block accounting with prefix caching, as vLLM's block pool does it (no tensors)."""

from __future__ import annotations

from array import array
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import xxhash

from zdyn.kv_events import KvAllCleared, KvBlockRemoved, KvBlockStored, KvEvent

ROOT_HASH_SEED = 0x7A64796E  # "zdyn": every mocker hashes identical tokens identically, like vLLM >= 0.32
KV_CACHE_SPEC_KIND = "full_attention"


def hash_block(parent: int | None, token_ids: Sequence[int]) -> int:
    """Chained 64-bit hash of one full block: xxh3_64(parent as 8 LE bytes + tokens as u32 LE)."""
    return _hash_bytes(parent, array("I", token_ids).tobytes())


def _hash_bytes(parent: int | None, block: bytes) -> int:
    prefix = b"" if parent is None else parent.to_bytes(8, "little")
    return _xxh3(prefix + block, ROOT_HASH_SEED)


_xxh3 = xxhash.xxh3_64_intdigest


@dataclass(slots=True)
class _Table:
    """The blocks of one request, in token order."""

    block_ids: list[int] = field(default_factory=list)
    hashes: list[int] = field(default_factory=list)  # chained hashes of the full blocks of the tokens seen so far
    num_cached_blocks: int = 0  # leading blocks already registered in the cache (or skipped as duplicates)
    pending_hits: list[int] = field(default_factory=list)  # prefix-hit block ids found but not yet referenced


class KvBlockManager:
    """Fixed pool of ``num_blocks`` blocks of ``block_size`` tokens.

    A block is free (no content), active (ref count > 0), or cached-inactive (ref 0, still holding a full
    hashed block; kept in an LRU and reusable by a later request until evicted). Newly cached full blocks
    produce ``KvBlockStored`` events and evictions ``KvBlockRemoved``; collect them with ``take_events``.
    """

    def __init__(self, num_blocks: int, block_size: int, *, enable_prefix_caching: bool = True) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks ({num_blocks}) and block_size ({block_size}) must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref = [0] * num_blocks
        self._hash: list[int | None] = [None] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._inactive: OrderedDict[int, None] = OrderedDict()  # oldest (first evicted) first
        self._by_hash: dict[int, int] = {}
        self._tables: dict[str, _Table] = {}
        self._events: list[KvEvent] = []
        self.num_active_blocks = 0

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation can take: empty ones plus evictable cached ones."""
        return len(self._free) + len(self._inactive)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._by_hash)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by requests (vLLM's kv_cache_usage)."""
        return self.num_active_blocks / self.num_blocks

    def blocks_of(self, request_id: str) -> list[int]:
        table = self._tables.get(request_id)
        return list(table.block_ids) if table else []

    def ref_count(self, block_id: int) -> int:
        return self._ref[block_id]

    def is_cached(self, block_hash: int) -> bool:
        return block_hash in self._by_hash

    def match_prefix(self, request_id: str, token_ids: Sequence[int]) -> int:
        """Find the request's longest cached prefix; returns its length in tokens.

        The hits are remembered and taken by the next ``allocate``. At least one token is always left to
        compute, because the engine needs a forward pass to produce the next token.
        """
        table = self._tables.setdefault(request_id, _Table())
        if table.block_ids:
            raise RuntimeError(f"request {request_id} already holds blocks")
        table.pending_hits = []
        if not self.enable_prefix_caching:
            return 0
        self._extend_hashes(table, token_ids)
        max_blocks = (len(token_ids) - 1) // self.block_size
        for block_hash in table.hashes[:max_blocks]:
            block_id = self._by_hash.get(block_hash)
            if block_id is None:
                break
            table.pending_hits.append(block_id)
        return len(table.pending_hits) * self.block_size

    def allocate(
        self, request_id: str, token_ids: Sequence[int], num_tokens: int, *, reserve: int = 0, cache: bool = True
    ) -> bool:
        """Make the request hold blocks for its first ``num_tokens`` tokens and cache those that are full.

        Fails without changing anything when fewer than ``reserve`` blocks would stay free afterwards. With
        ``cache=False`` the blocks are not cached yet (their KV is still arriving); a later call caches them.
        """
        table = self._tables.setdefault(request_id, _Table())
        hits = table.pending_hits
        num_held = len(table.block_ids) + len(hits)
        num_new = max(0, -(-num_tokens // self.block_size) - num_held)
        num_hits_inactive = sum(1 for b in hits if self._ref[b] == 0)
        if num_new > self.num_free_blocks - num_hits_inactive - reserve:
            return False
        for block_id in hits:
            self._take(block_id)
        table.block_ids.extend(hits)
        table.num_cached_blocks = max(table.num_cached_blocks, len(hits))
        table.pending_hits = []
        for _ in range(num_new):
            table.block_ids.append(self._pop_free_block())
        if cache and self.enable_prefix_caching:
            self._cache_full_blocks(table, token_ids, min(num_tokens, len(token_ids)))
        return True

    def free(self, request_id: str) -> None:
        """Release a request's blocks; full cached ones stay reusable until evicted."""
        table = self._tables.pop(request_id, None)
        if table is None:
            return
        # Tail blocks first, so they are evicted before the shared prefix (as vLLM does).
        for block_id in reversed(table.block_ids):
            self._ref[block_id] -= 1
            if self._ref[block_id] == 0:
                self.num_active_blocks -= 1
                if self._hash[block_id] is None:
                    self._free.append(block_id)
                else:
                    self._inactive[block_id] = None

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block; only possible while no request holds blocks (like vLLM)."""
        if self.num_active_blocks:
            return False
        for block_id in self._inactive:
            self._hash[block_id] = None
            self._free.append(block_id)
        self._inactive.clear()
        self._by_hash.clear()
        if self.enable_prefix_caching:
            self._events.append(KvAllCleared())
        return True

    def take_events(self) -> list[KvEvent]:
        events, self._events = self._events, []
        return events

    def _extend_hashes(self, table: _Table, token_ids: Sequence[int], num_tokens: int | None = None) -> None:
        size = self.block_size
        end = len(token_ids) if num_tokens is None else min(num_tokens, len(token_ids))
        first, end = len(table.hashes) * size, end - end % size
        if end <= first:
            return
        # The new full blocks as bytes at once (a copy of a packed array's slice; one conversion of a list), then
        # one xxh3 call per block: no per-block array.
        if isinstance(token_ids, array) and token_ids.itemsize == 4:
            data = token_ids[first:end].tobytes()
        else:
            data = array("I", token_ids[first:end]).tobytes()
        parent = table.hashes[-1] if table.hashes else None
        append, step = table.hashes.append, size * 4
        for start in range(0, len(data), step):
            parent = _hash_bytes(parent, data[start : start + step])
            append(parent)

    def _cache_full_blocks(self, table: _Table, token_ids: Sequence[int], num_tokens: int) -> None:
        num_full = min(num_tokens // self.block_size, len(table.block_ids))
        if num_full <= table.num_cached_blocks:
            return
        self._extend_hashes(table, token_ids, num_full * self.block_size)
        run: list[int] = []  # consecutive block indices stored in one event, as vLLM groups them
        for index in range(table.num_cached_blocks, num_full):
            block_hash = table.hashes[index]
            if block_hash in self._by_hash:
                # Another request computed the same block first: keep this copy unhashed and unannounced.
                self._flush_run(table, token_ids, run)
                run = []
                continue
            block_id = table.block_ids[index]
            self._hash[block_id] = block_hash
            self._by_hash[block_hash] = block_id
            run.append(index)
        self._flush_run(table, token_ids, run)
        table.num_cached_blocks = num_full

    def _flush_run(self, table: _Table, token_ids: Sequence[int], run: list[int]) -> None:
        if not run:
            return
        first, size = run[0], self.block_size
        tokens = token_ids[first * size : (run[-1] + 1) * size]
        self._events.append(
            KvBlockStored(
                # a run is consecutive block indices: one slice, not a lookup per block
                block_hashes=table.hashes[first : run[-1] + 1],
                parent_hash=table.hashes[first - 1] if first > 0 else None,
                token_ids=tokens.tolist() if isinstance(tokens, array) else list(tokens),
                block_size=size,
                extra_keys=[None] * len(run),
                group_idx=0,
                kv_cache_spec_kind=KV_CACHE_SPEC_KIND,
            )
        )

    def _take(self, block_id: int) -> None:
        if self._ref[block_id] == 0:
            self._inactive.pop(block_id, None)
            self.num_active_blocks += 1
        self._ref[block_id] += 1

    def _pop_free_block(self) -> int:
        if self._free:
            block_id = self._free.popleft()
        else:
            block_id, _ = self._inactive.popitem(last=False)
            evicted = self._hash[block_id]
            assert evicted is not None
            del self._by_hash[evicted]
            self._hash[block_id] = None
            self._events.append(KvBlockRemoved([evicted], group_idx=0))
        self._ref[block_id] = 1
        self.num_active_blocks += 1
        return block_id
