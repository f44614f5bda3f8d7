"""Multi-host logic without a second host: fixed ports, advertised addresses, duplicate ids, loud failures, /health.

tests/test_netns.py runs the same across Linux network namespaces.
"""

import asyncio
import logging
import socket

import pytest
import zmq
import zmq.asyncio

from zdyn.bench.deploy import EXAMPLES
from zdyn.frontend.health import topology
from zdyn.protocol import Delta, Directory, Finish, HubEntry, Ready, RouteQuery, encode
from zdyn.roles import frontend, prefill_queue, processor, router, worker
from zdyn.roles.common import parse_args
from zdyn.roles.ports import WorkerPorts
from zdyn.router.client import RouterClient
from zdyn.rpc import Hub, RefusedError, Spoke
from zdyn.rpc.directory import DirectoryBook, HubDirectory, SpokeDiscovery, usable_from
from zdyn.transport import Liveness, advertised, endpoint_host, host_towards, is_loopback, is_remote, make_socket
from zdyn.worker import Worker

FAST = Liveness(interval_s=0.1, misses=3)


@pytest.fixture
async def ctx():
    context = zmq.asyncio.Context()
    yield context
    context.destroy(linger=0)


# -- fixed ports


def test_every_role_listens_on_its_fixed_ports_by_default_and_from_a_port_base():
    def config(module, *argv):
        return module.build_parser().parse_args(list(argv))

    fe = frontend.FrontendConfig.from_args(config(frontend))
    assert fe.workers_endpoint == "tcp://*:5555" and fe.port == 8000
    assert frontend.FrontendConfig.from_args(config(frontend, "--port-base", "7000")).workers_endpoint == "tcp://*:7000"
    assert processor.ProcessorConfig.from_args(config(processor)).workers_endpoint == "tcp://*:5556"
    r = router.RouterConfig.from_args(config(router, "--port-base", "6000"))
    assert (r.endpoint, r.workers_endpoint) == ("tcp://*:6000", "tcp://*:6001")
    r = router.RouterConfig.from_args(config(router))
    assert (r.endpoint, r.workers_endpoint) == ("tcp://*:5570", "tcp://*:5571")
    q = prefill_queue.PrefillQueueConfig.from_args(config(prefill_queue, "--port-base", "6100"))
    assert (q.jobs_endpoint, q.prefill_workers_endpoint, q.status_endpoint) == (
        "tcp://*:6100",
        "tcp://*:6101",
        "tcp://*:6102",
    )
    # an endpoint given explicitly wins over the base
    q = prefill_queue.PrefillQueueConfig.from_args(
        config(prefill_queue, "--port-base", "6100", "--status-endpoint", "tcp://*:7777")
    )
    assert (q.jobs_endpoint, q.status_endpoint) == ("tcp://*:6100", "tcp://*:7777")


def test_worker_ports_from_a_base_explicit_flags_and_simulated_workers():
    assert WorkerPorts.layout(0, 0, 0) == WorkerPorts(0, 0, 0)  # free ports
    assert WorkerPorts.layout(6000, 0, 0) == WorkerPorts(6000, 6001, 6003)
    assert WorkerPorts.layout(6000, 0, 0, index=2) == WorkerPorts(6008, 6009, 6011)
    assert WorkerPorts.layout(6000, 5000, 7000, index=1) == WorkerPorts(5002, 5003, 7001)
    assert WorkerPorts.layout(0, 0, 5100, index=3) == WorkerPorts(0, 0, 5103)


def worker_config(*argv: str) -> worker.WorkerConfig:
    return worker.WorkerConfig.from_args(worker.build_parser("mocker").parse_args(["--engine", "mocker", *argv]))


def test_worker_port_flags_are_checked_and_reach_the_config():
    config = worker_config("--port-base", "6000", "--num-workers", "2")
    assert config.ports(1) == WorkerPorts(6004, 6005, 6007)
    with pytest.raises(ValueError):
        worker_config("--port-base", "65534")
    with pytest.raises(ValueError):
        worker_config("--nixl-side-channel-port", "-1")


def test_advertising_loopback_to_a_hub_on_another_host_is_refused():
    with pytest.raises(ValueError, match="advertise-host"):
        worker_config("--connect", "tcp://10.1.2.3:5555", "--advertise-host", "127.0.0.1")
    with pytest.raises(ValueError, match="advertise-host"):
        worker_config("--connect", "tcp://127.0.0.1:5555", "--prefill-queue", "tcp://q.example:5590",
                      "--advertise-host", "localhost")  # fmt: skip
    assert worker_config("--connect", "tcp://127.0.0.1:5555", "--advertise-host", "127.0.0.1").hubs


