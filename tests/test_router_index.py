from __future__ import annotations

import random
import struct
from array import array

import msgpack
import pytest
import xxhash
from helpers import examples
from hypothesis import given, settings
from hypothesis import strategies as st

from zdyn.kv_events import KvAllCleared, KvBlockRemoved, KvBlockStored, KvEventBatch, decode_payload, normalize_hash
from zdyn.router.hashing import ROOT_SEED, hash_blocks
from zdyn.router.indexer import KvIndexer

BS = 4


def stored(hashes: list[int], parent: int | None, tokens: list[int], lora_name: str | None = None) -> KvBlockStored:
    return KvBlockStored(block_hashes=hashes, parent_hash=parent, token_ids=tokens, block_size=BS, lora_name=lora_name)


def toks(*blocks: int) -> list[int]:
    """One block of BS equal tokens per argument."""
    return [t for b in blocks for t in [b] * BS]


# --- hashing ---


def test_hash_blocks_is_chained_xxh3_over_little_endian_uint32() -> None:
    tokens = [1, 2, 3, 2**32 - 1, 7, 8, 9, 10]
    seed = ROOT_SEED
    expected = []
    for i in range(0, len(tokens), BS):
        seed = xxhash.xxh3_64_intdigest(struct.pack(f"<{BS}I", *tokens[i : i + BS]), seed)
        expected.append(seed)
    assert hash_blocks(tokens, BS) == expected
    assert hash_blocks(tokens, BS) == hash_blocks(tuple(tokens), BS) == hash_blocks(array("I", tokens), BS)


def test_hash_blocks_shares_hashes_exactly_as_long_as_the_prefix_is_shared() -> None:
    a = hash_blocks(toks(1, 2, 3, 4), BS)
    b = hash_blocks(toks(1, 2, 9, 4), BS)
    assert len(a) == len(set(a)) == 4
    assert a[:2] == b[:2]
    assert all(x != y for x, y in zip(a[2:], b[2:], strict=True))  # the chain carries the difference onwards
    assert hash_blocks(toks(1, 2, 3, 4), BS) == a


def test_hash_blocks_ignores_a_partial_block() -> None:
    assert hash_blocks(toks(1, 2) + [5, 5, 5], BS) == hash_blocks(toks(1, 2), BS)
    assert hash_blocks([1, 2, 3], BS) == []
    assert hash_blocks([], BS) == []


def test_hash_blocks_depends_on_lora_and_block_size() -> None:
    tokens = toks(1, 2, 3, 4)
    plain, lora_a, lora_b = (hash_blocks(tokens, BS, name) for name in (None, "a", "b"))
    assert not set(plain) & set(lora_a)
    assert not set(lora_a) & set(lora_b)
    assert hash_blocks(tokens, BS, "a") == lora_a
    assert hash_blocks(tokens, 2 * BS) != plain[1::2]
    with pytest.raises(ValueError):
        hash_blocks(tokens, 0)


def test_hash_blocks_continues_from_a_parent() -> None:
    tokens = list(range(10 * BS))
    whole = hash_blocks(tokens, BS, "lora")
    head = hash_blocks(tokens[: 4 * BS], BS, "lora")
    assert hash_blocks(tokens[4 * BS :], BS, parent=head[-1]) == whole[4:]
    assert hash_blocks(tokens[4 * BS :], BS, "other lora", parent=head[-1]) == whole[4:]


# --- indexer basics ---


def test_overlap_counts_leading_blocks_per_worker() -> None:
    idx = KvIndexer(BS)
    idx.apply("a", stored([11, 12, 13], None, toks(1, 2, 3)))
    idx.apply("b", stored([21], None, toks(1)))
    idx.apply("b", stored([22], 21, toks(2)))
    idx.apply("c", stored([31], None, toks(9)))
    query = hash_blocks(toks(1, 2, 3, 4), BS)
    assert idx.overlaps(query, now=0) == {"a": 3, "b": 2}
    assert idx.overlaps(hash_blocks(toks(2, 3), BS), now=0) == {}  # not a prefix
    assert idx.overlaps([], now=0) == {}
    assert idx.num_blocks("a") == 3 and idx.num_blocks("b") == 2 and idx.num_blocks() == 6
    assert idx.stats["events_applied"] == 4 and idx.stats["blocks_stored"] == 6


