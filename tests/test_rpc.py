"""Transport and streaming RPC on real ZeroMQ sockets over loopback."""

import asyncio
import os
import signal
import sys
import textwrap
import time

import pytest
import zmq
import zmq.asyncio
from helpers import FAST, eventually

from zdyn.errors import RequestError
from zdyn.protocol import (
    Cancel,
    Delta,
    Finish,
    Generate,
    Heartbeat,
    Outputs,
    Ready,
    Refused,
    decode,
)
from zdyn.rpc import Hub, RefusedError, Spoke
from zdyn.transport import Liveness, TransportError, make_socket, send


@pytest.fixture
def endpoint(tcp_endpoint):
    return tcp_endpoint()


def ready(peer_id="w1", **kw):
    return Ready(peer_id=peer_id, role="worker", model="m", **kw)


async def counting(request, n=3, delay=0.0):
    for i in range(n):
        if delay:
            await asyncio.sleep(delay)
        yield Delta(request_id=request.request_id, token_ids=[i])
    yield Delta(request_id=request.request_id, token_ids=[n], finish=Finish(reason="length", completion_tokens=n + 1))


async def start_pair(endpoint, handler, ctx, liveness=FAST, **hub_kw):
    hub = Hub(endpoint, role="worker", liveness=liveness, ctx=ctx, **hub_kw)
    await hub.start()
    spoke = Spoke([endpoint], ready(), handler, liveness=liveness, ctx=ctx)
    task = asyncio.create_task(spoke.run())
    await hub.wait_for_peers(1, timeout_s=5)
    return hub, spoke, task


async def stop_pair(hub, spoke, task):
    spoke.close()
    await asyncio.wait_for(task, 5)
    await hub.close()


async def test_stream_round_trip(endpoint, ctx):
    hub, spoke, task = await start_pair(endpoint, counting, ctx)
    peer = hub.live_peers()[0]
    assert peer.id == "w1" and peer.ready.model == "m"
    deltas = [d async for d in hub.stream(peer, Generate(request_id="r1", token_ids=[1]))]
    assert [t for d in deltas for t in d.token_ids] == [0, 1, 2, 3]
    assert deltas[-1].finish == Finish(reason="length", completion_tokens=4)
    assert all(d.finish is None for d in deltas[:-1])
    results = await asyncio.gather(
        *[_collect(hub, peer, f"c{i}") for i in range(100)]
    )  # concurrent streams stay separate
    assert all(r == [0, 1, 2, 3] for r in results)
    assert peer.num_inflight == 0
    assert spoke.outcomes == {"finished": 101} and not spoke.cancels
    await stop_pair(hub, spoke, task)


async def _collect(hub, peer, rid):
    return [t async for d in hub.stream(peer, Generate(request_id=rid, token_ids=[1])) for t in d.token_ids]


async def test_deltas_of_one_loop_turn_travel_as_one_message(endpoint, ctx):
    router = make_socket(ctx, zmq.ROUTER, endpoint)
    spoke = Spoke([endpoint], ready(), counting, liveness=Liveness(5.0, 3), ctx=ctx)
    task = asyncio.create_task(spoke.run())
    identity, *frames = await asyncio.wait_for(router.recv_multipart(), 5)
    assert isinstance(decode(frames), Ready)
    await send(router, Generate(request_id="r", token_ids=[1]), identity)
    identity, *frames = await asyncio.wait_for(router.recv_multipart(), 5)
    batch = decode(frames)
    assert isinstance(batch, Outputs)
    assert [d.token_ids for d in batch.deltas] == [[0], [1], [2], [3]]  # no await between them: one message
    spoke.close()
    await task
    router.close()


async def test_cancel_reaches_the_handler(endpoint, ctx):
    cancelled = asyncio.Event()

    async def endless(request):
        try:
            i = 0
            while True:
                await asyncio.sleep(0.01)
                yield Delta(request_id=request.request_id, token_ids=[i])
                i += 1
        except asyncio.CancelledError:
            cancelled.set()
            raise

    hub, spoke, task = await start_pair(endpoint, endless, ctx)
    stream = hub.stream(hub.live_peers()[0], Generate(request_id="r", token_ids=[1]))
    assert (await anext(stream)).token_ids == [0]
    await stream.aclose()  # the client went away
    await asyncio.wait_for(cancelled.wait(), 2)
    assert spoke.num_requests == 0
    assert spoke.cancels == {"in_flight": 1} and spoke.outcomes == {"cancelled": 1}
    await stop_pair(hub, spoke, task)