def test_address_helpers():
    assert endpoint_host("tcp://[::1]:5555") == "::1" and endpoint_host("ipc:///tmp/x") == ""
    assert is_loopback("127.0.0.2") and is_loopback("localhost") and not is_loopback("10.0.0.1")
    assert is_remote("tcp://10.0.0.1:1") and not is_remote("tcp://*:1") and not is_remote("tcp://127.0.0.1:1")
    assert host_towards("tcp://127.0.0.1:5555") == "127.0.0.1"
    assert advertised("tcp://*:6000", "10.0.0.2") == "tcp://10.0.0.2:6000"


class _Engine:
    """Just enough engine for ``Worker.ready_for``."""


def test_a_worker_advertises_per_hub_the_address_that_hub_reaches():
    w = Worker(_Engine(), ["tcp://127.0.0.1:5555"], "w0")  # type: ignore[arg-type]
    base = Ready(peer_id="w0", role="worker", kv_events_endpoint="tcp://*:6000", kv_replay_endpoint="tcp://*:6001")
    w.spoke = Spoke(["tcp://127.0.0.1:5555"], base, _serve)
    local = w.ready_for("tcp://127.0.0.1:5555")
    assert (local.host, local.kv_events_endpoint, local.kv_replay_endpoint) == (
        "127.0.0.1",
        "tcp://127.0.0.1:6000",
        "tcp://127.0.0.1:6001",
    )
    w.advertise_host = "10.9.8.7"
    assert w.ready_for("tcp://10.1.1.1:5555").kv_events_endpoint == "tcp://10.9.8.7:6000"


async def _serve(request):
    yield Delta(request_id=request.request_id, finish=Finish(reason="stop"))


# -- duplicate ids


async def test_the_same_id_from_another_host_is_refused_and_the_first_keeps_serving(unused_tcp_port, ctx):
    endpoint = f"tcp://127.0.0.1:{unused_tcp_port}"
    hub = Hub(endpoint, role="worker", liveness=FAST, ctx=ctx)
    await hub.start()
    first = Spoke([endpoint], Ready(peer_id="w", role="worker", host="10.0.0.1"), _serve, liveness=FAST, ctx=ctx)
    first_task = asyncio.create_task(first.run())
    await hub.wait_for_peers(1, timeout_s=5)
    second = Spoke([endpoint], Ready(peer_id="w", role="worker", host="10.0.0.2"), _serve, liveness=FAST, ctx=ctx)
    with pytest.raises(RefusedError):
        await asyncio.wait_for(second.run(), 5)
    assert hub.num_refused == 1
    await asyncio.sleep(0.5)  # several heartbeat periods: the first is still registered, under its own identity
    (peer,) = hub.live_peers()
    assert peer.identity == first.identity and peer.ready.host == "10.0.0.1"
    # while the first is alive, the same id from its own host is refused too (nobody takes a live peer's requests)
    thief = Spoke([endpoint], Ready(peer_id="w", role="worker", host="10.0.0.1"), _serve, liveness=FAST, ctx=ctx)
    with pytest.raises(RefusedError):
        await asyncio.wait_for(thief.run(), 5)
    assert hub.num_refused == 2 and [p.identity for p in hub.live_peers()] == [first.identity]
    first.close()
    await asyncio.wait_for(first_task, 5)
    await hub.close()


async def test_a_restart_replaces_a_registration_that_went_quiet(unused_tcp_port, ctx):
    """A new process with the same id, while the old one's death is not yet noticed (silent, not expired)."""
    endpoint = f"tcp://127.0.0.1:{unused_tcp_port}"
    hub = Hub(endpoint, role="worker", liveness=Liveness(interval_s=0.2, misses=20), ctx=ctx)
    await hub.start()
    hung = make_socket(ctx, zmq.DEALER, endpoint, bind=False, identity=b"w#old")  # registers, then never beats
    await hung.send_multipart(encode(Ready(peer_id="w", role="worker", host="10.0.0.1", instance="old")))
    await hub.wait_for_peers(1, timeout_s=5)
    await asyncio.sleep(0.5)
    again = Spoke([endpoint], Ready(peer_id="w", role="worker", host="10.0.0.1"), _serve, liveness=FAST, ctx=ctx)
    again_task = asyncio.create_task(again.run())
    for _ in range(100):
        if [p.identity for p in hub.live_peers()] == [again.identity]:
            break
        await asyncio.sleep(0.05)
    assert [p.identity for p in hub.live_peers()] == [again.identity] and hub.num_refused == 0
    again.close()
    await asyncio.wait_for(again_task, 5)
    hung.close(linger=0)
    await hub.close()


# -- loud failures


