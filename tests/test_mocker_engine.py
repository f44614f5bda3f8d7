from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import zmq
import zmq.asyncio

from zdyn.engines.base import EngineDeadError, RequestError
from zdyn.engines.mocker import (
    InterpolatedTiming,
    MockerConfig,
    MockerEngine,
    PolynomialTiming,
    StepComposition,
)
from zdyn.kv_events import KvBlockStored, decode_frames
from zdyn.protocol import Delta, Finish, Generate, Heartbeat, SamplingParams
from zdyn.roles.mocker_flags import add_cli_args, from_cli_args

FAST = 1e6


def config(**overrides: Any) -> MockerConfig:
    settings: dict[str, Any] = {"block_size": 16, "num_blocks": 256, "max_model_len": 1024, "speedup": FAST}
    return MockerConfig(**{**settings, **overrides})


def request(rid: str, prompt: list[int], **sampling: Any) -> Generate:
    return Generate(request_id=rid, token_ids=prompt, sampling=SamplingParams(**sampling))


async def collect(stream: AsyncIterator[Delta]) -> tuple[list[int], Finish]:
    tokens: list[int] = []
    async for delta in stream:
        tokens += delta.token_ids
        if delta.finish is not None:
            return tokens, delta.finish
    raise AssertionError("stream ended without finish")


@pytest.fixture
async def engine() -> AsyncIterator[MockerEngine]:
    eng = MockerEngine(config())
    await eng.start()
    yield eng
    await eng.shutdown()


async def test_generate_end_to_end(engine: MockerEngine) -> None:
    assert engine.info.engine == "mocker" and engine.info.model == "mocker"
    assert (engine.info.block_size, engine.info.num_kv_blocks, engine.info.max_model_len) == (16, 256, 1024)
    prompts = {f"r{i}": [i + 1] * (20 + 7 * i) for i in range(12)}
    results = await asyncio.gather(
        *(collect(engine.generate(request(rid, p, max_tokens=25, ignore_eos=True))) for rid, p in prompts.items())
    )
    for (tokens, finish), (rid, prompt) in zip(results, prompts.items(), strict=True):
        assert len(tokens) == 25, rid
        assert finish.reason == "length" and finish.prompt_tokens == len(prompt) and finish.completion_tokens == 25
    again = await collect(engine.generate(request("r0", prompts["r0"], max_tokens=25, ignore_eos=True)))
    assert again[0] == results[0][0]  # same id and seed: same tokens
    assert again[1].cached_tokens == 16
    assert engine.load().num_running == 0 and engine.load().kv_usage == 0.0


async def test_every_delta_carries_one_step_of_tokens_when_steps_take_time() -> None:
    eng = MockerEngine(config(speedup=20))  # a ~1 ms step: the engine sleeps between steps
    await eng.start()
    try:
        deltas = [d async for d in eng.generate(request("a", [1, 2, 3], max_tokens=4, ignore_eos=True))]
        assert [len(d.token_ids) for d in deltas] == [1, 1, 1, 1]
        assert [d.finish is not None for d in deltas] == [False, False, False, True]
    finally:
        await eng.shutdown()


async def test_steps_without_engine_time_are_merged_into_fewer_deltas(engine: MockerEngine) -> None:
    deltas = [d async for d in engine.generate(request("a", [1, 2, 3], max_tokens=40, ignore_eos=True))]
    assert sum(len(d.token_ids) for d in deltas) == 40
    assert len(deltas) < 40  # steps that ran in one time slice arrive as one delta
    assert [d.finish is not None for d in deltas] == [False] * (len(deltas) - 1) + [True]
    same = [d async for d in engine.generate(request("b", [1, 2, 3], max_tokens=40, ignore_eos=True, seed=5))]
    again = [d async for d in engine.generate(request("c", [1, 2, 3], max_tokens=40, ignore_eos=True, seed=5))]
    assert [t for d in same for t in d.token_ids] == [t for d in again for t in d.token_ids]


