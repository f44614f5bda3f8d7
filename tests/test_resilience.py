"""Requests survive worker and processor failures: retry, mid-stream migration, drain (in one event loop).

The workers run a deterministic "greedy" engine: each next token is a function of the whole context (prompt
plus tokens so far), as greedy decoding is. A request moved mid-stream to another worker therefore goes on
exactly as the undisturbed run would, which the tests check token for token.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import zmq.asyncio

from zdyn.choice import Resilience
from zdyn.errors import RequestError
from zdyn.frontend.remote import RemoteBackend
from zdyn.processor import Processor
from zdyn.protocol import (
    Delta,
    Finish,
    Generate,
    Heartbeat,
    Process,
    Ready,
    SamplingParams,
    StructuredOutputs,
    TextRequest,
)
from zdyn.router.selector import RoundRobin
from zdyn.rpc import Hub, Request, Spoke
from zdyn.transport import Liveness

FAST = Liveness(interval_s=0.1, misses=3)
PROMPT = [5, 6, 7, 8]


def next_token(context: list[int]) -> int:
    return 10 + sum(context) % 50


def greedy(n: int, prompt: list[int] = PROMPT) -> list[int]:
    context = list(prompt)
    for _ in range(n):
        context.append(next_token(context))
    return context[len(prompt) :]


class GreedyWorker:
    """A worker process stand-in: a Spoke serving the deterministic engine, which can be killed or drained."""

    def __init__(self, name: str, hub: str, ctx: zmq.asyncio.Context, delay_s: float = 0.01) -> None:
        self.name = name
        self.delay_s = delay_s
        self.served: list[Generate] = []
        self.fail_with: RequestError | None = None
        ready = Ready(peer_id=name, role="worker", model="m", max_num_seqs=8)
        self.spoke = Spoke([hub], ready, self.handle, load=Heartbeat, liveness=FAST, ctx=ctx)
        self.task = asyncio.create_task(self.spoke.run())

    async def handle(self, request: Request) -> AsyncIterator[Delta]:
        assert isinstance(request, Generate)
        self.served.append(request)
        if self.fail_with is not None:
            raise self.fail_with
        context = list(request.token_ids)
        for i in range(request.sampling.max_tokens):
            await asyncio.sleep(self.delay_s)
            context.append(next_token(context))
            last = i == request.sampling.max_tokens - 1
            finish = Finish(reason="length", prompt_tokens=len(request.token_ids)) if last else None
            yield Delta(request_id=request.request_id, token_ids=[context[-1]], finish=finish)

    async def kill(self) -> None:
        """Like kill -9: the sockets close with requests in flight and nothing is said."""
        self.spoke.close()
        await asyncio.wait_for(self.task, 5)


@pytest.fixture
async def ctx() -> AsyncIterator[zmq.asyncio.Context]:
    context = zmq.asyncio.Context()
    yield context
    context.destroy(linger=0)


@pytest.fixture
def endpoint(unused_tcp_port: int) -> str:
    return f"tcp://127.0.0.1:{unused_tcp_port}"


async def start(
    endpoint: str, ctx: zmq.asyncio.Context, tiny_model: Path, n: int = 2, **resilience: Any
) -> tuple[Hub, Processor, list[GreedyWorker]]:
    hub = Hub(endpoint, role="worker", liveness=FAST, ctx=ctx)
    await hub.start()
    processor = Processor(str(tiny_model), "m", hub, RoundRobin(), Resilience(**resilience))
    workers = [GreedyWorker(f"w{i}", endpoint, ctx) for i in range(n)]
    await hub.wait_for_peers(n, timeout_s=5)
    return hub, processor, workers


async def stop(hub: Hub, workers: list[GreedyWorker]) -> None:
    for w in workers:
        w.spoke.close()
    await asyncio.gather(*(w.task for w in workers), return_exceptions=True)
    await hub.close()


def request(max_tokens: int = 30, n: int = 1) -> TextRequest:
    return TextRequest(prompt=PROMPT, max_tokens=max_tokens, n=n, sampling=SamplingParams(temperature=0.0))


async def collect(stream: AsyncIterator[Delta], on_token: Any = None) -> dict[int, list[Delta]]:
    choices: dict[int, list[Delta]] = {}
    async for delta in stream:
        choices.setdefault(delta.index, []).append(delta)
        if on_token is not None:
            await on_token(sum(len(d.token_ids) for d in choices[delta.index]))
    return choices


async def until(condition: Any, timeout_s: float = 5.0) -> None:
    for _ in range(int(timeout_s / 0.005)):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise TimeoutError("condition not met")


def tokens(deltas: list[Delta]) -> list[int]:
    return [t for d in deltas for t in d.token_ids]


def busy(workers: list[GreedyWorker]) -> GreedyWorker:
    return next(w for w in workers if w.spoke.num_requests)


async def test_a_killed_worker_s_stream_moves_on_without_a_gap(endpoint, ctx, tiny_model):
    hub, processor, workers = await start(endpoint, ctx, tiny_model)
    killed: list[str] = []

    async def kill_at_ten(n: int) -> None:
        if n >= 10 and not killed:
            victim = busy(workers)
            killed.append(victim.name)
            await victim.kill()

    [deltas] = (await collect(processor.process("r1", request(30)), kill_at_ten)).values()
    assert tokens(deltas) == greedy(30)  # nothing duplicated, nothing missing
    finish = deltas[-1].finish
    assert finish is not None and (finish.prompt_tokens, finish.completion_tokens) == (4, 30)
    assert processor.reissues.counts == {("migration", "peer_lost"): 1}
    survivor = next(w for w in workers if w.name != killed[0])
    moved = survivor.served[-1]
    assert moved.token_ids[:4] == PROMPT and len(moved.token_ids) >= 14  # prompt + the tokens so far
    assert moved.sampling.max_tokens == 30 - (len(moved.token_ids) - 4)
    await stop(hub, workers)


async def test_a_guided_request_is_retried_but_never_migrated(endpoint, ctx, tiny_model):
    hub, processor, workers = await start(endpoint, ctx, tiny_model)
    guided = request(30)
    guided.sampling.structured = StructuredOutputs(regex="[a-z]+")

    async def kill_at_five(n: int) -> None:
        if n == 5:
            await busy(workers).kill()

    with pytest.raises(RequestError) as failed:  # its grammar state was in the dead engine: it cannot move
        await collect(processor.process("g", guided), kill_at_five)
    assert failed.value.status == 503 and not processor.reissues.counts
    await stop(hub, workers)


async def test_an_engine_error_before_the_first_token_is_retried_elsewhere(endpoint, ctx, tiny_model):
    hub, processor, workers = await start(endpoint, ctx, tiny_model)
    workers[0].fail_with = RequestError("engine broke", 500, "internal_error")
    workers[1].fail_with = None
    for rid in ("a", "b"):  # round-robin: one of the two lands on the broken worker first
        [deltas] = (await collect(processor.process(rid, request(5)))).values()
        assert tokens(deltas) == greedy(5)
    assert processor.reissues.counts == {("retry", "internal_error"): len(workers[0].served)}
    assert len(workers[0].served) >= 1
    await stop(hub, workers)


async def test_a_bad_request_is_not_retried(endpoint, ctx, tiny_model):
    hub, processor, workers = await start(endpoint, ctx, tiny_model)
    for w in workers:
        w.fail_with = RequestError("no such thing", 400)
    with pytest.raises(RequestError) as failed:
        await collect(processor.process("r", request(5)))
    assert failed.value.status == 400
    assert sum(len(w.served) for w in workers) == 1 and not processor.reissues.counts
    await stop(hub, workers)


async def test_migration_limit_zero_fails_the_request(endpoint, ctx, tiny_model):
    hub, processor, workers = await start(endpoint, ctx, tiny_model, migration_limit=0)

    async def kill_at_three(n: int) -> None:
        if n == 3:
            await busy(workers).kill()

    with pytest.raises(RequestError) as failed:
        await collect(processor.process("r", request(30)), kill_at_three)
    assert failed.value.status == 503 and not processor.reissues.counts
    await stop(hub, workers)


async def test_draining_worker_finishes_its_requests_and_gets_no_new_ones(endpoint, ctx, tiny_model):
    hub, processor, workers = await start(endpoint, ctx, tiny_model)
    first = asyncio.create_task(collect(processor.process("r1", request(20))))
    await until(lambda: any(w.spoke.num_requests for w in workers))
    draining = busy(workers)
    drain = asyncio.create_task(draining.spoke.drain(timeout_s=10))
    await until(lambda: hub.live_peers() != hub.live_peers(draining=True))
    later = [await collect(processor.process(f"n{i}", request(3))) for i in range(3)]
    assert all(tokens(c[0]) == greedy(3) for c in later)
    assert len(draining.served) == 1  # the new requests all went to the other worker
    assert tokens((await first)[0]) == greedy(20)
    assert await drain == 0  # finished in time: nothing handed back
    assert not processor.reissues.counts
    await asyncio.wait_for(draining.task, 5)  # and it stopped
    await stop(hub, workers)


async def test_a_drain_that_times_out_hands_requests_back_to_move(endpoint, ctx, tiny_model):
    hub, processor, workers = await start(endpoint, ctx, tiny_model)
    for w in workers:
        w.delay_s = 0.02
    result = asyncio.create_task(collect(processor.process("r1", request(40))))
    await until(lambda: any(w.spoke.num_requests for w in workers))
    await asyncio.sleep(0.1)
    assert await busy(workers).spoke.drain(timeout_s=0.1) == 1
    assert tokens((await result)[0]) == greedy(40)
    assert processor.reissues.counts == {("migration", "draining"): 1}
    await stop(hub, workers)


async def test_each_of_n_choices_moves_on_its_own(endpoint, ctx, tiny_model):
    hub, processor, workers = await start(endpoint, ctx, tiny_model, n=3)
    killed: list[str] = []

    async def kill_one(n: int) -> None:
        if n >= 5 and not killed:
            victim = busy(workers)
            killed.append(victim.name)
            await victim.kill()

    choices = await collect(processor.process("r", request(20, n=2)), kill_one)
    assert sorted(choices) == [0, 1]
    for deltas in choices.values():
        assert tokens(deltas) == greedy(20)  # temperature 0: both choices are the greedy sequence
        assert deltas[-1].finish is not None and deltas[-1].finish.completion_tokens == 20
    assert processor.reissues.total("migration") >= 1
    await stop(hub, workers)


async def test_a_request_waits_for_a_restarting_worker(endpoint, ctx, tiny_model):
    hub, processor, workers = await start(endpoint, ctx, tiny_model, n=1, worker_wait_s=5)
    await workers[0].kill()
    await until(lambda: not hub.live_peers())
    pending = asyncio.create_task(collect(processor.process("r", request(5))))
    await asyncio.sleep(0.2)
    assert not pending.done()
    workers.append(GreedyWorker("w-new", endpoint, ctx))
    [deltas] = (await asyncio.wait_for(pending, 5)).values()
    assert tokens(deltas) == greedy(5)
    await stop(hub, workers)


async def test_no_worker_within_the_wait_is_a_503(endpoint, ctx, tiny_model):
    hub, processor, workers = await start(endpoint, ctx, tiny_model, n=1, worker_wait_s=0.2)
    await workers[0].kill()
    await until(lambda: not hub.live_peers())
    with pytest.raises(RequestError) as failed:
        await collect(processor.process("r", request(5)))
    assert failed.value.status == 503
    await stop(hub, workers)


async def test_a_killed_processor_s_requests_continue_on_another(unused_tcp_port_factory, ctx, tiny_model):
    """Frontend -> 2 separate processors -> 2 workers; one processor dies mid-stream."""
    front = f"tcp://127.0.0.1:{unused_tcp_port_factory()}"
    processors_hub = Hub(front, role="processor", liveness=FAST, ctx=ctx)
    await processors_hub.start()
    backend = RemoteBackend(processors_hub, Resilience())
    stacks = []
    for i in range(2):
        hub, processor, workers = await start(f"tcp://127.0.0.1:{unused_tcp_port_factory()}", ctx, tiny_model, n=1)

        def handle(req: Request, processor: Processor = processor) -> AsyncIterator[Delta]:
            assert isinstance(req, Process)
            return processor.process(req.request_id, req.request, req.resume)

        def load(hub: Hub = hub) -> Heartbeat:
            return Heartbeat(worker_ids=[p.id for p in hub.live_peers()])

        ready = Ready(peer_id=f"p{i}", role="processor", model="m")
        spoke = Spoke([front], ready, handle, load=load, liveness=FAST, ctx=ctx)
        stacks.append((hub, workers, spoke, asyncio.create_task(spoke.run())))
    await processors_hub.wait_for_peers(2, timeout_s=5)
    await until(lambda: all(p.load.worker_ids for p in processors_hub.live_peers()))
    killed: list[int] = []

    async def kill_processor(n: int) -> None:
        if n >= 8 and not killed:
            i = next(i for i, s in enumerate(stacks) if s[2].num_requests)
            killed.append(i)
            stacks[i][2].close()
            await asyncio.wait_for(stacks[i][3], 5)

    choices = await collect(backend.process("r1", request(25, n=2)), kill_processor)
    for deltas in choices.values():
        assert tokens(deltas) == greedy(25)
        assert deltas[-1].finish is not None and deltas[-1].finish.completion_tokens == 25
    text = "".join(d.text or "" for d in choices[0])
    assert text == processor.backend.decode(greedy(25))  # the text too: nothing repeated or lost
    assert backend.reissues.counts == {("migration", "peer_lost"): 1}
    for hub, workers, spoke, task in stacks:
        spoke.close()
        await asyncio.gather(task, return_exceptions=True)
        await stop(hub, workers)
    await until(lambda: not processors_hub.live_peers(draining=True))
    assert backend.models() == ["m"]  # still known while its processors restart: a wait, then 503, not a 404
    await processors_hub.close()