async def test_a_hub_that_never_answers_gets_one_warning_per_outage(unused_tcp_port, ctx, caplog, monkeypatch):
    monkeypatch.setattr("zdyn.rpc.spoke.SILENT_WARNING_S", 0.3)
    spoke = Spoke([f"tcp://127.0.0.1:{unused_tcp_port}"], Ready(peer_id="w", role="worker"), _serve,
                  liveness=Liveness(0.05, 2), ctx=ctx)  # fmt: skip
    caplog.set_level(logging.INFO, "zdyn.rpc.spoke")
    task = asyncio.create_task(spoke.run())
    await asyncio.sleep(1.0)
    assert spoke.links[0].warned
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
    spoke.close()
    await asyncio.wait_for(task, 5)


def test_prefill_workers_read_their_own_config_section():
    config = EXAMPLES / "disagg_route" / "config.yaml"
    argv = ["-f", str(config), "--engine", "mocker"]
    decode = worker.WorkerConfig.from_args(parse_args(worker.build_parser("mocker"), argv, *worker.sections(argv)))
    assert decode.disagg.prefill_queue == "tcp://127.0.0.1:5590" and len(decode.hubs) == 2
    argv.append("--prefill")
    prefill = worker.WorkerConfig.from_args(parse_args(worker.build_parser("mocker"), argv, *worker.sections(argv)))
    assert prefill.disagg.prefill and prefill.disagg.prefill_queue is None
    assert prefill.hubs == ["tcp://127.0.0.1:5591"]


async def test_a_router_that_never_answered_is_counted_and_shown(unused_tcp_port, ctx):
    client = RouterClient(f"tcp://127.0.0.1:{unused_tcp_port}", timeout_s=0.05, backoff_s=0.0, ctx=ctx)
    assert await client.route(RouteQuery(request_id="q", token_ids=[1])) is None
    assert client.failures == 1 and client.answers == 0 and client.status == "never answered"
    await client.aclose()


def test_health_lists_every_role_with_its_host():
    workers = [
        {"id": "d0", "host": "10.0.0.2", "prefill_queues": [
            {"endpoint": "tcp://10.0.0.1:5590", "live": True, "queued": 0, "prefill_workers": ["p0@10.0.0.3"]}]},
        {"id": "d1", "host": "10.0.0.2", "prefill_queues": [
            {"endpoint": "tcp://10.0.0.1:5590"}]},  # defaults left out, as msgspec.to_builtins does
    ]  # fmt: skip
    routers = [{"endpoint": "tcp://10.0.0.1:5570", "status": "answering"}]
    view = topology(workers, [{"id": "proc", "host": "10.0.0.1"}], routers)
    assert view["hosts"] == {
        "10.0.0.1": ["prefill-queue tcp://10.0.0.1:5590", "processor proc", "router tcp://10.0.0.1:5570"],
        "10.0.0.2": ["worker d0", "worker d1"],
        "10.0.0.3": ["prefill-worker p0"],
    }
    (queue,) = view["prefill_queues"]
    assert queue["live"] and queue["decode_workers"] == ["d0", "d1"] and queue["prefill_workers"] == ["p0@10.0.0.3"]
    assert view["prefill_workers"] == [{"id": "p0", "host": "10.0.0.3"}]


# -- discovery


def test_directory_book_learns_its_endpoint_dedupes_hubs_and_forgets_announcements():
    me = HubEntry(hub_id="p1", kind="processor")
    book = DirectoryBook(me)
    assert book.entries() == [me]
    p2_local = HubEntry(hub_id="p2", endpoint="tcp://127.0.0.1:5600", kind="processor")
    p2_remote = HubEntry(hub_id="p2", endpoint="tcp://10.0.0.1:5600", kind="processor")
    mine = HubEntry(hub_id="p1", endpoint="tcp://10.0.0.9:5556")
    assert book.report(b"w1", [HubEntry(hub_id="p1", endpoint="tcp://127.0.0.1:5556"), p2_local])
    assert book.me.endpoint == "tcp://127.0.0.1:5556"
    assert book.report(b"w2", [mine, p2_remote])  # another host dials both: its addresses win
    assert [e.endpoint for e in book.entries()] == ["tcp://10.0.0.9:5556", "tcp://10.0.0.1:5600"]
    assert not book.report(b"w2", [mine, p2_remote])  # the same report again changes nothing
    assert book.forget(b"w2") and book.entries()[1] == p2_local
    router = HubEntry(hub_id="r", endpoint="tcp://10.0.0.2:5571", kind="router")
    assert book.announce(router, now=0.0) and not book.announce(router, now=1.0)
    assert router in book.entries()
    assert not book.expire(now=5.0) and book.expire(now=100.0) and router not in book.entries()


def test_loopback_endpoints_are_usable_only_from_the_same_host():
    assert usable_from("tcp://127.0.0.1:5556", via="tcp://127.0.0.1:5555")
    assert not usable_from("tcp://127.0.0.1:5556", via="tcp://10.0.0.1:5555")
    assert usable_from("tcp://10.0.0.1:5556", via="tcp://127.0.0.1:5555")
    assert not usable_from("", via="tcp://127.0.0.1:5555")