async def test_load_reports_running_and_waiting() -> None:
    eng = MockerEngine(config(max_num_seqs=2, speedup=2))
    await eng.start()
    streams = [eng.generate(request(f"r{i}", [i + 1] * 30, max_tokens=100)) for i in range(4)]
    firsts = await asyncio.gather(*(anext(s) for s in streams[:2]))
    assert all(len(d.token_ids) == 1 for d in firsts)
    tasks = [asyncio.ensure_future(anext(s)) for s in streams[2:]]
    await asyncio.sleep(0.05)
    load = eng.load()
    assert (load.num_running, load.num_waiting) == (2, 2)
    assert load.kv_usage == eng.scheduler.kv.usage
    assert 2 * 2 / 256 <= load.kv_usage <= 2 * 9 / 256  # two sequences of 31..130 tokens in 16-token blocks
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for stream in streams:
        await stream.aclose()
    assert eng.load() == Heartbeat() and not eng.scheduler.has_work()
    await eng.shutdown()


async def test_closing_the_stream_aborts_and_frees_blocks() -> None:
    eng = MockerEngine(config(speedup=100))
    await eng.start()
    stream = eng.generate(request("a", list(range(1, 200)), max_tokens=500, ignore_eos=True))
    await anext(stream)
    await anext(stream)
    assert eng.scheduler.kv.num_active_blocks > 0
    await stream.aclose()
    assert eng.scheduler.kv.num_active_blocks == 0
    assert not eng.scheduler.has_work()
    await eng.shutdown()


async def test_cancelling_the_consumer_task_aborts_the_request() -> None:
    eng = MockerEngine(config(speedup=100))
    await eng.start()

    started = asyncio.Event()

    async def consume() -> None:
        async for _ in eng.generate(request("a", list(range(1, 100)), max_tokens=500, ignore_eos=True)):
            started.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(started.wait(), 5)
    assert eng.scheduler.kv.num_active_blocks > 0
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert eng.scheduler.kv.num_active_blocks == 0 and eng.load().num_running == 0
    await eng.shutdown()


async def test_step_time_follows_the_polynomial_at_speedup_1() -> None:
    eng = MockerEngine(config(speedup=1.0))
    await eng.start()
    poly = PolynomialTiming()
    started = time.monotonic()
    tokens, _ = await collect(eng.generate(request("a", list(range(1, 513)), max_tokens=3, ignore_eos=True)))
    elapsed = time.monotonic() - started
    assert len(tokens) == 3 and eng.num_steps == 3
    prefill = poly.prefill_ms(512)
    assert prefill == pytest.approx(64.5, abs=0.1)  # Dynamo's published value for 512 tokens
    decode = poly.decode_ms(33 / 256)  # 512 + 1 tokens in 16-token blocks = 33 blocks in use
    assert eng.last_step is not None
    composition, last_ms = eng.last_step
    assert composition == StepComposition(decode_context=(514,), kv_usage=33 / 256)
    assert last_ms == pytest.approx(decode)
    assert eng.simulated_ms == pytest.approx(prefill + 2 * decode)
    # Wall time can only exceed the model on a loaded machine; the upper bound is deliberately loose.
    assert (prefill + 2 * decode) / 1000 * 0.95 <= elapsed < 2.0
    await eng.shutdown()


async def test_speedup_divides_wall_time() -> None:
    eng = MockerEngine(config(speedup=10.0, max_model_len=8192, num_blocks=1024))
    await eng.start()
    started = time.monotonic()
    await collect(eng.generate(request("a", [7] * 4000, max_tokens=3, ignore_eos=True)))
    elapsed = time.monotonic() - started
    assert eng.simulated_ms > 350  # a 4000-token prefill alone models ~343 ms
    assert eng.simulated_ms / 10 / 1000 * 0.95 <= elapsed < eng.simulated_ms / 1000
    await eng.shutdown()