def test_removing_a_middle_block_cuts_the_overlap_there() -> None:
    idx = KvIndexer(BS)
    idx.apply("a", stored([1, 2, 3], None, toks(1, 2, 3)))
    idx.apply("a", KvBlockRemoved([2]))
    assert idx.overlaps(hash_blocks(toks(1, 2, 3), BS), now=0) == {"a": 1}
    assert idx.num_blocks("a") == 2
    assert idx.stats["blocks_removed"] == 1


def test_problems_are_counted_not_raised() -> None:
    idx = KvIndexer(BS)
    idx.apply("a", stored([1], 999, toks(1)))
    idx.apply("a", KvBlockRemoved([12345]))
    idx.apply("a", KvBlockStored([2], None, toks(1), block_size=BS * 2))
    idx.apply("a", stored([3, 4], None, toks(1)))
    idx.apply("a", KvBlockStored([5], None, toks(1), block_size=BS, medium="CPU"))
    idx.apply("a", stored([6], None, [1, 2, 3, -1]))
    idx.apply("a", stored([7], None, [1, 2, 3, 2**32]))
    assert idx.stats["unknown_parent"] == 1
    assert idx.stats["unknown_block_removed"] == 1
    assert idx.stats["block_size_mismatch"] == 1
    assert idx.stats["token_count_mismatch"] == 1
    assert idx.stats["other_medium"] == 1
    assert idx.stats["bad_token_ids"] == 2
    assert idx.stats["events_applied"] == 1  # only the removal (of nothing) went through
    assert idx.num_blocks() == 0
    assert idx.workers == ["a"]  # events add their worker implicitly


def test_block_is_kept_until_the_last_engine_hash_for_it_is_removed() -> None:
    idx = KvIndexer(BS)
    idx.apply("a", stored([1], None, toks(7)))
    idx.apply("a", stored([2], None, toks(7)))  # same tokens, another engine hash (e.g. another cache salt)
    idx.apply("a", stored([2], None, toks(7)))  # repeated: no double count
    q = hash_blocks(toks(7), BS)
    assert idx.num_blocks("a") == 1 and idx.num_hashes == 1
    assert idx.stats["blocks_stored"] == 2 and idx.stats["duplicate_stored"] == 1
    idx.apply("a", KvBlockRemoved([1]))
    assert idx.overlaps(q, now=0) == {"a": 1}
    idx.apply("a", KvBlockRemoved([2]))
    assert idx.overlaps(q, now=0) == {}


def test_clear_and_remove_worker() -> None:
    idx = KvIndexer(BS)
    for w in ("a", "b"):
        idx.apply(w, stored([1, 2], None, toks(1, 2)))
    q = hash_blocks(toks(1, 2), BS)
    idx.apply("a", KvAllCleared())
    assert idx.overlaps(q, now=0) == {"b": 2}
    assert idx.workers == ["a", "b"]
    idx.remove_worker("b")
    assert idx.overlaps(q, now=0) == {}
    assert idx.workers == ["a"]
    idx.apply("c", stored([1], None, toks(1)))  # takes b's freed bit: must not inherit anything of b's
    assert idx.overlaps(q, now=0) == {"c": 1}
    idx.clear_worker("c")
    idx.remove_worker("ghost")
    assert idx.num_blocks() == 0 and idx.overlaps(q, now=0) == {}


def test_many_workers_beyond_one_machine_word() -> None:
    idx = KvIndexer(BS)
    for i in range(200):
        idx.apply(f"w{i}", stored([1, 2, 3][: 1 + i % 3], None, toks(5, 6, 7)[: BS * (1 + i % 3)]))
    got = idx.overlaps(hash_blocks(toks(5, 6, 7), BS), now=0)
    assert got == {f"w{i}": 1 + i % 3 for i in range(200)}


