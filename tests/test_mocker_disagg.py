"""The mocker on both sides of a disaggregated prefill, through vLLM NixlConnector's kv_transfer_params."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from zdyn.engines.mocker import (
    MockerConfig,
    MockerEngine,
    PolynomialTiming,
    Scheduler,
    new_sequence,
)
from zdyn.kv_events import KvBlockStored
from zdyn.protocol import Delta, Generate, Outputs, SamplingParams, decode, encode
from zdyn.roles.mocker_flags import add_cli_args, from_cli_args

FAST = 1e6
LONG = 4000
REMOTE_DECODE = {"do_remote_decode": True}


def config(**overrides: Any) -> MockerConfig:
    settings: dict[str, Any] = {"block_size": 16, "num_blocks": 1024, "max_model_len": 8192, "speedup": FAST}
    return MockerConfig(**{**settings, **overrides})


def request(rid: str, prompt: list[int], params: dict[str, Any] | None = None, **sampling: Any) -> Generate:
    return Generate(request_id=rid, token_ids=prompt, sampling=SamplingParams(**sampling), kv_transfer_params=params)


def prompt_of(n: int, start: int = 1) -> list[int]:
    return [start + i for i in range(n)]


def tokens(deltas: list[Delta]) -> list[int]:
    return [t for d in deltas for t in d.token_ids]


async def collect(stream: AsyncIterator[Delta]) -> list[Delta]:
    deltas = [d async for d in stream]
    assert deltas and deltas[-1].finish is not None
    return deltas


async def prefill(engine: MockerEngine, rid: str, prompt: list[int]) -> dict[str, Any]:
    """The prefill leg, as a decode worker's caller runs it: max_tokens=1 and do_remote_decode."""
    deltas = await collect(engine.generate(request(rid, prompt, REMOTE_DECODE, max_tokens=1)))
    params = deltas[-1].kv_transfer_params
    assert params is not None
    return params


@pytest.fixture
async def engines() -> AsyncIterator[tuple[MockerEngine, MockerEngine, MockerEngine]]:
    """A prefill, a decode and an aggregated engine with the same settings."""
    pre, dec, agg = MockerEngine(config()), MockerEngine(config()), MockerEngine(config())
    for engine in (pre, dec, agg):
        await engine.start()
    yield pre, dec, agg
    for engine in (pre, dec, agg):
        await engine.shutdown()


async def test_prefill_role_returns_where_the_kv_is_and_stops_after_one_token(
    engines: tuple[MockerEngine, MockerEngine, MockerEngine],
) -> None:
    pre, _, _ = engines
    prompt = prompt_of(100)
    deltas = await collect(pre.generate(request("p", prompt, REMOTE_DECODE, max_tokens=1)))
    assert [len(d.token_ids) for d in deltas] == [1]
    final = deltas[-1]
    assert final.finish is not None and (final.finish.reason, final.finish.completion_tokens) == ("length", 1)
    params = final.kv_transfer_params
    assert params is not None
    assert params["do_remote_prefill"] is True and params["do_remote_decode"] is False
    assert (params["remote_engine_id"], params["remote_request_id"]) == (pre.engine_id, "p")
    assert (params["remote_num_tokens"], params["remote_prefill_cached_tokens"]) == (100, 0)
    [block_ids] = params["remote_block_ids"]  # one KV-cache group, as vLLM 0.32 sends them
    assert len(set(block_ids)) == math.ceil(100 / 16)
    assert isinstance(params["remote_host"], str) and isinstance(params["remote_port"], int)
    assert decode(encode(Outputs(deltas=[final]))) == Outputs(deltas=[final])  # plain MessagePack on the wire
    # Freed at once, but still cached: the next prefill of this prompt is a prefix hit, and says so.
    assert pre.scheduler.kv.num_active_blocks == 0 and pre.scheduler.kv.num_cached_blocks == 6
    assert (await prefill(pre, "p2", prompt))["remote_prefill_cached_tokens"] == 96
    plain = await collect(pre.generate(request("q", prompt, max_tokens=1)))
    assert plain[-1].kv_transfer_params is None


async def test_prefill_params_survive_deltas_merged_in_one_slice(
    engines: tuple[MockerEngine, MockerEngine, MockerEngine],
) -> None:
    pre, _, _ = engines
    deltas = await collect(pre.generate(request("p", prompt_of(100), REMOTE_DECODE, max_tokens=40, ignore_eos=True)))
    assert len(deltas) < 40  # zero-time steps were merged
    params = deltas[-1].kv_transfer_params
    assert params is not None and params["remote_num_tokens"] == 100 + 39  # the last token's KV is not computed