async def _hub(ctx, kind, role="worker", seeds=None):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    hub = Hub(f"tcp://127.0.0.1:{port}", role=role, liveness=FAST, ctx=ctx)
    directory = HubDirectory(hub, kind, seeds=seeds, ctx=ctx)
    await hub.start()
    directory.start()
    return hub, directory


async def _until(check, timeout_s=10.0):
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def test_a_worker_that_knows_one_hub_joins_the_others_and_new_ones_without_a_restart(ctx, monkeypatch):
    monkeypatch.setattr("zdyn.rpc.directory.ANNOUNCE_S", 0.1)
    monkeypatch.setattr("zdyn.rpc.directory.FORGET_AFTER_S", 1.0)
    first, first_dir = await _hub(ctx, "frontend")
    router, router_dir = await _hub(ctx, "router", seeds=[first.endpoint])
    queue, queue_dir = await _hub(ctx, "prefill-queue", role="prefill", seeds=[first.endpoint])
    worker = Spoke([first.endpoint], Ready(peer_id="w", role="worker", model="m"), _serve, liveness=FAST, ctx=ctx)
    discovery = SpokeDiscovery(worker, model="m", ctx=ctx)
    fixed = Spoke([first.endpoint], Ready(peer_id="f", role="worker", model="m"), _serve, liveness=FAST, ctx=ctx)
    tasks = [asyncio.create_task(s.run()) for s in (worker, fixed)]
    discovery.start()
    await _until(lambda: {p.id for p in router.live_peers()} == {"w"})
    # a processor started later, seeded with the router, is joined too; the prefill queue takes prefill workers only
    late, late_dir = await _hub(ctx, "processor", seeds=[router.endpoint])
    await _until(lambda: [p.id for p in late.live_peers()] == ["w"])
    assert discovery.joined == 2 and not queue.live_peers()
    assert {p.id for p in first.live_peers()} == {"w", "f"}  # a spoke without discovery stays where it was put
    # every hub's directory lists every hub, each with the endpoint its peers dial
    await _until(lambda: {e.hub_id for e in first_dir.book.entries()} >= {router_dir.hub_id, late_dir.hub_id})
    assert first_dir.book.me.endpoint == first.endpoint
    # a discovered hub that goes away is left after FORGET_AFTER_S; a configured one is kept
    await late_dir.close()
    await late.close()
    await _until(lambda: discovery.left == 1 and not worker.linked(late.endpoint))
    assert worker.linked(first.endpoint) and worker.linked(router.endpoint)
    for spoke in (worker, fixed):
        spoke.close()
    await asyncio.wait_for(asyncio.gather(*tasks), 5)
    await discovery.close()
    for d, h in ((first_dir, first), (router_dir, router), (queue_dir, queue)):
        await d.close()
        await h.close()


async def test_a_worker_learns_the_hubs_from_a_seed_it_does_not_register_at(ctx):
    processor_hub, processor_dir = await _hub(ctx, "processor")
    queue, queue_dir = await _hub(ctx, "prefill-queue", role="prefill")
    prefill = Spoke([queue.endpoint], Ready(peer_id="p", role="prefill", model="m"), _serve, liveness=FAST, ctx=ctx)
    other = HubEntry(hub_id="q2", endpoint=processor_hub.endpoint, accepts="worker")
    discovery = SpokeDiscovery(prefill, model="m", seeds=[processor_hub.endpoint], ctx=ctx)
    task = asyncio.create_task(prefill.run())
    discovery.start()
    await _until(lambda: [p.id for p in queue.live_peers()] == ["p"])
    await _until(lambda: processor_dir.book.entries() and discovery.known)
    discovery.on_directory(queue.endpoint, Directory(hubs=[other]))  # a hub for another role: not joined
    assert not processor_hub.live_peers() and discovery.joined == 0
    prefill.close()
    await asyncio.wait_for(task, 5)
    await discovery.close()
    for d, h in ((processor_dir, processor_hub), (queue_dir, queue)):
        await d.close()
        await h.close()


async def test_a_worker_registers_with_its_data_parallel_rank(unused_tcp_port, tiny_model):
    endpoint = f"tcp://127.0.0.1:{unused_tcp_port}"
    hub = Hub(endpoint, role="worker", liveness=FAST)
    await hub.start()
    config = worker_config("--model", str(tiny_model), "--connect", endpoint, "--no-kv-events", "--no-discover")
    w = Worker(worker.make_engine(config), [endpoint], "rank1", liveness=FAST, discover=False, data_parallel_rank=1)
    task = asyncio.create_task(w.run())
    await hub.wait_for_peers(1, timeout_s=20)
    assert hub.live_peers()[0].ready.data_parallel_rank == 1
    w.close()
    assert await asyncio.wait_for(task, 10) == 0
    await hub.close()
