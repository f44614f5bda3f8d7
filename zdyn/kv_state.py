"""What a worker holds in its KV cache, as its own events tell it: the start of a late or restarted reader.

A publisher's replay buffer keeps its last N batches (10,000 engine steps: a minute or two under load). A router
that starts later than that (a new router joining a running fleet, or one restarted an hour in) would see only
the blocks stored recently and route blind for the rest. So each zdyn publisher also applies every batch it sends
to a ``KvBlockState``, and a replay that reaches back beyond its buffer begins with ``snapshot()``: one batch of
AllBlocksCleared and then the blocks cached now, in the order they were stored (a parent before its children).
zguide's Clone pattern: a snapshot, then the updates. The buffered batches that follow may repeat what the
snapshot holds; replaying a suffix of the history on top of the state it led to leaves that state unchanged
(store, remove and clear each set a block's presence), so the reader ends exactly where the publisher is.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from zdyn.kv_events import KvAllCleared, KvBlockRemoved, KvBlockStored, KvEvent

MAX_BLOCKS = 1 << 21  # far more than an engine's cache holds; past it the oldest are forgotten (and counted)


@dataclass(slots=True)
class _Block:
    parent: int | None
    tokens: list[int]
    extra: Any
    shape: tuple[Any, ...]  # the fields a BlockStored event shares among its blocks


def _shape(event: KvBlockStored) -> tuple[Any, ...]:
    return (event.block_size, event.lora_id, event.medium, event.lora_name, event.group_idx,
            event.kv_cache_spec_kind, event.kv_cache_spec_sliding_window)  # fmt: skip


class KvBlockState:
    """The blocks one publisher's events say are cached, keyed by (hash, medium), oldest first."""

    def __init__(self, max_blocks: int = MAX_BLOCKS) -> None:
        self.max_blocks = max_blocks
        self.num_forgotten = 0  # blocks dropped because the state was full (it then under-reports, never lies)
        self._blocks: dict[tuple[int, str | None], _Block] = {}

    def __len__(self) -> int:
        return len(self._blocks)

    def apply(self, events: Iterable[KvEvent]) -> None:
        blocks = self._blocks
        for event in events:
            if isinstance(event, KvBlockStored):
                shape, size = _shape(event), event.block_size
                parent = event.parent_hash
                for i, h in enumerate(event.block_hashes):
                    extra = event.extra_keys[i] if event.extra_keys is not None else None
                    key = (h, event.medium)
                    blocks.pop(key, None)  # stored again: now the newest
                    blocks[key] = _Block(parent, event.token_ids[i * size : (i + 1) * size], extra, shape)
                    parent = h
                while len(blocks) > self.max_blocks:
                    del blocks[next(iter(blocks))]
                    self.num_forgotten += 1
            elif isinstance(event, KvBlockRemoved):
                for h in event.block_hashes:
                    blocks.pop((h, event.medium), None)
            elif isinstance(event, KvAllCleared):
                blocks.clear()

    def snapshot(self) -> list[KvEvent]:
        """AllBlocksCleared, then BlockStored events for every cached block; a run of blocks that each continue
        the previous one (same shape) is one event."""
        events: list[KvEvent] = [KvAllCleared()]
        run: KvBlockStored | None = None
        run_shape: tuple[Any, ...] = ()
        for (h, _), block in self._blocks.items():
            if run is not None and block.parent == run.block_hashes[-1] and block.shape == run_shape:
                run.block_hashes.append(h)
                run.token_ids.extend(block.tokens)
                if run.extra_keys is not None or block.extra is not None:
                    run.extra_keys = (run.extra_keys or [None] * (len(run.block_hashes) - 1)) + [block.extra]
                continue
            size, lora_id, medium, lora_name, group_idx, kind, window = block.shape
            run = KvBlockStored(
                block_hashes=[h], parent_hash=block.parent, token_ids=list(block.tokens), block_size=size,
                lora_id=lora_id, medium=medium, lora_name=lora_name,
                extra_keys=None if block.extra is None else [block.extra], group_idx=group_idx,
                kv_cache_spec_kind=kind, kv_cache_spec_sliding_window=window,
            )  # fmt: skip
            run_shape = block.shape
            events.append(run)
        return events