async def test_decode_role_does_not_compute_the_prompt(
    engines: tuple[MockerEngine, MockerEngine, MockerEngine],
) -> None:
    pre, dec, agg = engines
    prompt = prompt_of(LONG)
    params = await prefill(pre, "p", prompt)
    remote = await collect(dec.generate(request("d", prompt, params, max_tokens=2, ignore_eos=True, seed=3)))
    local = await collect(agg.generate(request("d", prompt, max_tokens=2, ignore_eos=True, seed=3)))
    poly = PolynomialTiming()
    assert agg.simulated_ms > poly.prefill_ms(LONG) > 300
    # agg: the 4000-token prefill step, then one decode step. The decode side computed only the last prompt token
    # (charged as a decode token) instead of the prefill: two decode steps at nearly the same KV usage.
    decode_step = agg.simulated_ms - poly.prefill_ms(LONG)
    assert dec.simulated_ms == pytest.approx(2 * decode_step, rel=0.01)
    assert dec.simulated_ms < agg.simulated_ms / 4
    assert (dec.scheduler.num_remote_prefills, dec.scheduler.num_transferred_tokens) == (1, LONG)
    assert dec.scheduler.num_kv_transfer_fallbacks == 0
    assert tokens(remote) == tokens(local)
    finish = remote[-1].finish
    assert finish is not None and (finish.prompt_tokens, finish.completion_tokens) == (LONG, 2)
    assert remote[-1].kv_transfer_params is None  # only a prefill hands KV on
    assert dec.scheduler.kv.num_active_blocks == 0


@pytest.mark.parametrize("seed", [11, None])
async def test_decode_output_equals_the_aggregated_run(
    engines: tuple[MockerEngine, MockerEngine, MockerEngine], seed: int | None
) -> None:
    pre, dec, agg = engines
    prompt = prompt_of(300, start=500)
    params = await prefill(pre, "p", prompt)
    # Without a seed, the output follows the request id and the engine seed, as in an aggregated run.
    remote = await collect(dec.generate(request("r", prompt, params, max_tokens=50, seed=seed, ignore_eos=True)))
    local = await collect(agg.generate(request("r", prompt, max_tokens=50, seed=seed, ignore_eos=True)))
    assert len(tokens(remote)) == 50
    assert tokens(remote) == tokens(local)


def test_transfer_holds_blocks_without_running_then_recomputes_the_last_token() -> None:
    cfg = config()
    prompt = prompt_of(100)
    pre = Scheduler(cfg)
    pre.add(new_sequence(request("p", prompt, REMOTE_DECODE, max_tokens=1), cfg))
    [delta] = pre.step()
    assert delta.kv_transfer_params is not None
    sched = Scheduler(cfg)
    sched.add(new_sequence(request("d", prompt, delta.kv_transfer_params, max_tokens=3, ignore_eos=True), cfg))
    plan = sched.schedule()
    assert plan.chunks == [] and [s.request_id for s in plan.transfers] == ["d"]
    seq = plan.transfers[0]
    assert seq.num_transferred_tokens == 100
    assert (sched.num_running, sched.num_waiting, sched.num_receiving) == (0, 1, 1)
    assert sched.kv.num_active_blocks == 7 and not sched.has_work()
    assert sched.kv.take_events() == []  # blocks are cached only once their KV has arrived
    assert sched.update(plan) == []
    still = sched.schedule()
    assert still.chunks == [] and still.transfers == []
    assert sched.finish_transfer(seq) and not sched.finish_transfer(seq)
    stored = [e for e in sched.kv.take_events() if isinstance(e, KvBlockStored)]
    assert sum(len(e.block_hashes) for e in stored) == 6
    plan = sched.schedule()
    assert [(c.seq.request_id, c.num_new_tokens, c.is_prefill) for c in plan.chunks] == [("d", 1, True)]
    # vLLM computes the last prompt token again to sample from: a decode token's work, charged as one
    assert plan.composition.prefill_tokens == () and plan.composition.decode_context == (100,)
    [first] = sched.update(plan)
    assert first.num_cached_tokens == 0  # the prefill worker's own prefix hit, as vLLM 0.32 reports it
    while sched.has_work():
        sched.step()
    assert sched.kv.num_active_blocks == 0 and sched.num_receiving == 0


