"""Tool calls and structured outputs through the HTTP API with the openai SDK, on the mocker: the frontend app with
its processor and a mocker worker in this process (the quick loop), and as processes with a processor of its own
(slow). The mocker answers a constrained request with a valid output (``engines/mocker/structured``), so the same
checks hold as on SmolLM2 (``test_smollm2_e2e``)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import tool_cases
from tool_cases import ASK, WEATHER

from zdyn.bench.deploy import ZdynSpec, start
from zdyn.frontend.app import Frontend
from zdyn.frontend.http import HttpSettings
from zdyn.processor import Processor
from zdyn.roles import worker as worker_role
from zdyn.roles.common import CommonConfig
from zdyn.roles.frontend import FrontendConfig, build_backend
from zdyn.roles.output_parsing import OutputParsingConfig
from zdyn.transport import Liveness
from zdyn.worker import Worker

LIVENESS = Liveness(interval_s=0.2, misses=10)  # one loop runs every role: a busy moment is no dead peer
MODEL = "tiny-llama"

pytestmark = pytest.mark.slow  # starts a deployment's processes; tests/test_inprocess_topology.py is the quick loop's


class InProcess:
    """examples/agg in this event loop: the frontend's ASGI app (with its processor) and one mocker worker."""

    def __init__(self, http: httpx.AsyncClient, frontend: Frontend) -> None:
        self.http = http
        self.frontend = frontend
        self.client = openai.AsyncOpenAI(base_url="http://zdyn/v1", api_key="none", http_client=http, max_retries=0)


@contextlib.asynccontextmanager
async def in_process(config: FrontendConfig, model: Path) -> AsyncIterator[InProcess]:
    """The frontend of ``config`` with its processor, and one mocker worker of ``model``, in this event loop."""
    backend, hub, _ = build_backend(config)
    assert isinstance(backend, Processor)
    await hub.start()
    argv = ["--engine", "mocker", "--model", str(model), "--speedup", "50", "--connect", hub.endpoint,
            "--worker-id", "w0"]  # fmt: skip
    worker_config = worker_role.WorkerConfig.from_args(worker_role.build_parser("mocker").parse_args(argv))
    worker = Worker(worker_role.make_engine(worker_config, 0), worker_config.hubs, "w0", advertise_host="127.0.0.1",
                    liveness=LIVENESS)  # fmt: skip
    task = asyncio.get_running_loop().create_task(worker.run())
    frontend = Frontend(backend, HttpSettings())
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=frontend.app()), base_url="http://zdyn")
    try:
        await hub.wait_for_peers(1, timeout_s=20)
        yield InProcess(http, frontend)
    finally:
        await http.aclose()
        worker.close()
        assert await asyncio.wait_for(task, 20) == 0
        await backend.selector.aclose()
        await hub.close()


@pytest.fixture
async def agg(tiny_model: Path, tcp_endpoint: Callable[[], str]) -> AsyncIterator[InProcess]:
    config = FrontendConfig(model=str(tiny_model), workers_endpoint=tcp_endpoint(),
                            common=CommonConfig(liveness=LIVENESS))  # fmt: skip
    async with in_process(config, tiny_model) as agg:
        yield agg


@pytest.mark.parametrize("stream", [False, True])
async def test_required_tool_choice_returns_valid_calls(agg: InProcess, stream: bool) -> None:
    await tool_cases.required_calls(agg.client, MODEL, stream)


@pytest.mark.parametrize("stream", [False, True])
async def test_a_named_tool_choice_calls_that_function(agg: InProcess, stream: bool) -> None:
    await tool_cases.named_call(agg.client, MODEL, stream)


async def test_json_schema_output_parses_and_validates(agg: InProcess) -> None:
    await tool_cases.json_schema_output(agg.client, MODEL)


async def test_guided_choice(agg: InProcess) -> None:
    await tool_cases.guided_choice(agg.client, MODEL)


