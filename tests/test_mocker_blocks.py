from __future__ import annotations

import pytest

from zdyn.engines.mocker.kv_manager import KvBlockManager, hash_block
from zdyn.kv_events import KvAllCleared, KvBlockRemoved, KvBlockStored

BS = 16


def chain(tokens: list[int]) -> list[int]:
    hashes: list[int] = []
    for start in range(0, len(tokens) - BS + 1, BS):
        hashes.append(hash_block(hashes[-1] if hashes else None, tokens[start : start + BS]))
    return hashes


def admit(kv: KvBlockManager, rid: str, tokens: list[int], num_tokens: int | None = None) -> int:
    cached = kv.match_prefix(rid, tokens)
    assert kv.allocate(rid, tokens, len(tokens) if num_tokens is None else num_tokens)
    return cached


def test_hash_is_chained_and_deterministic() -> None:
    block = list(range(BS))
    assert hash_block(None, block) == hash_block(None, list(block))
    assert hash_block(None, block) != hash_block(1, block)
    assert hash_block(None, block) != hash_block(None, block[::-1])
    assert 0 <= hash_block(None, block) < 2**64


def test_allocation_caches_only_full_blocks() -> None:
    kv = KvBlockManager(num_blocks=10, block_size=BS)
    tokens = list(range(100))  # 6 full blocks + 4 tokens
    assert admit(kv, "a", tokens) == 0
    assert len(kv.blocks_of("a")) == 7
    assert kv.num_active_blocks == 7 and kv.usage == pytest.approx(0.7)
    assert kv.num_free_blocks == 3
    events = kv.take_events()
    assert events == [
        KvBlockStored(
            block_hashes=chain(tokens),
            parent_hash=None,
            token_ids=tokens[:96],
            block_size=BS,
            extra_keys=[None] * 6,
            group_idx=0,
            kv_cache_spec_kind="full_attention",
        )
    ]
    assert kv.take_events() == []


def test_decode_tokens_fill_blocks_and_emit_one_event_per_filled_block() -> None:
    kv = KvBlockManager(num_blocks=10, block_size=BS)
    tokens = list(range(30))
    admit(kv, "a", tokens)
    first = kv.take_events()
    assert [len(e.block_hashes) for e in first if isinstance(e, KvBlockStored)] == [1]
    hashes = chain(list(range(40)))
    for token in range(30, 40):  # decode: one more computed token per step
        tokens.append(token)
        assert kv.allocate("a", tokens, len(tokens))
        events = kv.take_events()
        if len(tokens) == 32:
            assert events == [
                KvBlockStored(
                    block_hashes=[hashes[1]],
                    parent_hash=hashes[0],
                    token_ids=list(range(16, 32)),
                    block_size=BS,
                    extra_keys=[None],
                    group_idx=0,
                    kv_cache_spec_kind="full_attention",
                )
            ]
        else:
            assert events == []
    assert len(kv.blocks_of("a")) == 3


def test_prefix_hit_shares_blocks_and_counts_refs() -> None:
    kv = KvBlockManager(num_blocks=20, block_size=BS)
    a = list(range(64))
    admit(kv, "a", a)
    kv.take_events()
    b = a[:48] + [900 + i for i in range(40)]
    assert admit(kv, "b", b) == 48
    shared = kv.blocks_of("a")[:3]
    assert kv.blocks_of("b")[:3] == shared
    assert [kv.ref_count(x) for x in shared] == [2, 2, 2]
    assert kv.ref_count(kv.blocks_of("a")[3]) == 1
    assert kv.num_active_blocks == 4 + 3  # a: 4, b: 3 shared + 3 own (88 tokens -> 6 blocks)
    (stored,) = kv.take_events()
    assert isinstance(stored, KvBlockStored)
    assert stored.parent_hash == chain(a)[2]
    assert stored.token_ids == b[48:80]
    kv.free("a")
    assert [kv.ref_count(x) for x in shared] == [1, 1, 1]
    kv.free("b")
    assert kv.num_active_blocks == 0 and kv.usage == 0.0
    assert kv.num_cached_blocks == 6  # 4 of a + 2 full of b; nothing evicted yet
    assert kv.take_events() == []


def test_hit_leaves_at_least_one_token_to_compute() -> None:
    kv = KvBlockManager(num_blocks=10, block_size=BS)
    tokens = list(range(32))
    admit(kv, "a", tokens)
    kv.free("a")
    assert kv.match_prefix("b", tokens) == 16
    assert kv.match_prefix("c", tokens + [1]) == 32


