"""CURVE keys, role allow-lists, identities that belong to their run, registration limits (in-process).

Each "process" gets its own ZeroMQ context with its own keys installed, as a real deployment would.
"""

import asyncio

import pytest
import zmq
import zmq.asyncio

from zdyn import security
from zdyn.protocol import Delta, Finish, Generate, Ready, Refused, decode, encode
from zdyn.roles import keys as keys_cli
from zdyn.rpc import Hub, RefusedError, Spoke
from zdyn.rpc.metrics import RefusalCollector
from zdyn.transport import Liveness, make_socket

FAST = Liveness(interval_s=0.1, misses=3)


@pytest.fixture(scope="module")
def keys_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keys")
    security.generate(folder)
    return folder


@pytest.fixture
def endpoint(unused_tcp_port):
    return f"tcp://127.0.0.1:{unused_tcp_port}"


@pytest.fixture
async def contexts():
    made = []

    def context(role=None, folder=None):
        ctx = zmq.asyncio.Context()
        made.append(ctx)
        if role is not None:
            security.install(ctx, security.Curve(security.KeyFolder(folder), role))
        return ctx

    yield context
    for ctx in made:
        security.uninstall(ctx)
        ctx.destroy(linger=0)


async def echo(request):
    yield Delta(request_id=request.request_id, token_ids=[7], finish=Finish(reason="length", completion_tokens=1))


def ready(peer_id="w1", role="worker"):
    return Ready(peer_id=peer_id, role=role, model="m")


async def run_until_refused(spoke, timeout_s=5.0):
    with pytest.raises(RefusedError) as refused:
        await asyncio.wait_for(spoke.run(), timeout_s)
    return str(refused.value)


# -- keys