async def test_decode_pulls_only_what_its_own_prefix_cache_lacks(
    engines: tuple[MockerEngine, MockerEngine, MockerEngine],
) -> None:
    pre, dec, _ = engines
    prompt = prompt_of(200)
    await collect(dec.generate(request("warm", prompt[:100], max_tokens=1)))  # caches 6 blocks = 96 tokens
    params = await prefill(pre, "p", prompt)
    await collect(dec.generate(request("d", prompt, params, max_tokens=2)))
    assert dec.scheduler.num_transferred_tokens == 200 - 96


async def test_cached_tokens_are_reported_as_vllm_does(
    engines: tuple[MockerEngine, MockerEngine, MockerEngine],
) -> None:
    pre, dec, _ = engines
    prompt = prompt_of(100)
    await prefill(pre, "p1", prompt)
    params = await prefill(pre, "p2", prompt)  # a prefix hit of 96 tokens on the prefill worker
    remote = await collect(dec.generate(request("d1", prompt, params, max_tokens=5, ignore_eos=True)))
    finish = remote[-1].finish
    assert remote[0].num_cached_tokens == 96 and finish is not None and finish.cached_tokens == 96
    # Without the prefill worker's count, vLLM reports its own: local hit plus transferred tokens.
    own = {k: v for k, v in params.items() if k != "remote_prefill_cached_tokens"}
    remote = await collect(dec.generate(request("d2", prompt_of(100, start=300), own, max_tokens=5)))
    assert remote[0].num_cached_tokens == 100


@pytest.mark.parametrize("speedup", [4.0, 16.0])
async def test_decode_waits_the_transfer_time_divided_by_the_speedup(speedup: float) -> None:
    pre = MockerEngine(config())
    # 1 MB per token over 1 GB/s: 1 ms per token
    dec = MockerEngine(config(speedup=speedup, kv_bytes_per_token=1_000_000, kv_transfer_bandwidth_gbps=1.0))
    await pre.start()
    await dec.start()
    try:
        prompt = prompt_of(1000)
        params = await prefill(pre, "p", prompt)
        started = time.monotonic()
        await collect(dec.generate(request("d", prompt, params, max_tokens=2)))
        elapsed = time.monotonic() - started
        assert dec.transfer_ms == pytest.approx(1000.0)
        assert dec.transfer_wait_s == pytest.approx(1.0 / speedup)
        assert dec.simulated_ms < 100  # the transfer is not engine time
        assert elapsed >= 0.95 / speedup  # a busy machine can only make it longer
    finally:
        await pre.shutdown()
        await dec.shutdown()