async def test_auto_without_a_tool_parser_is_a_400_naming_the_flag(agg: InProcess) -> None:
    r = await agg.http.post("/v1/chat/completions", json={"model": MODEL, "messages": ASK, "tools": [WEATHER]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice"
    assert "--tool-call-parser" in r.json()["error"]["message"]


async def test_harmless_nulls_pass_and_bad_input_is_refused(agg: InProcess) -> None:
    user = [{"role": "user", "content": "hi"}]
    ok: dict[str, Any] = {"model": MODEL, "messages": user, "max_tokens": 2, "tools": None, "functions": None,
                          "prediction": None, "tool_choice": "none"}  # fmt: skip

    async def status(path: str, body: dict[str, Any], content_type: str = "application/json") -> int:
        r = await agg.http.post(path, content=httpx.Request("POST", "/", json=body).content,
                                headers={"content-type": content_type})  # fmt: skip
        return r.status_code

    assert await status("/v1/chat/completions", ok) == 200
    assert await status("/v1/chat/completions", {**ok, "tools": []}) == 200
    assert await status("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 2, "best_of": 1}) == 200
    assert await status("/v1/chat/completions", {**ok, "messages": [{"role": "robot", "content": "hi"}]}) == 400
    assert await status("/v1/chat/completions", {**ok, "messages": [*user, {"role": "assistant"}]}) == 400
    assert await status("/v1/chat/completions", ok, content_type="text/plain") == 400
    assert await status("/v1/chat/completions", ok, content_type="") == 400


@pytest.mark.slow
async def test_calls_cross_a_separate_processor(tiny_model: Path, tmp_path: Path) -> None:
    """With a processor of its own (processes), the request's tools reach it in ``Process`` and its calls come back
    in the deltas: the same answers as with the processor in the frontend."""
    spec = ZdynSpec("agg", engine="mocker", model=str(tiny_model), processors=1)
    with start(spec, tmp_path / "logs", timeout_s=120) as dep:
        client = openai.AsyncOpenAI(base_url=f"{dep.base_url}/v1", api_key="none", max_retries=0)
        await tool_cases.required_calls(client, dep.model, stream=True)
        await tool_cases.named_call(client, dep.model, stream=False)
        await client.close()


@pytest.mark.slow  # imports vLLM (its reasoning parser), and so torch, whose jit module warns about itself
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
async def test_reasoning_content_through_the_pipeline(tiny_model: Path, tmp_path: Path, tcp_endpoint: Any) -> None:
    """A model with thinking tags (the tiny model's tokenizer plus <think> and </think>), the frontend started with
    --reasoning-parser deepseek_r1, and a mocker that answers a guided choice with thinking text: the thinking ends
    up in reasoning_content, the rest in content, streamed or not."""
    from transformers import AutoTokenizer

    model = tmp_path / "thinking" / MODEL  # served under the same name
    shutil.copytree(tiny_model, model)
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model))
    tokenizer.add_tokens(["<think>", "</think>"], special_tokens=True)
    tokenizer.save_pretrained(str(model))
    config = FrontendConfig(model=str(model), workers_endpoint=tcp_endpoint(),
                            common=CommonConfig(liveness=LIVENESS),
                            output_parsing=OutputParsingConfig(reasoning_parser="deepseek_r1"))  # fmt: skip
    answer = {"guided_choice": ["<think>Paris is in France.</think>Sunny."]}
    async with in_process(config, model) as agg:
        whole = await agg.client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=40, extra_body=answer)
        message = whole.choices[0].message
        assert message.content == "Sunny." and message.model_extra["reasoning_content"] == "Paris is in France."
        reasoning, content = "", ""
        stream = await agg.client.chat.completions.create(
            model=MODEL, messages=ASK, max_tokens=40, extra_body=answer, stream=True
        )
        async for chunk in stream:
            delta = chunk.choices[0].delta
            reasoning += (delta.model_extra or {}).get("reasoning_content") or ""
            content += delta.content or ""
        assert (reasoning, content) == ("Paris is in France.", "Sunny.")