# --- predictions ---


def test_prediction_counts_until_it_expires() -> None:
    idx = KvIndexer(BS)
    q = hash_blocks(toks(1, 2, 3), BS)
    idx.predict("a", q[:2], now=10.0, ttl_s=1.0)
    assert idx.overlaps(q, now=10.5) == {"a": 2}
    assert idx.num_blocks("a") == 0  # predictions are not blocks
    assert idx.overlaps(q, now=11.0) == {}
    assert idx.overlaps(q, now=10.5) == {}  # purged for good


def test_confirmed_prediction_outlives_its_ttl() -> None:
    idx = KvIndexer(BS)
    q = hash_blocks(toks(1, 2, 3), BS)
    idx.predict("a", q, now=0.0, ttl_s=1.0)
    idx.apply("a", stored([10, 11], None, toks(1, 2)))  # the real events for the first two blocks
    assert idx.overlaps(q, now=0.5) == {"a": 3}
    assert idx.overlaps(q, now=5.0) == {"a": 2}
    assert idx.num_blocks("a") == 2
    idx.apply("a", KvBlockRemoved([11]))
    assert idx.overlaps(q, now=5.0) == {"a": 1}
    idx.apply("a", KvBlockRemoved([10]))
    assert idx.overlaps(q, now=5.0) == {}


def test_prediction_leaves_real_blocks_alone_and_can_be_extended() -> None:
    idx = KvIndexer(BS)
    q = hash_blocks(toks(1, 2), BS)
    idx.apply("a", stored([10], None, toks(1)))
    idx.predict("a", q, now=0.0, ttl_s=1.0)
    idx.predict("a", q, now=0.8, ttl_s=1.0)  # a second request with the same prefix: extends to 1.8
    idx.predict("a", q, now=0.9, ttl_s=0.1)  # a shorter ttl does not cut it back
    assert idx.overlaps(q, now=1.5) == {"a": 2}
    assert idx.overlaps(q, now=1.8) == {"a": 1}  # the real block stays
    idx.apply("a", KvBlockRemoved([10]))
    assert idx.overlaps(q, now=1.8) == {}
    assert idx.stats["unknown_block_removed"] == 0


def test_removed_or_cleared_worker_loses_its_predictions() -> None:
    idx = KvIndexer(BS)
    q = hash_blocks(toks(1, 2), BS)
    idx.predict("a", q, now=0.0, ttl_s=10.0)
    idx.predict("b", q, now=0.0, ttl_s=10.0)
    idx.clear_worker("a")
    assert idx.overlaps(q, now=1.0) == {"b": 2}
    idx.remove_worker("b")
    idx.add_worker("c")  # reuses a freed bit
    assert idx.overlaps(q, now=1.0) == {}
    assert idx.overlaps(q, now=20.0) == {}  # stale heap entries expire without touching c


# --- indexer against a brute-force model ---

WORKERS = ["w0", "w1", "w2", "w3", "w4"]
Chain = tuple[object, ...]  # (lora_name, block tokens, block tokens, ...)


class Model:
    """What the index should say, the slow way: each worker's engine hash -> full token chain of the block."""

    def __init__(self) -> None:
        self.blocks: dict[str, dict[int, Chain]] = {}
        self.unknown_parent = 0
        self.unknown_removed = 0

    def store(self, w: str, hashes: list[int], parent: int | None, tokens: list[int], lora: str | None) -> None:
        held = self.blocks.setdefault(w, {})
        if parent is None:
            chain: Chain = (lora,)
        elif parent in held:
            chain = held[parent]
        else:
            self.unknown_parent += 1
            return
        for i, h in enumerate(hashes):
            chain = (*chain, tuple(tokens[i * BS : (i + 1) * BS]))
            held[h] = chain

    def remove(self, w: str, hashes: list[int]) -> None:
        held = self.blocks.setdefault(w, {})
        for h in hashes:
            if held.pop(h, None) is None:
                self.unknown_removed += 1

    def overlaps(self, tokens: list[int], lora: str | None) -> dict[str, int]:
        out = {}
        for w, held in self.blocks.items():
            chains = set(held.values())
            chain: Chain = (lora,)
            n = 0
            while n < len(tokens) // BS:
                chain = (*chain, tuple(tokens[n * BS : (n + 1) * BS]))
                if chain not in chains:
                    break
                n += 1
            if n:
                out[w] = n
        return out

    def num_blocks(self, w: str) -> int:
        return len(set(self.blocks.get(w, {}).values()))


