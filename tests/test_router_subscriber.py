"""KvSubscriber on loopback against zdyn's vLLM-format publisher: live events, replay, gaps, restarts, garbage."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import msgpack
import pytest
import zmq
import zmq.asyncio
from helpers import eventually

from zdyn.kv_events import KvBlockRemoved, KvBlockStored, encode_payload
from zdyn.kv_publisher import KvEventPublisher
from zdyn.router.core import KvRouter
from zdyn.router.subscriber import KvSubscriber

BS = 4


def stored(h: int, parent: int | None, first_token: int) -> KvBlockStored:
    return KvBlockStored(block_hashes=[h], parent_hash=parent, token_ids=list(range(first_token, first_token + BS)),
                         block_size=BS)  # fmt: skip


def chain(n: int, start: int = 0) -> list[int]:
    return list(range(start, start + n * BS))


@contextlib.asynccontextmanager
async def subscribed(publisher: KvEventPublisher) -> AsyncIterator[tuple[KvRouter, KvSubscriber]]:
    """A router following ``publisher`` from now on (its SUB connected)."""
    router = KvRouter(BS)
    sub = KvSubscriber("w", publisher.endpoint, publisher.replay_endpoint or "", router)
    sub.start()
    try:
        await asyncio.sleep(0.3)
        yield router, sub
    finally:
        sub.close()


@pytest.fixture
async def publisher():
    pub = KvEventPublisher("tcp://127.0.0.1:*", replay_endpoint="tcp://127.0.0.1:*", buffer_steps=8)
    await pub.start()
    yield pub
    await pub.close()


def overlap(router: KvRouter, tokens: list[int]) -> int:
    from zdyn.router.hashing import hash_blocks

    return router.indexer.overlaps(hash_blocks(tokens, BS), now=0.0).get("w", 0)


async def test_late_subscriber_replays_what_it_missed_then_follows_live(publisher):
    for i in range(3):  # cached before the router subscribed
        await publisher.publish([stored(i + 1, i or None, i * BS)])
    router = KvRouter(BS)
    sub = KvSubscriber("w", publisher.endpoint, publisher.replay_endpoint, router)
    sub.start()
    try:
        await eventually(lambda: overlap(router, chain(3)) == 3)
        await asyncio.sleep(0.2)  # SUB connected
        await publisher.publish([stored(4, 3, 3 * BS)])
        await eventually(lambda: overlap(router, chain(4)) == 4)
        await publisher.publish([KvBlockRemoved(block_hashes=[4])])
        await eventually(lambda: overlap(router, chain(4)) == 3)
        assert sub.stats["replayed"] == 3 and sub.stats["batches"] == 5
    finally:
        sub.close()


async def test_a_gap_is_filled_from_replay(publisher):
    async with subscribed(publisher) as (router, sub):
        await publisher.publish([stored(1, None, 0)])
        await eventually(lambda: overlap(router, chain(1)) == 1)
        # two batches the SUB never sees (as if dropped on the way), but the publisher's buffer keeps them
        for i in (1, 2):
            publisher._buffer.append((publisher._next_seq, encode_payload([stored(i + 1, i, i * BS)])))
            publisher._next_seq += 1
        await publisher.publish([stored(4, 3, 3 * BS)])
        await eventually(lambda: overlap(router, chain(4)) == 4)
        assert sub.stats["gap"] == 1 and router.indexer.stats["unknown_parent"] == 0


async def test_a_gap_replay_cannot_cover_rebuilds_the_worker(publisher):
    async with subscribed(publisher) as (router, sub):
        await publisher.publish([stored(1, None, 0)])
        await eventually(lambda: overlap(router, chain(1)) == 1)
        publisher._next_seq += 20  # lost, and older than the 8-batch buffer can replay
        await publisher.publish([stored(99, None, 1000)])
        await eventually(lambda: overlap(router, list(range(1000, 1000 + BS))) == 1)
        assert overlap(router, chain(1)) == 0  # stale entries were dropped
        assert sub.stats["replay_incomplete"] == 1


async def test_a_restarted_publisher_clears_the_worker(publisher):
    async with subscribed(publisher) as (router, sub):
        for i in range(2):
            await publisher.publish([stored(i + 1, i or None, i * BS)])
        await eventually(lambda: overlap(router, chain(2)) == 2)
        publisher._next_seq = 0  # the worker restarted: a new process counts from 0 again
        await publisher.publish([stored(7, None, 500)])
        await eventually(lambda: sub.stats["restart"] == 1)
        assert overlap(router, chain(2)) == 0 and overlap(router, list(range(500, 500 + BS))) == 1


async def test_garbage_frames_are_counted_and_skipped():
    ctx = zmq.asyncio.Context.instance()
    pub = ctx.socket(zmq.PUB)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    router = KvRouter(BS)
    sub = KvSubscriber("w", f"tcp://127.0.0.1:{port}", "", router)
    sub.start()
    try:
        await asyncio.sleep(0.3)
        await pub.send_multipart([b"only one frame"])
        await pub.send_multipart([b"", b"short", b"x"])
        await pub.send_multipart([b"", (0).to_bytes(8, "big"), b"\xc1 not msgpack"])
        await pub.send_multipart([b"", (0).to_bytes(8, "big"), encode_payload([stored(1, None, 0)])])
        await eventually(lambda: overlap(router, chain(1)) == 1)
        assert sub.stats["malformed"] == 3
        weird = msgpack.packb([0.0, [{"type": "BlockTeleported", "block_hashes": [9]},
                                     {"type": "BlockStored", "block_hashes": [2], "parent_block_hash": 1,
                                      "token_ids": list(range(BS, 2 * BS)), "block_size": BS}], 0])  # fmt: skip
        await pub.send_multipart([b"", (1).to_bytes(8, "big"), weird])
        await eventually(lambda: overlap(router, chain(2)) == 2)  # the known event of the batch still applies
        assert router.indexer.stats["unknown_event_type"] == 1
    finally:
        sub.close()
        pub.close(linger=0)


async def test_a_subscriber_older_than_the_buffer_starts_from_a_snapshot_of_the_whole_cache(publisher):
    # 30 batches through an 8-batch buffer: blocks 1..20 in one chain, then 5..8 removed and 21 stored on 4
    for i in range(20):
        await publisher.publish([stored(i + 1, i or None, i * BS)])
    for h in (5, 6, 7, 8):
        await publisher.publish([KvBlockRemoved(block_hashes=[h])])
    await publisher.publish([stored(21, 4, 10_000)])
    for _ in range(5):  # steps that touched nothing
        await publisher.publish([])
    assert publisher._buffer[0][0] > 0  # the first batches are gone from the buffer
    router = KvRouter(BS)
    sub = KvSubscriber("w", publisher.endpoint, publisher.replay_endpoint, router)
    sub.start()
    try:
        await eventually(lambda: sub.stats["snapshots"] == 1)
        assert overlap(router, chain(20)) == 4  # blocks 1-4 still cached, 5 gone (so nothing past it counts)
        assert overlap(router, chain(4) + list(range(10_000, 10_000 + BS))) == 5
        assert sub.stats["replay_incomplete"] == 0 and publisher.snapshots_sent == 1
        await asyncio.sleep(0.2)  # SUB connected: live batches follow the snapshot
        await publisher.publish([stored(22, 21, 20_000)])
        await eventually(lambda: overlap(router, chain(4) + list(range(10_000, 10_000 + BS)) + chain(1, 20_000)) == 6)
    finally:
        sub.close()