async def test_a_cancel_after_the_end_is_counted_and_changes_nothing(endpoint, ctx):
    hub, spoke, task = await start_pair(endpoint, counting, ctx)
    peer = hub.live_peers()[0]
    assert await _collect(hub, peer, "r") == [0, 1, 2, 3]
    await send(hub._sock, Cancel(request_id="r"), peer.identity)  # crossed the finished stream on the wire
    await send(hub._sock, Cancel(request_id="never-sent"), peer.identity)
    await eventually(lambda: spoke.cancels["after_end"] == 2)
    assert spoke.cancels == {"after_end": 2} and spoke.outcomes == {"finished": 1}
    await stop_pair(hub, spoke, task)


async def test_silent_peer_is_declared_dead_and_its_requests_fail(endpoint, ctx):
    hub = Hub(endpoint, role="worker", liveness=FAST, ctx=ctx)
    await hub.start()
    dealer = make_socket(ctx, zmq.DEALER, endpoint, identity=b"silent")
    await send(dealer, ready("silent"))
    await hub.wait_for_peers(1, timeout_s=5)
    started = time.monotonic()
    with pytest.raises(RequestError) as failed:
        async for _ in hub.stream(hub.live_peers()[0], Generate(request_id="r", token_ids=[1])):
            pass
    elapsed = time.monotonic() - started
    assert failed.value.status == 503
    assert "silent" in failed.value.message
    assert failed.value.type == "peer_lost"  # not the request's fault: a processor re-issues it elsewhere
    assert elapsed < FAST.silence_s + 0.5  # an app silent (its libzmq still answers pings) for silence_s is stuck
    assert hub.live_peers() == []
    dealer.close()
    await hub.close()


SPOKE_SCRIPT = textwrap.dedent(
    """
    import asyncio, sys
    from zdyn.protocol import Delta, Ready
    from zdyn.rpc import Spoke
    from zdyn.transport import Liveness

    async def endless(request):
        i = 0
        while True:
            await asyncio.sleep(0.01)
            yield Delta(request_id=request.request_id, token_ids=[i])
            i += 1

    spoke = Spoke([sys.argv[1]], Ready(peer_id="victim", role="worker"), endless, liveness=Liveness(10.0, 3))
    asyncio.run(spoke.run())
    """
)


async def test_killed_peer_fails_its_streams_before_heartbeat_expiry(endpoint, ctx):
    slow = Liveness(interval_s=10.0, misses=3)  # expiry 30 s: only disconnect detection can be this fast
    hub = Hub(endpoint, role="worker", liveness=slow, ctx=ctx)
    await hub.start()
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", SPOKE_SCRIPT, endpoint)
    try:
        await hub.wait_for_peers(1, timeout_s=20)
        stream = hub.stream(hub.live_peers()[0], Generate(request_id="r", token_ids=[1]))
        await anext(stream)
        os.kill(proc.pid, signal.SIGKILL)
        started = time.monotonic()
        with pytest.raises(RequestError) as failed:
            async for _ in stream:
                pass
        assert time.monotonic() - started < 2.0
        assert failed.value.status == 503
        assert hub.live_peers() == []
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        await hub.close()


async def test_other_protocol_version_is_refused(endpoint, ctx, caplog):
    hub = Hub(endpoint, role="worker", liveness=FAST, ctx=ctx)
    await hub.start()
    dealer = make_socket(ctx, zmq.DEALER, endpoint, identity=b"old")
    await send(dealer, ready("old", protocol_version=99))
    reply = decode(await asyncio.wait_for(dealer.recv_multipart(), 5))
    assert isinstance(reply, Refused) and "protocol version 99" in reply.reason
    assert hub.live_peers() == []
    assert "refused worker old" in caplog.text
    dealer.close()

    spoke = Spoke([endpoint], ready("old2", protocol_version=99), counting, liveness=FAST, ctx=ctx)
    with pytest.raises(RefusedError, match="protocol version 99"):
        await asyncio.wait_for(spoke.run(), 5)
    await hub.close()


async def test_wrong_role_and_custom_check_are_refused(endpoint, ctx):
    hub = Hub(endpoint, role="worker", liveness=FAST, ctx=ctx, accept=lambda r: None if r.model == "m" else "model")
    await hub.start()
    for bad in (Ready(peer_id="p", role="processor", model="m"), Ready(peer_id="x", role="worker", model="other")):
        spoke = Spoke([endpoint], bad, counting, liveness=FAST, ctx=ctx)
        with pytest.raises(RefusedError):
            await asyncio.wait_for(spoke.run(), 5)
    assert hub.live_peers() == []
    await hub.close()