def chain_tokens(chain: Chain) -> list[int]:
    return [t for block in chain[1:] for t in block]  # type: ignore[union-attr]


def check(idx: KvIndexer, model: Model, rng: random.Random) -> None:
    queries: list[tuple[list[int], str | None]] = []
    for held in model.blocks.values():
        for chain in rng.sample(sorted(set(held.values()), key=repr), min(3, len(set(held.values())))):
            tail = [rng.randrange(3) for _ in range(rng.randrange(3 * BS))]
            queries.append((chain_tokens(chain) + tail, chain[0]))  # type: ignore[arg-type]
    queries += [([rng.randrange(3) for _ in range(rng.randrange(5 * BS))], rng.choice([None, "x"])) for _ in range(3)]
    for tokens, lora in queries:
        assert idx.overlaps(hash_blocks(tokens, BS, lora), now=0) == model.overlaps(tokens, lora), (tokens, lora)
    for w in WORKERS:
        assert idx.num_blocks(w) == model.num_blocks(w), w
    assert idx.num_blocks() == sum(model.num_blocks(w) for w in WORKERS)
    assert idx.stats["unknown_parent"] == model.unknown_parent
    assert idx.stats["unknown_block_removed"] == model.unknown_removed


@pytest.mark.parametrize("budget", examples(25, 150))
def test_indexer_agrees_with_brute_force_model(budget: int) -> None:
    settings(max_examples=budget, deadline=None)(given(st.data())(agree_with_brute_force_model))()


def agree_with_brute_force_model(data: st.DataObject) -> None:
    idx, model = KvIndexer(BS), Model()
    rng = random.Random(data.draw(st.integers(0, 2**32)))
    small_tokens = st.lists(st.integers(0, 2), min_size=BS, max_size=BS)
    for _ in range(data.draw(st.integers(1, 30))):
        op = data.draw(st.sampled_from(["store", "store", "store", "store", "remove", "clear", "drop"]))
        w = data.draw(st.sampled_from(WORKERS))
        known = sorted(model.blocks.get(w, {}))
        everywhere = sorted({h for held in model.blocks.values() for h in held})
        if op == "store":
            n = data.draw(st.integers(1, 4))
            tokens = [t for _ in range(n) for t in data.draw(small_tokens)]
            parent = data.draw(st.sampled_from([None, *known, *everywhere[:3], 2**64 - 1]))
            hashes = [
                data.draw(st.sampled_from(everywhere))
                if everywhere and data.draw(st.booleans())
                else rng.getrandbits(64)
                for _ in range(n)
            ]
            if len(set(hashes)) < n:
                continue  # one event never names a block twice
            lora = data.draw(st.sampled_from([None, "x"]))
            idx.apply(w, stored(hashes, parent, tokens, lora))
            model.store(w, hashes, parent, tokens, lora)
        elif op == "remove":
            hashes = data.draw(st.lists(st.sampled_from([*known, 12345]), max_size=4, unique=True))
            idx.apply(w, KvBlockRemoved(hashes))
            model.remove(w, hashes)
        elif op == "clear":
            idx.apply(w, KvAllCleared())
            model.blocks[w] = {}
        else:
            idx.remove_worker(w)
            model.blocks.pop(w, None)
        check(idx, model, rng)


# --- vLLM's wire payloads ---

TS = 1795765826.446156
E1, E2, E3, E4 = 2181922069734703492, 12727516518541667169, 2**64 - 1, 5
A, B, C, D = toks(1, 2, 3), toks(2), toks(3), toks(9)  # A = three blocks


