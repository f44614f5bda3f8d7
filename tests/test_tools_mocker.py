"""Tool calls and structured outputs through a mocker deployment (frontend and a simulated worker as processes),
with the openai SDK. The mocker answers a constrained request with a valid output (``engines/mocker/structured``),
so the same checks hold as on SmolLM2 (``test_tools_smollm2_e2e``)."""

from __future__ import annotations

import httpx
import pytest
import tool_cases
from tool_cases import ASK, WEATHER

from zdyn.bench.deploy import ZdynSpec, start

pytestmark = pytest.mark.slow  # starts a deployment's processes; tests/test_inprocess_topology.py is the quick loop's


@pytest.fixture(scope="module")
def mocker(tiny_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mocker-tools")
    spec = ZdynSpec("agg", engine="mocker", model=str(tiny_model), config={"Worker.mocker": {"speedup": 20.0}})
    with start(spec, tmp / "logs", timeout_s=120) as dep:
        yield dep


@pytest.mark.parametrize("stream", [False, True])
def test_required_tool_choice_returns_valid_calls(mocker, stream):
    tool_cases.required_calls(mocker, stream)


@pytest.mark.parametrize("stream", [False, True])
def test_a_named_tool_choice_calls_that_function(mocker, stream):
    tool_cases.named_call(mocker, stream)


def test_json_schema_output_parses_and_validates(mocker):
    tool_cases.json_schema_output(mocker)


def test_guided_choice(mocker):
    tool_cases.guided_choice(mocker)


def test_auto_without_a_tool_parser_is_a_400_naming_the_flag(mocker):
    r = httpx.post(
        f"{mocker.base_url}/v1/chat/completions",
        json={"model": mocker.model, "messages": ASK, "tools": [WEATHER]},
        timeout=30,
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice"
    assert "--tool-call-parser" in r.json()["error"]["message"]


def test_harmless_nulls_pass_and_bad_input_is_refused(mocker):
    url = f"{mocker.base_url}/v1/chat/completions"
    user = [{"role": "user", "content": "hi"}]
    ok = {"model": mocker.model, "messages": user, "max_tokens": 2, "tools": None, "functions": None,
          "prediction": None, "tool_choice": "none"}  # fmt: skip
    assert httpx.post(url, json=ok, timeout=30).status_code == 200
    assert httpx.post(url, json={**ok, "tools": []}, timeout=30).status_code == 200
    completion = {"model": mocker.model, "prompt": "hi", "max_tokens": 2, "best_of": 1}
    assert httpx.post(f"{mocker.base_url}/v1/completions", json=completion, timeout=30).status_code == 200
    robot = {**ok, "messages": [{"role": "robot", "content": "hi"}]}
    assert httpx.post(url, json=robot, timeout=30).status_code == 400
    empty = {**ok, "messages": [*user, {"role": "assistant"}]}
    assert httpx.post(url, json=empty, timeout=30).status_code == 400
    body = httpx.Request("POST", url, json=ok).content
    assert httpx.post(url, content=body, headers={"content-type": "text/plain"}, timeout=30).status_code == 400
    assert httpx.post(url, content=body, headers={"content-type": ""}, timeout=30).status_code == 400


def test_calls_cross_a_separate_processor(tiny_model, tmp_path):
    """With a processor of its own, the request's tools reach it in ``Process`` and its calls come back in the
    deltas: the same answers as with the processor in the frontend."""
    spec = ZdynSpec("agg", engine="mocker", model=str(tiny_model), processors=1)
    with start(spec, tmp_path / "logs", timeout_s=120) as dep:
        tool_cases.required_calls(dep, stream=True)
        tool_cases.named_call(dep, stream=False)