def test_polynomial_model_values() -> None:
    poly = PolynomialTiming()
    assert poly.prefill_ms(1024) == pytest.approx(103.0, abs=0.5)
    assert poly.decode_ms(0.0) == pytest.approx(19.44)
    assert poly.decode_ms(1.0) == pytest.approx(57.85)
    step = StepComposition(prefill_tokens=(100, 200), prefill_context=(0, 0), decode_context=(50,), kv_usage=0.5)
    assert poly(step) == pytest.approx(poly.prefill_ms(100) + poly.prefill_ms(200) + poly.decode_ms(0.5))
    assert poly(StepComposition(prefill_tokens=(100,))) == pytest.approx(poly.prefill_ms(100))


def test_interpolated_model_from_json_and_npz(tmp_path: Path) -> None:
    data = {
        "prefill_tokens": [100, 1000],
        "prefill_ms": [10.0, 100.0],
        "decode_batch": [1, 9],
        "decode_context": [100, 1100],
        "decode_ms": [[5.0, 7.0], [9.0, 11.0]],
    }
    (tmp_path / "t.json").write_text(json.dumps(data))
    np = pytest.importorskip("numpy")
    np.savez(tmp_path / "t.npz", **{k: np.asarray(v) for k, v in data.items()})
    for name in ("t.json", "t.npz"):
        model = InterpolatedTiming.from_file(tmp_path / name)
        assert model.prefill_ms(550) == pytest.approx(55.0)
        assert model.prefill_ms(2000) == pytest.approx(200.0)  # extrapolated
        assert model.decode_ms(5, 600) == pytest.approx(8.0)
        assert model.decode_ms(50, 5000) == pytest.approx(11.0)  # clamped to the grid
        step = StepComposition(prefill_tokens=(200, 350), decode_context=(100, 1100), kv_usage=0.1)
        assert model(step) == pytest.approx(55.0 + model.decode_ms(2, 600))
    with pytest.raises(ValueError, match="decode_ms"):
        InterpolatedTiming([1], [1.0], [1, 2], [1], [[1.0]])
    with pytest.raises(ValueError, match="increasing"):
        InterpolatedTiming([2, 1], [1.0, 2.0], [1], [1], [[1.0]])


async def test_timing_file_replaces_the_default_model(tmp_path: Path) -> None:
    data = {
        "prefill_tokens": [1, 1000],
        "prefill_ms": [1.0, 1.0],
        "decode_batch": [1],
        "decode_context": [1],
        "decode_ms": [[2.0]],
    }
    (tmp_path / "t.json").write_text(json.dumps(data))
    eng = MockerEngine(config(timing_file=str(tmp_path / "t.json")))
    await eng.start()
    await collect(eng.generate(request("a", [1, 2, 3], max_tokens=4, ignore_eos=True)))
    assert eng.simulated_ms == pytest.approx(1.0 + 3 * 2.0)
    await eng.shutdown()


async def test_bad_request_raises_request_error(engine: MockerEngine) -> None:
    with pytest.raises(RequestError, match="maximum model length") as info:
        await anext(engine.generate(request("a", [1] * 2000)))
    assert info.value.status == 400
    with pytest.raises(RequestError, match="max_tokens"):
        await anext(engine.generate(request("b", [1] * 1000, max_tokens=100)))
    assert not engine.scheduler.has_work()


async def test_shutdown_fails_pending_requests() -> None:
    eng = MockerEngine(config(speedup=10))
    await eng.start()
    stream = eng.generate(request("a", [1, 2, 3], max_tokens=1000, ignore_eos=True))
    await anext(stream)
    await eng.shutdown()
    with pytest.raises(EngineDeadError):
        async for _ in stream:
            pass
    with pytest.raises(EngineDeadError):
        await anext(eng.generate(request("b", [1, 2, 3])))