def map_event(kind: str, **fields: object) -> dict[str, object]:
    return {"type": kind, **fields}


def map_payload(hash_of: object = lambda h: h) -> bytes:
    """vLLM >= 0.26 (0.32 measured): array batch, events as maps tagged by "type", defaults omitted."""
    h = hash_of
    events = [
        map_event(
            "BlockStored",
            block_hashes=[h(E1), h(E2), h(E3)],  # type: ignore[operator]
            parent_block_hash=None,
            token_ids=A,
            block_size=BS,
            lora_id=None,
            medium="GPU",
            lora_name=None,
            extra_keys=[None, None, None],
            group_idx=0,
            kv_cache_spec_kind="full_attention",
        ),
        map_event("SomeFutureEvent", whatever=1),
        map_event("BlockStored", block_hashes=[h(E4)], parent_block_hash=h(E2), token_ids=D, block_size=BS),  # type: ignore[operator]
        map_event("BlockRemoved", block_hashes=[h(E3)], medium="GPU"),  # type: ignore[operator]
    ]
    return msgpack.packb([TS, events, 0])


def legacy_payload() -> bytes:
    """vLLM before PR #42892: positional arrays, no dp rank."""
    events = [
        ["BlockStored", [E1, E2, E3], None, A, BS, None, "GPU"],
        ["BlockStored", [E4], E2, D, BS, None],
        ["BlockRemoved", [E3], "GPU"],
    ]
    return msgpack.packb([TS, events])


def map_batch_payload() -> bytes:
    """A map-shaped batch, as vLLM's newest source would send without array_like on the batch."""
    raw = msgpack.unpackb(map_payload(), raw=False, strict_map_key=False)
    return msgpack.packb({"ts": raw[0], "events": raw[1], "data_parallel_rank": raw[2]})


def digest(h: int) -> bytes:
    return bytes(range(24)) + h.to_bytes(8, "big")  # a 32-byte sha256-sized hash whose low 8 bytes are h


def index_of(payload: bytes) -> KvIndexer:
    idx = KvIndexer(BS)
    idx.apply_batch("w", decode_payload(payload, seq=0))
    return idx


@pytest.mark.parametrize(
    "payload",
    [map_payload(), legacy_payload(), map_batch_payload(), map_payload(digest)],
    ids=["map-events", "legacy-arrays", "map-batch", "bytes-hashes"],
)
def test_vllm_payload_shapes_build_the_same_index(payload: bytes) -> None:
    idx = index_of(payload)
    assert idx.overlaps(hash_blocks(A + C, BS), now=0) == {"w": 2}  # block 3 was removed
    assert idx.overlaps(hash_blocks(toks(1, 2, 9), BS), now=0) == {"w": 3}  # the branch under E2
    assert idx.num_blocks() == 3
    assert idx.stats["unknown_parent"] == idx.stats["unknown_block_removed"] == 0
    assert idx.stats["events_applied"] == 3


def test_bytes_and_int_engine_hashes_are_interchangeable() -> None:
    assert normalize_hash(digest(E2)) == normalize_hash(E2) == E2
    assert normalize_hash(-1) == E3  # a signed i64 from an old vLLM
    idx = KvIndexer(BS)
    idx.apply_batch("w", decode_payload(map_payload(digest)))
    removal = msgpack.packb([TS, [map_event("BlockRemoved", block_hashes=[E2])], 0])  # int form this time
    idx.apply_batch("w", decode_payload(removal))
    assert idx.overlaps(hash_blocks(A, BS), now=0) == {"w": 1}


def test_apply_batch_applies_every_event_in_order() -> None:
    idx = KvIndexer(BS)
    batch = KvEventBatch(
        seq=0, ts=TS, events=[stored([1, 2], None, toks(1, 2)), KvAllCleared(), stored([3], None, toks(4))]
    )
    idx.apply_batch("w", batch)
    assert idx.overlaps(hash_blocks(toks(1, 2), BS), now=0) == {}
    assert idx.overlaps(hash_blocks(toks(4), BS), now=0) == {"w": 1}
