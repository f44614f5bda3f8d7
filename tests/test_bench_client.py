"""zdyn.bench client, runner and CLI against a real OpenAI-style SSE server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import itertools
import json
import shlex
import socket
import statistics
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from zdyn.bench.arrivals import gamma_offsets
from zdyn.bench.cli import main
from zdyn.bench.client import ClientConfig, OpenAIClient
from zdyn.bench.datasets import PrefixDataset, RandomDataset
from zdyn.bench.prompts import RequestOptions
from zdyn.bench.records import RequestRecord
from zdyn.bench.runner import LoadPoint, RunSettings, run_point, run_sweep
from zdyn.bench.tokens import TokenSynth

SEEN: list[dict[str, Any]] = []  # bodies and client ports of streamed requests, filled by the server thread


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj)}\n\n"


async def _models(request: Request) -> Response:
    return JSONResponse({"object": "list", "data": [{"id": "fake-model", "object": "model"}]})


async def _complete(request: Request) -> Response:
    """Streams ``max_tokens`` tokens; the body's ``fake`` object sets delays (ms) and failure modes."""
    body = await request.json()
    port = request.client.port if request.client else None
    SEEN.append({"body": body, "port": port, "auth": request.headers.get("authorization")})
    fake = body.get("fake", {})
    chat = request.url.path.endswith("/chat/completions")
    n, per_chunk, mode = body["max_tokens"], fake.get("per_chunk", 1), fake.get("mode", "ok")
    if mode == "http":
        return JSONResponse({"error": {"message": "overloaded", "type": "server_error", "code": 503}}, 503)

    async def chunks() -> AsyncIterator[str]:
        if chat:  # a role announcement before prefill, as some servers send; not a token
            yield _sse({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
        await asyncio.sleep(fake.get("ttft_ms", 0) / 1000)
        num_chunks = -(-n // per_chunk)
        for i in range(num_chunks):
            if i:
                await asyncio.sleep(fake.get("itl_ms", 0) / 1000)
            if i == fake.get("at", 2):
                if mode == "disconnect":
                    raise RuntimeError("simulated crash mid-stream")
                if mode == "error":
                    yield _sse({"error": {"message": "engine died", "type": "internal", "code": 500}})
                    return
                if mode == "event_error":
                    yield "event: error\n" + _sse({"message": "dynamo failure"})
                    return
                if mode == "garbage":
                    yield "data: {not json\n\n"
                    return
            piece = " tok" * min(per_chunk, n - i * per_chunk)
            choice: dict[str, Any] = {"delta": {"content": piece}} if chat else {"text": piece}
            choice.update(index=0, finish_reason="length" if i == num_chunks - 1 else None)
            yield _sse({"choices": [choice]})
        if chat:
            yield _sse({"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]})
        if fake.get("usage", True):
            usage = {
                "prompt_tokens": 7,
                "completion_tokens": n,
                "prompt_tokens_details": {"cached_tokens": 3},
            }
            yield _sse({"choices": [], "usage": usage})
        if mode != "no_done":
            yield "data: [DONE]\n\n"

    return StreamingResponse(chunks(), media_type="text/event-stream")


APP = Starlette(
    routes=[
        Route("/v1/models", _models),
        Route("/v1/chat/completions", _complete, methods=["POST"]),
        Route("/v1/completions", _complete, methods=["POST"]),
    ]
)


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(APP, log_level="critical", lifespan="off", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "test server did not start"
        time.sleep(0.01)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(5)


@pytest.fixture(autouse=True)
def _clear_seen() -> None:
    SEEN.clear()


async def _stream(
    base_url: str, body: dict[str, Any], path: str = "/v1/chat/completions", **config: Any
) -> RequestRecord:
    async with OpenAIClient(ClientConfig(base_url, **config)) as client:
        return await client.stream(path, {"model": "m", "stream": True, **body}, 0, 11, keep_text=True)


def assert_delay(measured: float, expected: float, late: float = 0.1, early: float = 0.005) -> None:
    """Server-side sleeps bound a delay measured from the send from below; CPU contention can only make it
    longer. Gaps between chunks can also shrink when the earlier chunk was read late (raise ``early``)."""
    assert expected - early <= measured <= expected + late


async def test_chat_stream_timing_and_usage(base_url: str) -> None:
    rec = await _stream(base_url, {"max_tokens": 6, "fake": {"ttft_ms": 150, "itl_ms": 40}})
    assert rec.success and rec.error is None and rec.status == 200
    assert_delay(rec.ttft, 0.150)  # the role chunk sent at once is not the first token
    assert len(rec.itl) == 5 and statistics.median(rec.itl) == pytest.approx(0.040, abs=0.015)
    assert_delay(sum(rec.itl), 5 * 0.040, early=0.03)
    assert_delay(rec.latency, 0.150 + 5 * 0.040, late=0.15)
    assert rec.latency >= rec.ttft + sum(rec.itl) - 1e-9
    assert (rec.output_tokens, rec.prompt_tokens, rec.cached_tokens, rec.num_chunks) == (6, 7, 3, 6)
    assert rec.text == " tok" * 6


async def test_completions_without_usage_counts_chunks(base_url: str) -> None:
    body = {"prompt": "hi", "max_tokens": 4, "fake": {"usage": False, "itl_ms": 5}}
    rec = await _stream(base_url, body, "/v1/completions")
    assert rec.success and rec.output_tokens == 4 and rec.prompt_tokens == 11 and rec.cached_tokens is None


async def test_multi_token_chunks_give_one_itl_per_chunk(base_url: str) -> None:
    rec = await _stream(base_url, {"max_tokens": 9, "fake": {"per_chunk": 4, "itl_ms": 30}})
    assert rec.success and rec.num_chunks == 3 and len(rec.itl) == 2 and rec.output_tokens == 9
    assert_delay(sum(rec.itl), 0.060, early=0.03)


@pytest.mark.parametrize(
    ("mode", "kind", "detail"),
    [
        ("http", "http_503", "overloaded"),
        ("disconnect", "connection", "ClientPayloadError"),
        ("error", "server_error", "engine died"),
        ("event_error", "server_error", "dynamo failure"),
        ("garbage", "parse", "invalid JSON"),
        ("no_done", "incomplete", "[DONE]"),
    ],
)
async def test_failures_are_recorded_by_kind(base_url: str, mode: str, kind: str, detail: str) -> None:
    rec = await _stream(base_url, {"max_tokens": 5, "fake": {"mode": mode, "itl_ms": 20}})
    assert not rec.success and rec.error == kind and detail in rec.error_detail
    assert rec.end >= rec.start
    if mode in ("disconnect", "error"):
        assert len(rec.itl) == 1  # two tokens arrived before the failure


async def test_timeout_and_refused_connection(base_url: str) -> None:
    t0 = time.perf_counter()
    rec = await _stream(base_url, {"max_tokens": 3, "fake": {"ttft_ms": 3000}}, timeout_s=0.3)
    assert rec.error == "timeout" and time.perf_counter() - t0 < 2.0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connections are refused
        rec = await _stream(f"http://127.0.0.1:{port}", {"max_tokens": 3})
    assert rec.error == "connection" and not rec.success


@pytest.mark.parametrize(("keep_alive", "connections"), [(True, 1), (False, 3)])
async def test_keep_alive_policy(base_url: str, keep_alive: bool, connections: int) -> None:
    async with OpenAIClient(ClientConfig(base_url, keep_alive=keep_alive)) as client:
        for i in range(3):
            rec = await client.stream("/v1/completions", {"model": "m", "prompt": "x", "max_tokens": 2}, i, 1)
            assert rec.success and rec.text == ""  # text is kept only for multi-turn history
    assert len({seen["port"] for seen in SEEN}) == connections


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import glob
    import os

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    files = sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "*.py")))[:6]
    tok.train(files, trainers.BpeTrainer(vocab_size=1000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    out = tmp_path_factory.mktemp("tok")
    tok.save(str(out / "tokenizer.json"))
    return out


def _settings(**kw: Any) -> RunSettings:
    extra = kw.pop("fake", {"ttft_ms": 20, "itl_ms": 5})
    opts = RequestOptions("fake-model", api=kw.pop("api", "chat"), extra_body={"fake": extra})
    return RunSettings(path=kw.pop("path", "/v1/chat/completions"), options=opts, progress=False, **kw)


async def test_closed_loop_with_warmup(base_url: str, tokenizer_dir: Path) -> None:
    synth = TokenSynth(Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")))
    settings = _settings(num_requests=8, num_warmups=2, fake={"ttft_ms": 60, "itl_ms": 10})
    async with OpenAIClient(ClientConfig(base_url)) as client:
        result = await run_point(client, RandomDataset(30, 4), synth, LoadPoint(concurrency=2), settings)
    assert len(result.warmup_records) == 2 and all(r.success for r in result.warmup_records)
    assert [r.index for r in result.records] == list(range(8))
    m = result.metrics
    assert m.completed == 8 and m.max_concurrency == 2 and m.total_output_tokens == 32
    assert_delay(m.ttft.median / 1000, 0.060)
    # 4 waves of 2 requests, each ~60 + 3*10 ms: the duration excludes the warm-up
    assert 0.36 < m.duration_s < 1.5
    warm_prompts = [s["body"]["messages"][0]["content"] for s in SEEN[:2]]
    measured = [s["body"]["messages"][0]["content"] for s in SEEN[2:]]
    assert not set(warm_prompts) & set(measured)  # warm-up content differs, lengths match
    assert [len(p) > 0 for p in warm_prompts] == [True, True]


async def test_open_loop_rate_duration_and_sweep(base_url: str, tokenizer_dir: Path) -> None:
    synth = TokenSynth(Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")))
    settings = _settings(duration_s=0.5, seed=2)
    points = [LoadPoint(request_rate=20.0), LoadPoint(request_rate=60.0)]
    async with OpenAIClient(ClientConfig(base_url)) as client:
        results = await run_sweep(client, RandomDataset(10, 2), synth, points, settings)
    low, high = (r.metrics.completed for r in results)
    for rate, count in ((20.0, low), (60.0, high)):  # every arrival before the deadline, none after
        assert count == sum(t < 0.5 for t in itertools.islice(gamma_offsets(rate, 1.0, 2), 200))
    assert 3 <= low < high
    for result in results:
        assert max(r.scheduled or 0.0 for r in result.records) - result.origin < 0.5
        assert all(r.scheduled is not None and r.start >= r.scheduled - 1e-3 for r in result.records)
    first_point = {s["body"]["messages"][0]["content"] for s in SEEN[:low]}
    second_point = {s["body"]["messages"][0]["content"] for s in SEEN[low:]}
    assert not first_point & second_point  # each sweep point gets fresh content


async def test_sessions_wait_for_previous_turn_and_resend_answer(base_url: str, tokenizer_dir: Path) -> None:
    synth = TokenSynth(Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")))
    ds = PrefixDataset(num_prefixes=1, users_per_prefix=2, turns=3, prefix_len=20, suffix_len=5, output_len=3)
    settings = _settings(api="completions", path="/v1/completions", fake={"ttft_ms": 30})
    async with OpenAIClient(ClientConfig(base_url)) as client:
        result = await run_point(client, ds, synth, LoadPoint(concurrency=4), settings)
    assert result.metrics.completed == 6
    reqs = {r.index: r for r in ds.requests(0)}
    by_turn = {(reqs[r.index].session, reqs[r.index].turn): r for r in result.records}
    for session in (0, 1):
        for turn in (1, 2):
            assert by_turn[(session, turn)].start >= by_turn[(session, turn - 1)].end
    prompts = [s["body"]["prompt"] for s in SEEN]
    last_turns = [p for p in prompts if p.count(" tok tok tok") == 2]
    assert len(last_turns) == 2  # turn 2 of each session resends both earlier answers


@pytest.mark.slow
def test_cli_run_json_and_plot(
    base_url: str, tokenizer_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "result.json"
    argv = shlex.split(
        f"--base-url {base_url} --tokenizer {tokenizer_dir} --api completions --ignore-eos --input-len 16 "
        "--output-len 3 --num-requests 6 --concurrency 1,3 --goodput ttft:1000 --api-key sk-secret "
        f"--result-json {out} --save-requests --label fake --no-progress "
        """--extra-body '{"fake": {"ttft_ms": 10}}'"""
    )
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.count("Serving Benchmark Result") == 2 and "Command: zdyn bench --base-url" in printed
    data = json.loads(out.read_text())
    assert data["command"].startswith("zdyn bench --base-url") and data["argv"][:4] == argv[:4]
    assert "sk-secret" not in out.read_text() and "sk-secret" not in printed and "--api-key '***'" in printed
    assert {s["auth"] for s in SEEN} == {"Bearer sk-secret"}
    assert data["config"]["model"] == "fake-model" and data["config"]["request_rate"] is None
    assert [run["point"]["concurrency"] for run in data["runs"]] == [1, 3]
    run = data["runs"][1]
    assert run["metrics"]["completed"] == 6 and run["metrics"]["good_requests"] == 6
    assert len(run["requests"]) == 6 and run["requests"][0]["output_tokens"] == 3
    assert len(run["metrics"]["ttft"]["cdf"]) == 101
    assert all(s["body"]["ignore_eos"] is True and s["body"]["max_tokens"] == 3 for s in SEEN)

    png = tmp_path / "plot.png"
    assert main(["plot", str(out), str(out), "-o", str(png), "--labels", "a,b"]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_rejects_bad_combinations(tokenizer_dir: Path) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--tokenizer", str(tokenizer_dir), "--prompt-format", "tokens"])
    assert info.value.code == 2
    with pytest.raises(SystemExit):
        main(
            [
                "--tokenizer",
                str(tokenizer_dir),
                "--dataset",
                "mooncake",
                "--dataset-path",
                "x",
                "--request-rate",
                "2",
            ]
        )
    with pytest.raises(SystemExit):
        main(["--tokenizer", str(tokenizer_dir), "--goodput", "itl:5"])


def test_cli_replays_mooncake_trace(base_url: str, tokenizer_dir: Path, tmp_path: Path) -> None:
    lines = [
        {"timestamp": 0, "input_length": 700, "output_length": 2, "hash_ids": [0, 1]},
        {"timestamp": 200, "input_length": 600, "output_length": 2, "hash_ids": [0, 2]},
        "not json",
        {"timestamp": 400, "input_length": 100, "output_length": 2, "hash_ids": [3]},
        {"timestamp": 800, "input_length": 512, "output_length": 2, "hash_ids": [0]},
    ]
    trace = tmp_path / "trace.jsonl"
    trace.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    out = tmp_path / "replay.json"
    base = shlex.split(
        f"--base-url {base_url} --tokenizer {tokenizer_dir} --dataset mooncake --dataset-path {trace} "
        "--api completions --prompt-format tokens --no-progress --speed 2"
    )
    assert main(base) == 1  # the malformed line 3 stops the run before anything is sent
    assert SEEN == []
    assert main([*base, "--on-bad-line", "skip", "--result-json", str(out), "--save-requests"]) == 0
    data = json.loads(out.read_text())
    assert data["config"]["skipped_trace_lines"] == 1
    starts = [r["start_s"] for r in data["runs"][0]["requests"]]
    for start, expected in zip(starts, [0.0, 0.1, 0.2, 0.4], strict=True):  # trace timestamps / speed
        assert_delay(start, expected, late=0.05)
    prompts = [s["body"]["prompt"] for s in SEEN]
    assert [len(p) for p in prompts] == [700, 600, 100, 512]
    assert prompts[0][:512] == prompts[1][:512] == prompts[3] and prompts[0][512:] != prompts[1][512:600]
