"""KvBlockState: the cache a publisher's events describe, and a snapshot that rebuilds it for a late reader."""

import random

from zdyn.kv_events import KvAllCleared, KvBlockRemoved, KvBlockStored, KvEventBatch
from zdyn.kv_state import KvBlockState
from zdyn.router.indexer import KvIndexer

BS = 4


def stored(hashes: list[int], parent: int | None, medium: str | None = "GPU", extra=None) -> KvBlockStored:
    tokens = [t for h in hashes for t in range(h * 10, h * 10 + BS)]
    return KvBlockStored(block_hashes=hashes, parent_hash=parent, token_ids=tokens, block_size=BS, medium=medium,
                         extra_keys=extra)  # fmt: skip


def blocks(events) -> dict[int, tuple[int | None, list[int]]]:
    state = KvBlockState()
    state.apply(events)
    return {h: (b.parent, b.tokens) for (h, _), b in state._blocks.items()}


def test_stores_removes_and_clears_set_what_is_cached():
    state = KvBlockState()
    state.apply([stored([1, 2, 3], None), stored([4], 3), KvBlockRemoved(block_hashes=[2])])
    assert blocks(state.snapshot()) == {1: (None, [10, 11, 12, 13]), 3: (2, [30, 31, 32, 33]), 4: (3, [40, 41, 42, 43])}
    state.apply([KvAllCleared(), stored([7], None)])
    assert len(state) == 1


def test_a_snapshot_groups_chains_and_keeps_every_field():
    state = KvBlockState()
    state.apply([stored([1, 2], None, extra=[None, "img"]), stored([3], 2), stored([9], None, medium="CPU")])
    clear, chain, other = state.snapshot()
    assert isinstance(clear, KvAllCleared)
    assert chain.block_hashes == [1, 2, 3] and chain.parent_hash is None and chain.extra_keys == [None, "img", None]
    assert chain.token_ids == [10, 11, 12, 13, 20, 21, 22, 23, 30, 31, 32, 33]
    assert other.block_hashes == [9] and other.medium == "CPU"


def test_a_full_state_forgets_its_oldest_and_counts_them():
    state = KvBlockState(max_blocks=3)
    state.apply([stored([1, 2, 3, 4, 5], None)])
    assert len(state) == 3 and state.num_forgotten == 2


def test_snapshot_then_any_suffix_of_the_history_gives_the_index_of_the_whole_history():
    rng = random.Random(7)
    history, live = [], set()
    for _ in range(400):
        roll = rng.random()
        if roll < 0.6:
            h = rng.randrange(1, 60)
            parent = rng.choice(sorted(live)) if live and rng.random() < 0.7 else None
            history.append(stored([h], parent))
            live.add(h)
        elif roll < 0.97 and live:
            h = rng.choice(sorted(live))
            history.append(KvBlockRemoved(block_hashes=[h], medium="GPU"))
            live.discard(h)
        else:
            history.append(KvAllCleared())
            live.clear()
    state = KvBlockState()
    state.apply(history)
    whole = KvIndexer(BS)
    whole.apply_batch("w", KvEventBatch(seq=0, ts=0.0, events=history))
    for cut in (0, 100, 399):
        late = KvIndexer(BS)
        late.apply_batch("w", KvEventBatch(seq=0, ts=0.0, events=state.snapshot() + history[cut:]))
        assert late._masks == whole._masks
