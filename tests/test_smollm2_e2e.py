"""The embedded default model, SmolLM2-135M-Instruct on vLLM, through zdyn and the openai SDK: factual answers,
tool calls and structured outputs, and, last, a worker killed mid-stream: the stream completes greedy-identical
to an undisturbed run (the request migrates with its tokens so far). One deployment of two workers (each vLLM
start costs the suite about a minute).

"required" and named tool choices, and ``json_schema`` response formats, are enforced by vLLM's guided decoding:
even this small model answers with calls that parse and fit the tools' parameter schemas.
"""

from __future__ import annotations

import os
import signal
from typing import Any

import openai
import pytest
import tool_cases
from e2e import scratch_env
from tool_cases import ASK, TIME, WEATHER, check_call

from zdyn.bench.deploy import ZdynSpec, start
from zdyn.bench.procs import get_json, scrape

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("smollm2-tools")
    spec = ZdynSpec(
        "agg",
        workers=2,
        engine="vllm",
        worker_args=("--enforce-eager", "--max-model-len", "2048", "--kv-cache-memory-bytes", str(256 * 2**20)),
        config={"Frontend": {"tool-call-parser": "smollm2"}},  # tool_choice "auto": SmolLM2's <tool_call> format
        env=scratch_env(tmp),
    )
    with start(spec, tmp / "logs", timeout_s=300) as dep:
        yield dep


def test_default_model_answers_factual_questions(smollm2):
    assert smollm2.model == "SmolLM2-135M-Instruct"
    sync = openai.OpenAI(base_url=f"{smollm2.base_url}/v1", api_key="none", max_retries=0)
    capital = sync.chat.completions.create(
        model=smollm2.model,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=40,
        temperature=0,
    )
    assert "Paris" in capital.choices[0].message.content
    assert capital.choices[0].finish_reason == "stop"  # ends its turn by itself
    sums = sync.chat.completions.create(
        model=smollm2.model, messages=[{"role": "user", "content": "What is 2+2?"}], max_tokens=30
    )  # the model's own sampling defaults (temperature 0.2, top_p 0.9)
    assert "4" in sums.choices[0].message.content


def client(dep):
    return openai.AsyncOpenAI(base_url=f"{dep.base_url}/v1", api_key="none", max_retries=0)


@pytest.mark.parametrize("stream", [False, True])
async def test_required_tool_choice_returns_valid_calls(smollm2, stream):
    async with client(smollm2) as c:
        await tool_cases.required_calls(c, smollm2.model, stream)


@pytest.mark.parametrize("stream", [False, True])
async def test_a_named_tool_choice_calls_that_function(smollm2, stream):
    async with client(smollm2) as c:
        await tool_cases.named_call(c, smollm2.model, stream)


def test_auto_tool_choice_parses_smollm2s_format(smollm2):
    answer = smollm2.client().chat.completions.create(
        model=smollm2.model, messages=ASK, tools=[WEATHER, TIME], max_tokens=80, temperature=0
    )
    choice = answer.choices[0]
    for call in choice.message.tool_calls or []:
        check_call(call.function.name, call.function.arguments)
    assert "<tool_call>" not in (choice.message.content or "")
    if choice.message.tool_calls:
        assert choice.finish_reason == "tool_calls"
    else:
        assert choice.finish_reason in ("stop", "length") and choice.message.content


async def test_json_schema_output_parses_and_validates(smollm2):
    async with client(smollm2) as c:
        await tool_cases.json_schema_output(c, smollm2.model)


async def test_vllm_extras_constrain_and_bad_ones_are_400s(smollm2):
    async with client(smollm2) as c:
        await tool_cases.guided_choice(c, smollm2.model)
    sync = smollm2.client()
    digits = sync.completions.create(
        model=smollm2.model, prompt="The year is", max_tokens=4, extra_body={"guided_regex": "[0-9]{4}"}
    )
    assert digits.choices[0].text.isdigit() and len(digits.choices[0].text) == 4
    with pytest.raises(openai.BadRequestError):  # vLLM's structured-output backend refuses this pattern
        sync.completions.create(model=smollm2.model, prompt="x", max_tokens=4, extra_body={"guided_regex": "(?<=a)b"})
    with pytest.raises(openai.BadRequestError):  # a JSON schema vLLM's backend cannot compile
        sync.completions.create(
            model=smollm2.model, prompt="x", max_tokens=4, extra_body={"guided_json": {"type": "no-such-type"}}
        )


# A worker killed mid-stream (keep this last: the deployment has one worker fewer afterwards)
PROMPT = [{"role": "user", "content": "Write a long story about a lighthouse keeper and the sea."}]
MAX_TOKENS = 96


def stream_story(dep: Any, on_chunk: Any = None) -> tuple[str, int]:
    chunks = dep.client().chat.completions.create(
        model=dep.model,
        messages=PROMPT,
        max_tokens=MAX_TOKENS,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    text, usage, n = "", 0, 0
    for chunk in chunks:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            n += 1
            if on_chunk is not None:
                on_chunk(n)
        if chunk.usage is not None:
            usage = chunk.usage.completion_tokens
    return text, usage


def test_a_killed_worker_s_stream_completes_greedy_identical(smollm2: Any) -> None:  # last: it kills a worker
    dep = smollm2
    undisturbed, tokens = stream_story(dep)
    assert tokens == MAX_TOKENS
    killed: list[str] = []

    def kill_the_busy_worker(n: int) -> None:
        if n == 24 and not killed:
            workers = get_json(f"{dep.base_url}/health")[1]["workers"]
            [busy] = [w["id"] for w in workers if w["in_flight"]]
            os.killpg(dep.roles()[busy], signal.SIGKILL)
            killed.append(busy)

    disturbed, tokens = stream_story(dep, kill_the_busy_worker)
    assert killed and tokens == MAX_TOKENS
    assert disturbed == undisturbed
    metrics = scrape(dep.metrics["frontend"])
    assert metrics.get('zdyn_reissued_requests_total{cause="peer_lost",kind="migration",role="frontend"}') == 1