def test_inactive_hit_is_reactivated_without_events() -> None:
    kv = KvBlockManager(num_blocks=4, block_size=BS)
    tokens = list(range(40))
    admit(kv, "a", tokens)
    blocks = kv.blocks_of("a")
    kv.free("a")
    kv.take_events()
    assert admit(kv, "b", tokens) == 32
    assert kv.blocks_of("b")[:2] == blocks[:2]
    assert kv.num_active_blocks == 3
    assert kv.take_events() == []


def test_free_blocks_are_used_before_evicting_and_lru_evicts_oldest_tail_first() -> None:
    kv = KvBlockManager(num_blocks=6, block_size=BS)
    a, b = list(range(32)), list(range(100, 132))
    admit(kv, "a", a)
    admit(kv, "b", b)
    kv.free("a")
    kv.free("b")
    kv.take_events()
    assert kv.num_free_blocks == 6 and kv.num_cached_blocks == 4
    admit(kv, "c", list(range(200, 232)))  # the two never-used blocks: no eviction
    events = kv.take_events()
    assert not any(isinstance(e, KvBlockRemoved) for e in events)
    admit(kv, "d", list(range(300, 348)))  # 3 blocks: a's tail, a's head, then b's tail
    removed = [e.block_hashes[0] for e in kv.take_events() if isinstance(e, KvBlockRemoved)]
    ha, hb = chain(a), chain(b)
    assert removed == [ha[1], ha[0], hb[1]]
    assert not kv.is_cached(ha[0]) and kv.is_cached(hb[0])


def test_hit_on_a_reused_block_refreshes_its_lru_position() -> None:
    kv = KvBlockManager(num_blocks=4, block_size=BS)
    a, b = list(range(16)), list(range(100, 116))
    admit(kv, "a", a + [1])
    admit(kv, "b", b + [1])
    kv.free("a")
    kv.free("b")
    admit(kv, "a2", a + [2])  # touches a's block: now b's is the oldest
    kv.free("a2")
    kv.take_events()
    admit(kv, "c", list(range(500, 564)))  # needs all 4 blocks
    removed = [e.block_hashes[0] for e in kv.take_events() if isinstance(e, KvBlockRemoved)]
    assert removed == [chain(b)[0], chain(a)[0]]


def test_allocation_that_does_not_fit_changes_nothing() -> None:
    kv = KvBlockManager(num_blocks=4, block_size=BS)
    admit(kv, "a", list(range(32)))
    kv.take_events()
    assert kv.match_prefix("b", list(range(100, 148))) == 0
    assert not kv.allocate("b", list(range(100, 148)), 48)
    assert kv.allocate("b", list(range(100, 132)), 32) is True
    assert kv.num_free_blocks == 0
    kv.free("b")
    assert not kv.allocate("c", list(range(600, 632)), 32, reserve=1)
    assert kv.blocks_of("c") == [] and kv.num_active_blocks == 2
    assert kv.take_events() == [  # b's blocks were stored; nothing was evicted by the failed attempts
        KvBlockStored(
            block_hashes=chain(list(range(100, 132))),
            parent_hash=None,
            token_ids=list(range(100, 132)),
            block_size=BS,
            extra_keys=[None, None],
            group_idx=0,
            kv_cache_spec_kind="full_attention",
        )
    ]


def test_duplicate_block_is_neither_registered_nor_announced() -> None:
    kv = KvBlockManager(num_blocks=10, block_size=BS)
    tokens = list(range(40))
    assert kv.match_prefix("b", tokens) == 0  # b looked before a computed anything
    admit(kv, "a", tokens)
    assert kv.allocate("b", tokens, 40)
    events = kv.take_events()
    assert len(events) == 1 and events[0].block_hashes == chain(tokens)  # type: ignore[union-attr]
    kv.free("b")  # b's copies were never cached, so they go straight back to the free pool
    assert kv.num_cached_blocks == 2 and kv.num_free_blocks == 10 - 3


def test_reset_prefix_cache() -> None:
    kv = KvBlockManager(num_blocks=8, block_size=BS)
    tokens = list(range(40))
    admit(kv, "a", tokens)
    assert not kv.reset_prefix_cache()
    kv.free("a")
    kv.take_events()
    assert kv.reset_prefix_cache()
    assert kv.take_events() == [KvAllCleared()]
    assert kv.num_cached_blocks == 0 and kv.num_free_blocks == 8
    assert kv.match_prefix("b", tokens) == 0


def test_prefix_caching_disabled_hits_nothing_and_stays_silent() -> None:
    kv = KvBlockManager(num_blocks=8, block_size=BS, enable_prefix_caching=False)
    tokens = list(range(40))
    admit(kv, "a", tokens)
    kv.free("a")
    assert admit(kv, "b", tokens) == 0
    assert kv.take_events() == []
    assert kv.num_cached_blocks == 0


def test_invalid_geometry() -> None:
    with pytest.raises(ValueError, match="block_size"):
        KvBlockManager(num_blocks=4, block_size=0)