async def test_cancelling_during_the_transfer_frees_the_blocks() -> None:
    dec = MockerEngine(config(speedup=1.0, kv_bytes_per_token=3_000_000, kv_transfer_bandwidth_gbps=1.0))
    await dec.start()
    try:
        prompt = prompt_of(100)  # a 300 ms transfer
        pre = Scheduler(config())
        pre.add(new_sequence(request("p", prompt, REMOTE_DECODE, max_tokens=1), pre.config))
        [done] = pre.step()
        task = asyncio.create_task(collect(dec.generate(request("d", prompt, done.kv_transfer_params))))
        await asyncio.sleep(0.03)
        assert dec.scheduler.num_receiving == 1 and dec.num_steps == 0  # holding blocks, not running
        assert dec.scheduler.kv.num_active_blocks == 7
        assert (dec.load().num_running, dec.load().num_waiting) == (0, 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert dec.scheduler.kv.num_active_blocks == 0 and dec.scheduler.num_waiting == 0
        await asyncio.sleep(0.3)  # the transfer's timer fires for a request that is gone
        assert not dec.scheduler.has_work()
        assert len(tokens(await collect(dec.generate(request("e", prompt, max_tokens=3, ignore_eos=True))))) == 3
    finally:
        await dec.shutdown()


def _valid_params() -> dict[str, Any]:
    cfg = config()
    pre = Scheduler(cfg)
    pre.add(new_sequence(request("p", prompt_of(300), REMOTE_DECODE, max_tokens=1), cfg))
    [delta] = pre.step()
    assert delta.kv_transfer_params is not None
    return delta.kv_transfer_params


@pytest.mark.parametrize(
    "change",
    [
        {"remote_engine_id": None},
        {"remote_engine_id": ""},
        {"remote_request_id": 5},
        {"remote_block_ids": None},
        {"remote_block_ids": "1,2,3"},
        {"remote_block_ids": [[1, "2"]]},
        {"remote_host": None},
        {"remote_port": "5600"},
        {"remote_num_tokens": None},
        {"remote_num_tokens": -1},
        {"remote_num_tokens": "300"},
        {"remote_num_tokens": True},
        {"remote_num_tokens": 301},  # more than the prompt: another prompt's KV
    ],
    ids=str,
)
async def test_unusable_params_fall_back_to_a_local_prefill(
    engines: tuple[MockerEngine, MockerEngine, MockerEngine], change: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    _, dec, agg = engines
    params = {**_valid_params(), **change}
    params = {k: v for k, v in params.items() if v is not None}
    prompt = prompt_of(300)
    with caplog.at_level("WARNING", logger="zdyn.engines.mocker.scheduler"):
        remote = await collect(dec.generate(request("d", prompt, params, max_tokens=6, seed=1)))
    local = await collect(agg.generate(request("d", prompt, max_tokens=6, seed=1)))
    assert dec.scheduler.num_kv_transfer_fallbacks == 1
    assert (dec.scheduler.num_remote_prefills, dec.scheduler.num_transferred_tokens) == (0, 0)
    assert "request d: unusable kv_transfer_params" in caplog.text
    assert dec.simulated_ms == pytest.approx(agg.simulated_ms)  # the prompt was computed
    assert tokens(remote) == tokens(local)


def test_kv_bytes_per_token_comes_from_the_model(tmp_path: Path) -> None:
    def model(**fields: Any) -> str:
        path = tmp_path / f"m{len(list(tmp_path.iterdir()))}"
        path.mkdir()
        (path / "config.json").write_text(json.dumps(fields))
        return str(path)

    smollm2 = {"num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "hidden_size": 576}
    assert MockerConfig(model_path=model(**smollm2, head_dim=64)).kv_bytes_per_token == 2 * 30 * 3 * 64 * 2
    assert MockerConfig(model_path=model(**smollm2)).kv_bytes_per_token == 23_040  # head dim = 576 / 9
    no_gqa = {k: v for k, v in smollm2.items() if k != "num_key_value_heads"}
    assert MockerConfig(model_path=model(**no_gqa)).kv_bytes_per_token == 2 * 30 * 9 * 64 * 2
    assert MockerConfig(model_path=model(vocab_size=100)).kv_bytes_per_token == 131_072  # unknown: Llama-3-8B
    assert MockerConfig(model_path=model(**smollm2), kv_bytes_per_token=7).kv_bytes_per_token == 7


def test_transfer_defaults_match_dynamo() -> None:
    cfg = MockerConfig()
    assert (cfg.kv_bytes_per_token, cfg.kv_transfer_bandwidth_gbps) == (131_072, 64.0)
    assert cfg.kv_transfer_ms(8192) == pytest.approx(16.8, abs=0.05)  # Dynamo's example: Llama-3-8B, 8k tokens
    assert MockerConfig(kv_transfer_bandwidth_gbps=0).kv_transfer_ms(8192) == 0.0


def test_cli_flags() -> None:
    parser = add_cli_args(argparse.ArgumentParser())
    assert "--kv-bytes-per-token" in parser.format_help() and "--kv-transfer-bandwidth-gbps" in parser.format_help()
    cfg = from_cli_args(parser.parse_args(["--kv-bytes-per-token", "2048", "--kv-transfer-bandwidth-gbps", "12.5"]))
    assert (cfg.kv_bytes_per_token, cfg.kv_transfer_bandwidth_gbps) == (2048, 12.5)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"kv_bytes_per_token": -1}, "kv_bytes_per_token must be positive"),
        ({"kv_transfer_bandwidth_gbps": -1.0}, "kv_transfer_bandwidth_gbps must be a finite number >= 0"),
        ({"kv_transfer_bandwidth_gbps": math.nan}, "kv_transfer_bandwidth_gbps"),
        ({"kv_transfer_bandwidth_gbps": math.inf}, "kv_transfer_bandwidth_gbps"),
    ],
)
def test_invalid_transfer_settings_are_rejected(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MockerConfig(**overrides)
