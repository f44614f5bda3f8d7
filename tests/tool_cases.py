"""Tool-calling and structured-output checks through the openai SDK (``AsyncOpenAI``), shared by the SmolLM2-on-vLLM
deployment and the mocker ones: the answers must parse and validate against the tools' and formats' schemas."""

from __future__ import annotations

import json
from typing import Any

import jsonschema

CITY = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"]}
WEATHER = {
    "type": "function",
    "function": {"name": "get_weather", "description": "Weather in a city", "parameters": CITY},
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Local time in a timezone",
        "parameters": {
            "type": "object",
            "properties": {"timezone": {"type": "string", "enum": ["UTC", "CET", "PST"]}},
            "required": ["timezone"],
        },
    },
}
ASK = [{"role": "user", "content": "What is the weather like in Paris?"}]
SCHEMAS = {"get_weather": CITY, "get_time": TIME["function"]["parameters"]}


def check_call(name: str, arguments: str) -> None:
    assert name in SCHEMAS
    jsonschema.validate(json.loads(arguments), SCHEMAS[name])


async def streamed(client: Any, **kw: Any) -> tuple[list[list[str]], str, str]:
    """Stream a chat completion; its calls (id, name, arguments) assembled by index, content and finish reason."""
    calls: dict[int, list[str]] = {}
    content, finish = "", ""
    async for chunk in await client.chat.completions.create(stream=True, **kw):
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for call in choice.delta.tool_calls or []:
            if call.index not in calls:
                assert call.id and call.function.name, "a call's first chunk carries its id and name"
                calls[call.index] = [call.id, call.function.name, ""]
            else:
                assert call.id is None and call.function.name is None
            calls[call.index][2] += call.function.arguments or ""
        finish = choice.finish_reason or finish
    return [calls[i] for i in sorted(calls)], content, finish


async def required_calls(client: Any, model: str, stream: bool) -> None:
    """tool_choice "required": valid calls of the tools, finish_reason "tool_calls", no content."""
    kw = dict(model=model, messages=ASK, tools=[WEATHER, TIME], tool_choice="required", max_tokens=120,
              temperature=0)  # fmt: skip
    if stream:
        calls, content, finish = await streamed(client, **kw)
    else:
        choice = (await client.chat.completions.create(**kw)).choices[0]
        calls = [[c.id, c.function.name, c.function.arguments] for c in choice.message.tool_calls or []]
        content, finish = choice.message.content, choice.finish_reason
    assert calls and finish == "tool_calls" and not content
    for _id, name, arguments in calls:
        check_call(name, arguments)


async def named_call(client: Any, model: str, stream: bool) -> None:
    """A named tool_choice: one valid call of that function, finish_reason "stop" (as OpenAI), no content."""
    choice = {"type": "function", "function": {"name": "get_weather"}}
    kw = dict(model=model, messages=ASK, tools=[TIME, WEATHER], tool_choice=choice, max_tokens=60,
              temperature=0)  # fmt: skip
    if stream:
        calls, content, finish = await streamed(client, **kw)
    else:
        answer = (await client.chat.completions.create(**kw)).choices[0]
        calls = [[c.id, c.function.name, c.function.arguments] for c in answer.message.tool_calls or []]
        content, finish = answer.message.content, answer.finish_reason
    assert [name for _, name, _ in calls] == ["get_weather"] and finish == "stop" and not content
    check_call("get_weather", calls[0][2])


PLACE = {  # bounded: a free integer lets a small model write digits until max_tokens
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 30},
        "country": {"type": "string", "maxLength": 30},
        "is_capital": {"type": "boolean"},
    },
    "required": ["name", "country", "is_capital"],
    "additionalProperties": False,
}


async def json_schema_output(client: Any, model: str) -> None:
    answer = await client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Describe the capital of France as JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": PLACE}},
        max_tokens=150,
        temperature=0,
    )
    assert answer.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(answer.choices[0].message.content), PLACE)


async def guided_choice(client: Any, model: str) -> None:
    answer = await client.chat.completions.create(
        model=model, messages=ASK, max_tokens=10, extra_body={"guided_choice": ["sunny", "rainy"]}
    )
    assert answer.choices[0].message.content in ("sunny", "rainy")