async def test_malformed_frames_are_dropped_and_counted(endpoint, ctx):
    hub, spoke, task = await start_pair(endpoint, counting, ctx)
    dealer = make_socket(ctx, zmq.DEALER, endpoint, identity=b"junk")
    for frames in ([b"\x7f", b"x"], [b"only-one-frame"], [b"\x11", b"\xc1\xc1"], [b"\x03", b"\x93\x01\x02\x03"]):
        await dealer.send_multipart(frames)
    await send(dealer, Cancel(request_id="nobody"))  # valid, but not something a worker sends
    for _ in range(100):
        if hub.malformed.count >= 5:
            break
        await asyncio.sleep(0.02)
    assert hub.malformed.count == 5
    deltas = [d async for d in hub.stream(hub.live_peers()[0], Generate(request_id="r", token_ids=[1]))]
    assert deltas[-1].finish is not None  # still serving
    dealer.close()
    await stop_pair(hub, spoke, task)


async def test_high_water_mark_blocks_instead_of_dropping(endpoint, ctx):
    router = make_socket(ctx, zmq.ROUTER, endpoint, hwm=4)
    dealer = make_socket(ctx, zmq.DEALER, endpoint, identity=b"slow", hwm=4)
    await send(dealer, Heartbeat())
    identity, *_ = await router.recv_multipart()
    n = 2000
    sends = [send(router, Cancel(request_id=str(i)), identity) for i in range(n)]
    assert not all(s.done() for s in sends)  # the HWM made later sends wait rather than vanish
    received = []
    while len(received) < n:
        received.append(decode(await asyncio.wait_for(dealer.recv_multipart(), 5)).request_id)
        if len(received) % 100 == 0:
            await asyncio.sleep(0.001)  # a slow reader
    await asyncio.gather(*sends)
    assert received == [str(i) for i in range(n)]
    router.close()
    dealer.close()


async def test_sending_to_an_unknown_peer_is_an_error_not_a_silent_drop(endpoint, ctx):
    router = make_socket(ctx, zmq.ROUTER, endpoint)
    with pytest.raises(zmq.ZMQError) as err:
        await send(router, Cancel(request_id="x"), b"nobody")
    assert err.value.errno == zmq.EHOSTUNREACH
    router.close()


def test_bad_endpoints_are_reported(ctx):
    with pytest.raises(TransportError, match="must start with"):
        make_socket(ctx, zmq.DEALER, "localhost:5555")
    sock = make_socket(ctx, zmq.ROUTER, "tcp://127.0.0.1:0")
    port = sock.getsockopt(zmq.LAST_ENDPOINT).decode().rsplit(":", 1)[1]
    with pytest.raises(TransportError, match="cannot bind"):
        make_socket(ctx, zmq.ROUTER, f"tcp://127.0.0.1:{port}")
    sock.close()


async def test_ipc_endpoints_work(tmp_path, ctx):
    endpoint = f"ipc://{tmp_path}/hub.sock"
    hub, spoke, task = await start_pair(endpoint, counting, ctx)
    deltas = [d async for d in hub.stream(hub.live_peers()[0], Generate(request_id="r", token_ids=[1]))]
    assert sum(len(d.token_ids) for d in deltas) == 4
    await stop_pair(hub, spoke, task)


async def test_spoke_reregisters_with_a_restarted_hub(endpoint, ctx):
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def endless(request):
        started.set()
        try:
            await asyncio.sleep(3600)
            yield Delta(request_id=request.request_id)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    hub, spoke, task = await start_pair(endpoint, endless, ctx)
    stream = hub.stream(hub.live_peers()[0], Generate(request_id="r", token_ids=[1]))
    pending = asyncio.ensure_future(anext(stream))
    await asyncio.wait_for(started.wait(), 2)
    await hub.close()  # the hub process "dies"
    with pytest.raises(RequestError):
        await pending
    await asyncio.wait_for(cancelled.wait(), 3)  # the spoke gave up on the dead hub's request

    hub2 = Hub(endpoint, role="worker", liveness=FAST, ctx=ctx)
    await hub2.start()
    await hub2.wait_for_peers(1, timeout_s=3)
    spoke.handler = counting
    deltas = [d async for d in hub2.stream(hub2.live_peers()[0], Generate(request_id="r2", token_ids=[1]))]
    assert sum(len(d.token_ids) for d in deltas) == 4
    await stop_pair(hub2, spoke, task)


async def test_idle_request_times_out(endpoint, ctx):
    async def stuck(request):
        await asyncio.sleep(3600)
        yield Delta(request_id=request.request_id)

    # liveness well beyond the idle timeout: a loaded box must not turn this into a heartbeat expiry (503)
    hub, spoke, task = await start_pair(endpoint, stuck, ctx, liveness=Liveness(0.1, 50), idle_timeout_s=0.3)
    with pytest.raises(RequestError) as failed:
        async for _ in hub.stream(hub.live_peers()[0], Generate(request_id="r", token_ids=[1])):
            pass
    assert failed.value.status == 504
    await stop_pair(hub, spoke, task)