async def test_kv_events_are_published_per_step(tmp_path: Path, ctx: zmq.asyncio.Context) -> None:
    endpoint = f"ipc://{tmp_path}/kv.sock"
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"kv")
    sub.connect(endpoint)
    eng = MockerEngine(config(kv_events_endpoint=endpoint, kv_events_topic="kv"))
    await eng.start()
    try:
        assert eng.publisher is not None
        await asyncio.sleep(0.2)  # let the subscription reach the publisher
        prompt = list(range(1, 41))
        tokens, _ = await collect(eng.generate(request("a", prompt, max_tokens=30, ignore_eos=True)))
        batches = []
        while await sub.poll(500):
            batches.append(decode_frames(await sub.recv_multipart()))
        assert [b.seq for b in batches] == list(range(len(batches)))
        stored = [e for b in batches for e in b.events if isinstance(e, KvBlockStored)]
        # prefill stores blocks 0-1; decode fills block 2 (token 48) and block 3 (token 64) later
        assert [len(e.block_hashes) for e in stored] == [2, 1, 1]
        assert [e.token_ids for e in stored] == [prompt[:32], prompt[32:] + tokens[:8], tokens[8:24]]
        assert stored[1].parent_hash == stored[0].block_hashes[1]
        assert stored[2].parent_hash == stored[1].block_hashes[0]
    finally:
        await eng.shutdown()
        sub.close(0)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"block_size": 0}, "block_size must be positive"),
        ({"num_blocks": 10, "block_size": 16, "max_model_len": 1024}, "needs 64 blocks"),
        (
            {"enable_chunked_prefill": False, "max_num_batched_tokens": 512, "max_model_len": 1024},
            "max_num_batched_tokens \\(512\\)",
        ),
        ({"watermark": 1.5}, "watermark"),
        ({"speedup": 0}, "speedup"),
        ({"vocab_size": 100, "eos_token_id": 100}, "eos_token_id 100"),
        ({"max_num_seqs": -1}, "max_num_seqs"),
    ],
)
def test_invalid_settings_are_rejected(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        config(**overrides)


def test_defaults_match_dynamo() -> None:
    cfg = MockerConfig()
    assert (cfg.block_size, cfg.num_blocks, cfg.max_num_seqs, cfg.max_num_batched_tokens) == (64, 16384, 256, 8192)
    assert cfg.enable_prefix_caching and cfg.enable_chunked_prefill
    assert (cfg.watermark, cfg.speedup, cfg.max_model_len) == (0.01, 1.0, 8192)


def test_model_dir_config_is_read(tmp_path: Path) -> None:
    model = tmp_path / "tiny-llama"
    model.mkdir()
    (model / "config.json").write_text(
        json.dumps({"max_position_embeddings": 2048, "vocab_size": 5000, "eos_token_id": [7, 8]})
    )
    cfg = MockerConfig(model_path=str(model))
    assert (cfg.max_model_len, cfg.vocab_size, cfg.eos_token_id, cfg.model_name) == (2048, 5000, 7, "tiny-llama")
    with pytest.raises(ValueError, match="exceeds the model's 2048"):
        MockerConfig(model_path=str(model), max_model_len=4096)
    with pytest.raises(ValueError, match="no config.json"):
        MockerConfig(model_path=str(tmp_path))


def test_cli_flags_cover_every_setting() -> None:
    parser = add_cli_args(argparse.ArgumentParser())
    args = parser.parse_args(
        ["--block-size", "32", "--num-blocks", "100", "--speedup", "5", "--no-enable-prefix-caching"]
        + ["--watermark", "0.05", "--kv-events-endpoint", "tcp://*:5557", "--max-model-len", "512"]
    )
    cfg = from_cli_args(args)
    assert (cfg.block_size, cfg.num_blocks, cfg.speedup, cfg.watermark) == (32, 100, 5.0, 0.05)
    assert not cfg.enable_prefix_caching and cfg.enable_chunked_prefill
    assert cfg.kv_events_endpoint == "tcp://*:5557" and cfg.max_model_len == 512
    assert from_cli_args(parser.parse_args([])) == MockerConfig()