def test_generate_list_and_add(tmp_path, capsys):
    folder = tmp_path / "k"
    assert keys_cli.main(["generate", str(folder)]) == 0
    assert set(security.generate(folder)) == set()  # nothing missing the second time
    assert (folder.stat().st_mode & 0o777) == 0o700
    assert (folder / "worker.key_secret").stat().st_mode & 0o077 == 0
    worker_key = security.KeyFolder(folder).keypair("worker").public
    other = tmp_path / "other"
    security.generate(other, ["worker"])
    assert keys_cli.main(["add", "--dir", str(folder), "worker", "hostb", str(other / "worker.key")]) == 0
    keys = security.KeyFolder(folder)
    assert keys.public_keys("worker") == {worker_key, keys.keypair("worker").public, _public(other / "worker.key")}
    assert keys.public_keys("processor") == {keys.keypair("processor").public}
    capsys.readouterr()
    assert keys_cli.main(["list", str(folder)]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert len(listing) == 1 + len(security.ROLES) + 1 and any("worker-hostb" in line for line in listing)
    assert keys_cli.main(["add", "--dir", str(folder), "worker", "bad", "not-a-key"]) == 2


def _public(path):
    import zmq.auth

    return zmq.auth.load_certificate(path)[0]


def test_missing_keys_are_a_setting_to_fix(tmp_path):
    with pytest.raises(security.KeysError):
        security.KeyFolder(tmp_path / "none")
    security.generate(tmp_path, ["server"])
    with pytest.raises(security.KeysError):
        security.Curve(security.KeyFolder(tmp_path), "worker")


def test_listening_beyond_loopback_needs_keys_or_insecure():
    assert security.is_local("tcp://127.0.0.1:5555") and security.is_local("ipc:///tmp/x")
    assert security.is_local("tcp://[::1]:5555") and security.is_local("tcp://localhost:1")
    assert not security.is_local("tcp://*:5555") and not security.is_local("tcp://10.0.0.1:5555")
    settings = security.SecuritySettings()
    assert settings.check_binds("zdyn x", ["tcp://127.0.0.1:5555"]) == []
    with pytest.raises(security.KeysError):
        settings.check_binds("zdyn x", ["tcp://*:5555"])
    assert len(security.SecuritySettings(insecure=True).check_binds("zdyn x", ["tcp://*:5555"])) == 1
    assert security.SecuritySettings(keys_dir="/k").check_binds("zdyn x", ["tcp://*:5555"]) == []


def test_a_role_refuses_to_listen_openly_without_keys(capsys, monkeypatch):
    from zdyn.roles import router

    monkeypatch.delenv(security.KEYS_DIR_ENV, raising=False)
    monkeypatch.delenv(security.INSECURE_ENV, raising=False)
    assert router.main(["--endpoint", "tcp://*:5570"]) == 2
    assert "--insecure" in capsys.readouterr().err


# -- CURVE on hubs and spokes


async def test_keyed_worker_registers_and_is_served(keys_dir, endpoint, contexts):
    hub = Hub(endpoint, role="worker", liveness=FAST, ctx=contexts("frontend", keys_dir))
    await hub.start()
    spoke = Spoke([endpoint], ready(), echo, liveness=FAST, ctx=contexts("worker", keys_dir))
    task = asyncio.create_task(spoke.run())
    try:
        await hub.wait_for_peers(1, timeout_s=5)
        deltas = [d async for d in hub.stream(hub.live_peers()[0], Generate(request_id="r", token_ids=[1]))]
        assert deltas[-1].token_ids == [7]
    finally:
        spoke.close()
        await asyncio.wait_for(task, 5)
        await hub.close()


async def test_rogue_worker_without_a_key_gets_nothing(keys_dir, endpoint, contexts):
    hub = Hub(endpoint, role="worker", liveness=FAST, ctx=contexts("frontend", keys_dir))
    await hub.start()
    rogue = make_socket(contexts(), zmq.DEALER, endpoint, bind=False)  # no keys: a plain connection
    try:
        for _ in range(3):
            await rogue.send_multipart(encode(ready("rogue")))
        assert await rogue.poll(1000) == 0  # not even a Refused: the handshake never completes
        assert hub.live_peers() == [] and hub.num_refused == 0
    finally:
        rogue.close(linger=0)
        await hub.close()


async def test_a_key_of_another_deployment_is_refused(keys_dir, tmp_path, endpoint, contexts):
    hub_ctx = contexts("frontend", keys_dir)
    hub = Hub(endpoint, role="worker", liveness=FAST, ctx=hub_ctx)
    await hub.start()
    stranger = tmp_path / "stranger"
    security.generate(stranger, ["worker"])
    curve = security.curve_of(hub_ctx)
    rogue_ctx = contexts()
    sock = rogue_ctx.socket(zmq.DEALER)
    own = security.KeyFolder(stranger).keypair("worker")
    sock.curve_serverkey = security.KeyFolder(keys_dir).keypair("server").public  # it knows the server's key
    sock.curve_publickey, sock.curve_secretkey = own.public, own.secret
    sock.connect(endpoint)
    try:
        await sock.send_multipart(encode(ready("stranger")))
        assert await sock.poll(1000) == 0
        assert hub.live_peers() == [] and curve.num_refused >= 1
    finally:
        sock.close(linger=0)
        await hub.close()


async def test_a_worker_key_cannot_register_as_a_processor(keys_dir, endpoint, contexts):
    frontend_ctx = contexts("frontend", keys_dir)
    hub = Hub(endpoint, role="processor", liveness=FAST, ctx=frontend_ctx)
    await hub.start()
    spoke = Spoke([endpoint], ready("p1", role="processor"), echo, liveness=FAST, ctx=contexts("worker", keys_dir))
    task = asyncio.create_task(spoke.run())
    try:
        for _ in range(50):
            if security.curve_of(frontend_ctx).num_refused:
                break
            await asyncio.sleep(0.05)
        assert security.curve_of(frontend_ctx).refused["processor"] >= 1
        assert hub.live_peers() == []
        metrics = {m.name: m for m in RefusalCollector([hub], frontend_ctx).collect()}
        assert [s.value for s in metrics["zdyn_refused_keys"].samples if s.labels["admits"] == "processor"][0] >= 1
    finally:
        spoke.close()
        await asyncio.wait_for(task, 5)
        await hub.close()


# -- identities and limits (the same with or without keys)


async def test_hijacking_a_live_id_is_refused_and_the_owner_keeps_it(endpoint, contexts):
    ctx = contexts()
    hub = Hub(endpoint, role="worker", liveness=FAST, ctx=ctx)
    await hub.start()
    owner = Spoke([endpoint], ready("worker0"), echo, liveness=FAST, ctx=ctx)
    owner_task = asyncio.create_task(owner.run())
    try:
        await hub.wait_for_peers(1, timeout_s=5)
        thief = Spoke([endpoint], ready("worker0"), echo, liveness=FAST, ctx=ctx)
        reason = await run_until_refused(thief)
        assert "worker0" in reason and "in use" in reason
        assert hub.num_hijacks == 1
        await asyncio.sleep(0.5)
        [peer] = hub.live_peers()
        assert peer.ready.instance == owner.ready.instance
        deltas = [d async for d in hub.stream(peer, Generate(request_id="r", token_ids=[1]))]
        assert deltas[-1].token_ids == [7]
    finally:
        owner.close()
        await asyncio.wait_for(owner_task, 5)
        await hub.close()


async def test_a_run_reconnecting_on_a_new_socket_takes_its_id_back(endpoint, contexts):
    ctx = contexts()
    hub = Hub(endpoint, role="worker", liveness=FAST, ctx=ctx)
    await hub.start()
    first = make_socket(ctx, zmq.DEALER, endpoint, bind=False, identity=b"~a")
    second = make_socket(ctx, zmq.DEALER, endpoint, bind=False, identity=b"~b")
    me = Ready(peer_id="w", role="worker", model="m", instance="run1")
    try:
        await first.send_multipart(encode(me))
        await hub.wait_for_peers(1, timeout_s=5)
        await second.send_multipart(encode(Ready(peer_id="w", role="worker", model="m", instance="run1", session=1)))
        for _ in range(50):
            if hub.live_peers()[0].identity == b"~b":
                break
            await asyncio.sleep(0.02)
        assert [p.identity for p in hub.live_peers()] == [b"~b"] and hub.num_refused == 0
    finally:
        first.close(linger=0)
        second.close(linger=0)
        await hub.close()


async def test_registrations_past_max_peers_are_refused_and_counted(endpoint, contexts):
    ctx = contexts()
    hub = Hub(endpoint, role="worker", liveness=Liveness(5, 3), ctx=ctx, max_peers=3)
    await hub.start()
    fakes = [make_socket(ctx, zmq.DEALER, endpoint, bind=False) for _ in range(40)]
    try:
        for i, sock in enumerate(fakes):
            await sock.send_multipart(encode(ready(f"fake{i}")))

        async def refused(sock: zmq.asyncio.Socket) -> bool:  # the 3 accepted hear nothing: wait for all at once
            return bool(await sock.poll(2000)) and isinstance(decode(await sock.recv_multipart()), Refused)

        refusals = sum(await asyncio.gather(*(refused(sock) for sock in fakes)))
        assert len(hub.live_peers()) == 3
        assert hub.num_refused == 37 and refusals >= 37
        [family, _] = RefusalCollector([hub], ctx).collect()
        assert {s.labels["reason"]: s.value for s in family.samples} == {"id_in_use": 0, "other": 37}
    finally:
        for sock in fakes:
            sock.close(linger=0)
        await hub.close()


async def test_bad_frames_are_counted_not_fatal(endpoint, contexts):
    ctx = contexts()
    hub = Hub(endpoint, role="worker", liveness=FAST, ctx=ctx)
    await hub.start()
    sock = make_socket(ctx, zmq.DEALER, endpoint, bind=False)
    try:
        await sock.send_multipart([b"\x99", b"junk"])
        await sock.send_multipart([b"\x01"])
        await sock.send_multipart([b"\x01", b"\xc1"])
        for _ in range(50):
            if hub.malformed.count >= 3:
                break
            await asyncio.sleep(0.02)
        assert hub.malformed.count == 3
    finally:
        sock.close(linger=0)
        await hub.close()


async def test_frames_beyond_the_maximum_message_size_drop_the_connection(endpoint, contexts):
    ctx = contexts()
    hub = Hub(endpoint, role="worker", liveness=FAST, ctx=ctx)
    await hub.start()
    sock = make_socket(ctx, zmq.DEALER, endpoint, bind=False)
    other = make_socket(ctx, zmq.DEALER, endpoint, bind=False)
    try:
        await sock.send_multipart([b"\x01", b"x" * (65 << 20)])  # would be a malformed READY if it got through
        await asyncio.sleep(0.5)
        await other.send_multipart(encode(ready("after")))
        await hub.wait_for_peers(1, timeout_s=5)
        assert hub.malformed.count == 0
    finally:
        sock.close(linger=0)
        other.close(linger=0)
        await hub.close()


# -- KV events: relayed off the host over CURVE


async def test_kv_events_cannot_be_read_without_a_reader_key(keys_dir, tmp_path, contexts):
    from zdyn.kv_events import KvBlockStored, decode_frames
    from zdyn.kv_publisher import KvEventPublisher, KvEventRelay, fetch_replay

    worker_ctx = contexts("worker", keys_dir)
    engine = KvEventPublisher(f"ipc://{tmp_path}/events", replay_endpoint=f"ipc://{tmp_path}/replay", ctx=worker_ctx)
    relay = KvEventRelay(engine.endpoint, engine.replay_endpoint or "", "tcp://127.0.0.1:*", "tcp://127.0.0.1:*",
                         ctx=worker_ctx)  # fmt: skip
    await engine.start()
    await relay.start()
    router = make_socket(contexts("router", keys_dir), zmq.SUB, relay.endpoint, bind=False)
    other_worker = make_socket(contexts("worker", keys_dir), zmq.SUB, relay.endpoint, bind=False)
    stranger = make_socket(contexts(), zmq.SUB, relay.endpoint, bind=False)
    try:
        await asyncio.sleep(0.3)  # subscriptions travel
        stored = KvBlockStored(block_hashes=[1], parent_hash=None, token_ids=[5, 6], block_size=2)
        for _ in range(3):
            await engine.publish([stored])
        batch = decode_frames(await asyncio.wait_for(router.recv_multipart(), 5))
        assert batch.events[0].token_ids == [5, 6]
        assert await stranger.poll(500) == 0 and await other_worker.poll(100) == 0  # no key; a worker's key
        assert relay.forwarded == 3
        replayed = await fetch_replay(contexts("processor", keys_dir), relay.replay_endpoint, 0)
        assert [seq for seq, _ in replayed] == [0, 1, 2]
        assert security.curve_of(worker_ctx).num_refused >= 1
    finally:
        for sock in (router, other_worker, stranger):
            sock.close(linger=0)
        await relay.close()
        await engine.close()


async def test_an_id_belongs_to_the_key_that_took_it_or_the_one_listed_for_it(tmp_path, endpoint, contexts):
    import shutil

    main, other = tmp_path / "main", tmp_path / "other"
    security.generate(main)
    security.generate(other, ["worker"])  # a second host's own worker keypair, its public key added as "hostb"
    for name in ("server.key", "server.key_secret"):
        shutil.copy(main / name, other / name)
    security.add_public_key(main, "worker", "hostb", str(other / "worker.key"))
    security.add_public_key(main, "worker", "w9", str(other / "worker.key"))  # id w9 is listed for hostb's key
    hub = Hub(endpoint, role="worker", liveness=FAST, ctx=contexts("frontend", main))
    await hub.start()

    def spoke(peer_id, folder):
        return Spoke([endpoint], ready(peer_id), echo, liveness=FAST, ctx=contexts("worker", folder))

    try:
        first = spoke("w1", main)
        task = asyncio.create_task(first.run())
        await hub.wait_for_peers(1, timeout_s=5)
        first.close()
        await asyncio.wait_for(task, 5)
        for _ in range(50):  # its connection closed: the id is free, but stays its key's
            if not hub.live_peers():
                break
            await asyncio.sleep(0.05)
        assert "another key" in await run_until_refused(spoke("w1", other))
        assert "listed" in await run_until_refused(spoke("w9", main))
        listed = spoke("w9", other)
        task = asyncio.create_task(listed.run())
        await hub.wait_for_peers(1, timeout_s=5)
        assert [p.id for p in hub.live_peers()] == ["w9"] and hub.num_refused == 2
        listed.close()
        await asyncio.wait_for(task, 5)
    finally:
        await hub.close()