async def test_handler_errors_become_error_replies(endpoint, ctx):
    from zdyn.errors import RequestError

    async def picky(request):
        yield Delta(request_id=request.request_id, token_ids=[1])
        if request.request_id == "bad":
            raise RequestError("prompt too long", 400)
        raise RuntimeError("engine bug")

    hub, spoke, task = await start_pair(endpoint, picky, ctx)
    peer = hub.live_peers()[0]
    for rid, status, text in (("bad", 400, "prompt too long"), ("boom", 500, "RuntimeError: engine bug")):
        got = []
        with pytest.raises(RequestError) as failed:
            async for d in hub.stream(peer, Generate(request_id=rid, token_ids=[1])):
                got.extend(d.token_ids)
        assert got == [1]  # the output before the error is handed out first
        assert failed.value.status == status and failed.value.message == text
    assert hub.live_peers() == [peer]  # a failed request does not drop the worker
    await stop_pair(hub, spoke, task)


async def test_waiting_deltas_are_merged_and_errors_wait_their_turn():
    from zdyn.protocol import Error, TokenLogprob
    from zdyn.rpc.stream import DeltaStream

    stream = DeltaStream(b"w")
    lp = [TokenLogprob(token_id=1, logprob=-0.5)]
    stream.queue.put_nowait(Delta(request_id="r", token_ids=[1], text="a", logprobs=lp, num_cached_tokens=32))
    stream.queue.put_nowait(Delta(request_id="r", token_ids=[2, 3], text="bc", logprobs=lp + lp))
    stream.queue.put_nowait(Delta(request_id="r", token_ids=[4], finish=Finish(reason="stop")))
    stream.queue.put_nowait(Delta(request_id="r", token_ids=[9]))  # never merged past a finish
    merged = await stream.next()
    assert merged.token_ids == [1, 2, 3, 4] and merged.text == "abc" and len(merged.logprobs) == 3
    assert merged.num_cached_tokens == 32 and merged.finish == Finish(reason="stop")

    stream = DeltaStream(b"w")
    stream.queue.put_nowait(Delta(request_id="r", token_ids=[1]))
    stream.queue.put_nowait(Error(request_id="r", message="boom"))
    assert (await stream.next()).token_ids == [1]
    assert isinstance(await stream.next(), Error)


async def test_spoke_started_before_its_hub_registers_and_stays(endpoint, ctx):
    spoke = Spoke([endpoint], ready("early"), counting, liveness=FAST, ctx=ctx)
    task = asyncio.create_task(spoke.run())
    await asyncio.sleep(4 * FAST.expiry_s)  # it announces itself again a few times meanwhile
    hub = Hub(endpoint, role="worker", liveness=FAST, ctx=ctx)
    await hub.start()
    await hub.wait_for_peers(1, timeout_s=5)
    first = hub.live_peers()[0]
    await asyncio.sleep(4 * FAST.expiry_s)
    assert hub.live_peers() == [first]  # registered once, never dropped by a stale connection
    deltas = [d async for d in hub.stream(first, Generate(request_id="r", token_ids=[1]))]
    assert deltas[-1].finish is not None
    await stop_pair(hub, spoke, task)


async def test_repeated_ready_of_the_same_session_keeps_streams(endpoint, ctx):
    hub = Hub(endpoint, role="worker", liveness=Liveness(5.0, 3), ctx=ctx)
    await hub.start()
    dealer = make_socket(ctx, zmq.DEALER, endpoint, identity=b"w")
    await send(dealer, ready("w"))
    await hub.wait_for_peers(1, timeout_s=5)
    stream = hub.stream(hub.live_peers()[0], Generate(request_id="r", token_ids=[1]))
    pending = asyncio.ensure_future(anext(stream))
    assert isinstance(decode(await asyncio.wait_for(dealer.recv_multipart(), 5)), Generate)
    await send(dealer, ready("w"))  # announced again, same session: nothing changed
    await send(dealer, Outputs(deltas=[Delta(request_id="r", token_ids=[7], finish=Finish(reason="stop"))]))
    assert (await asyncio.wait_for(pending, 5)).token_ids == [7]
    await send(dealer, ready("w", session=1))  # a new session: it dropped what it had
    stream2 = hub.stream(hub.live_peers()[0], Generate(request_id="r2", token_ids=[1]))
    pending2 = asyncio.ensure_future(anext(stream2))
    await asyncio.wait_for(dealer.recv_multipart(), 5)
    await send(dealer, ready("w", session=2))
    with pytest.raises(RequestError, match="re-registered"):
        await asyncio.wait_for(pending2, 5)
    dealer.close()
    await hub.close()
