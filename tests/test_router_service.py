"""The router service and its client on loopback: workers register, KV events arrive, processors ask."""

from __future__ import annotations

import asyncio

import pytest
import zmq
import zmq.asyncio
from helpers import FAST, eventually

from zdyn.bench.procs import free_ports
from zdyn.kv_events import KvBlockStored
from zdyn.kv_publisher import KvEventPublisher
from zdyn.protocol import Ready, RouteQuery, RouteUpdate, encode
from zdyn.router.client import RemoteSelector, RouterClient
from zdyn.router.core import KvRouter
from zdyn.router.service import RouterService
from zdyn.rpc import Hub, Peer, Spoke

BS = 4


async def never(request):
    raise AssertionError("the router sends no requests")
    yield


@pytest.fixture
async def setup():
    """A router service, two workers registered at it (one publishing KV events), and a client."""
    query_port, hub_port = free_ports(2)
    hub = Hub(f"tcp://127.0.0.1:{hub_port}", role="worker", liveness=FAST)
    service = RouterService(f"tcp://127.0.0.1:{query_port}", hub, KvRouter(BS))
    await hub.start()
    run = asyncio.create_task(service.run())
    publisher = KvEventPublisher("tcp://127.0.0.1:*", replay_endpoint="tcp://127.0.0.1:*")
    await publisher.start()
    spokes = []
    for name, pub in (("w0", publisher), ("w1", None)):
        ready = Ready(peer_id=name, role="worker", model="m", block_size=BS, num_kv_blocks=100, max_num_seqs=8)
        if pub is not None:
            ready.kv_events_endpoint, ready.kv_replay_endpoint = pub.endpoint, pub.replay_endpoint or ""
        spoke = Spoke([hub.endpoint], ready, never, liveness=FAST)
        spokes.append((spoke, asyncio.create_task(spoke.run())))
    await eventually(lambda: len(service.feed.peers) == 2)
    client = RouterClient(service.endpoint, timeout_s=2.0)
    yield service, publisher, spokes, client
    await client.aclose()
    for spoke, task in spokes:
        spoke.close()
        await asyncio.gather(task, return_exceptions=True)
    service.close()
    await run
    await publisher.close()
    await hub.close()


async def test_routes_to_the_worker_whose_events_show_the_prefix(setup):
    service, publisher, _, client = setup
    await asyncio.sleep(0.3)  # the router's SUB is connected
    await publisher.publish([KvBlockStored(block_hashes=[11, 12], parent_hash=None, token_ids=list(range(8)),
                                           block_size=BS)])  # fmt: skip
    await eventually(lambda: service.router.indexer.num_blocks("w0") == 2)
    for i in range(3):
        reply = await client.route(RouteQuery(request_id=f"r{i}", token_ids=list(range(10)), candidates=["w0", "w1"]))
        assert reply is not None and reply.worker == "w0" and reply.overlap_blocks == 2, reply
        client.update(f"r{i}", "finished")
    await eventually(lambda: len(service.router.active) == 0)
    reply = await client.route(RouteQuery(request_id="x", token_ids=[1, 2, 3], candidates=["nobody"]))
    assert reply is None  # no decision: the processor falls back


async def test_a_dead_worker_is_dropped_with_its_blocks(setup):
    service, publisher, spokes, client = setup
    await asyncio.sleep(0.3)
    await publisher.publish([KvBlockStored(block_hashes=[1], parent_hash=None, token_ids=[0, 1, 2, 3], block_size=BS)])
    await eventually(lambda: service.router.indexer.num_blocks("w0") == 1)
    spokes[0][0].close()
    await eventually(lambda: "w0" not in service.feed.peers)
    assert service.router.indexer.num_blocks() == 0 and "w0" not in service.feed.subscribers
    reply = await client.route(RouteQuery(request_id="r", token_ids=[0, 1, 2, 3, 4]))
    assert reply is not None and reply.worker == "w1"


async def test_malformed_queries_are_dropped_and_counted(setup):
    service, _, _, client = setup
    ctx = zmq.asyncio.Context.instance()
    raw = ctx.socket(zmq.DEALER)
    raw.connect(service.endpoint)
    try:
        await raw.send_multipart([b"\x30", b"\xc1 not msgpack"])
        await raw.send_multipart([b"\x99", b"{}"])
        await raw.send_multipart(encode(Ready(peer_id="x", role="worker")))  # a valid message, wrong place
        await raw.send_multipart(encode(RouteUpdate(request_id="r", event="exploded")))
        await eventually(lambda: service.malformed.count == 4)
        reply = await client.route(RouteQuery(request_id="ok", token_ids=[1, 2, 3, 4, 5]))
        assert reply is not None and reply.worker in ("w0", "w1")
    finally:
        raw.close(linger=0)


async def test_client_falls_back_and_backs_off_when_no_router_answers():
    (port,) = free_ports(1)
    client = RouterClient(f"tcp://127.0.0.1:{port}", timeout_s=0.1, backoff_s=30.0)
    selector = RemoteSelector(client)
    peers = [Peer(b"a", Ready(peer_id="a", role="worker"), 0.0), Peer(b"b", Ready(peer_id="b", role="worker"), 0.0)]
    try:
        chosen = [(await selector.select(f"r{i}", [1, 2, 3], peers)) for i in range(4)]
        assert [r.peer.id for r in chosen] == ["a", "b", "a", "b"]
        assert all("router unavailable" in r.reason for r in chosen)
        assert client.failures == 1  # one timeout, then the back-off skips asking
    finally:
        await client.aclose()
