"""Tool calling, structured outputs and reasoning without a deployment: request checks and the constraints they
build (frontend), per-choice output parsing (processor, with vLLM's parsers), and the OpenAI shapes of the result."""

from __future__ import annotations

import json

import msgspec
import pytest

from zdyn.engines.mocker.structured import scripted_token, valid_text
from zdyn.errors import RequestError
from zdyn.frontend.openai import parse_request
from zdyn.frontend.responses import ResponseBuilder
from zdyn.frontend.structured import named_schema, required_schema
from zdyn.protocol import Delta, Finish, Process, StructuredOutputs, TextRequest, ToolCallDelta, decode, encode
from zdyn.tools import OutputParsing, RequiredCalls, chat_template_inputs, parse_call_list

# importing vLLM's parsers imports torch, whose jit module warns about its own deprecation
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME = {"type": "function", "function": {"name": "get_time"}}
CHAT = {"model": "m", "messages": [{"role": "user", "content": "Weather in Paris?"}]}


def parse(body, endpoint="chat"):
    return parse_request(endpoint, msgspec.json.encode(body))


# ------------------------------------------------------------------------------------------ the frontend's side
def test_tools_default_to_auto_and_reach_the_processor_whole():
    text = parse({**CHAT, "tools": [WEATHER]}).text
    assert text.tool_choice == "auto" and text.tools == [WEATHER] and text.sampling.structured is None
    assert text.parallel_tool_calls
    again = decode(encode(Process(request_id="r", request=text)))  # a separate processor gets the same
    assert again.request.tools == [WEATHER] and again.request.tool_choice == "auto"


def test_required_is_constrained_to_an_array_of_calls_of_the_tools():
    text = parse({**CHAT, "tools": [WEATHER, TIME], "tool_choice": "required", "parallel_tool_calls": False}).text
    schema = json.loads(text.sampling.structured.json)
    assert text.tool_choice == "required" and schema == required_schema([WEATHER, TIME], parallel=False)
    assert schema["minItems"] == 1 and schema["maxItems"] == 1
    names = [option["properties"]["name"]["enum"] for option in schema["items"]["anyOf"]]
    assert names == [["get_weather"], ["get_time"]]
    assert schema["items"]["anyOf"][0]["properties"]["arguments"] == WEATHER["function"]["parameters"]
    assert schema["items"]["anyOf"][1]["properties"]["arguments"] == {"type": "object"}  # no parameters given
    assert "maxItems" not in required_schema([WEATHER], parallel=True)


def test_a_named_function_is_constrained_to_its_arguments():
    choice = {"type": "function", "function": {"name": "get_weather"}}
    text = parse({**CHAT, "tools": [TIME, WEATHER], "tool_choice": choice}).text
    assert text.tool_choice == "named" and text.tool_name == "get_weather"
    assert json.loads(text.sampling.structured.json) == WEATHER["function"]["parameters"]
    assert named_schema([TIME], "get_time") == {"type": "object"}


def test_tool_choice_none_keeps_the_output_free():
    text = parse({**CHAT, "tools": [WEATHER], "tool_choice": "none"}).text
    assert text.tool_choice == "none" and text.sampling.structured is None


@pytest.mark.parametrize(
    "fields, expected",
    [
        ({"response_format": {"type": "json_object"}}, {"json_object": True}),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "n"}}}, {"json_object": True}),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "integer"}}}},
            {"json": '{"type": "integer"}'},
        ),
        ({"guided_json": '{"type": "string"}'}, {"json": '{"type": "string"}'}),
        ({"guided_regex": "[0-9]+"}, {"regex": "[0-9]+"}),
        ({"guided_choice": ["yes", "no"]}, {"choice": ["yes", "no"]}),
        ({"guided_grammar": "root ::= 'a'"}, {"grammar": "root ::= 'a'"}),
        ({"structured_outputs": {"json": {"type": "object"}}}, {"json": '{"type": "object"}'}),
        ({"structured_outputs": {"json_object": True}}, {"json_object": True}),
    ],
)
def test_structured_outputs_become_one_constraint(fields, expected):
    structured = parse({**CHAT, **fields}).text.sampling.structured
    assert msgspec.to_builtins(structured) == expected


def test_completions_take_vllm_extras_too():
    text = parse({"model": "m", "prompt": "x", "guided_choice": ["a", "b"]}, "completions").text
    assert text.sampling.structured.choice == ["a", "b"]


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"guided_json": {"type": "object"}, "guided_choice": ["a"]}, "guided_choice"),
        ({"structured_outputs": {"regex": "a", "grammar": "g"}}, "structured_outputs.grammar"),
        ({"guided_json": "not json"}, "guided_json"),
    ],
)
def test_conflicting_or_bad_tool_and_format_fields_are_400s(fields, param):
    with pytest.raises(RequestError) as e:
        parse({**CHAT, **fields})
    assert e.value.status == 400 and e.value.param == param


# ------------------------------------------------------------------------------------------ the processor's side
def run(parsing: OutputParsing, request: TextRequest, pieces: list[str] | list[tuple[str, int]]) -> list[Delta]:
    """Feed ``pieces`` (text, or text and its token id; one delta each, the last one finishing) through the
    request's output parsing."""
    outputs = parsing.for_request(request)
    assert outputs is not None
    deltas = []
    for i, piece in enumerate(pieces):
        text, token_id = piece if isinstance(piece, tuple) else (piece, i)
        finish = Finish(reason="stop") if i == len(pieces) - 1 else None
        delta = Delta(request_id="r", token_ids=[token_id], text=text, finish=finish)
        outputs.apply(delta)
        deltas.append(delta)
    return deltas


def calls_of(deltas: list[Delta]) -> list[ToolCallDelta]:
    return [c for d in deltas for c in d.tool_calls or ()]


def test_a_named_call_streams_its_arguments():
    request = TextRequest(messages=[], tools=[WEATHER], tool_choice="named", tool_name="get_weather")
    deltas = run(OutputParsing(), request, ['{"city"', ': "Paris"', "}"])
    calls = calls_of(deltas)
    assert calls[0].name == "get_weather" and calls[0].id.startswith("call_")
    assert all(c.index == 0 and c.name is None for c in calls[1:])
    assert "".join(c.arguments for c in calls) == '{"city": "Paris"}'
    assert all(not d.text for d in deltas) and deltas[-1].finish.reason == "stop"  # a forced call ends with "stop"


def test_required_calls_are_parsed_when_the_choice_ends():
    request = TextRequest(messages=[], tools=[WEATHER, TIME], tool_choice="required")
    text = '[{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_time", "arguments": {}}]'
    deltas = run(OutputParsing(), request, [text[:20], text[20:]])
    calls = calls_of(deltas)
    assert [(c.index, c.name, json.loads(c.arguments)) for c in calls] == [
        (0, "get_weather", {"city": "Paris"}),
        (1, "get_time", {}),
    ]
    assert len({c.id for c in calls}) == 2 and deltas[-1].finish.reason == "tool_calls"


def test_without_parallel_calls_only_the_first_is_handed_out():
    request = TextRequest(messages=[], tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=False)
    text = '[{"name": "get_time", "arguments": {}}, {"name": "get_weather", "arguments": {"city": "Oslo"}}]'
    calls = calls_of(run(OutputParsing(), request, [text]))
    assert [(c.index, c.name) for c in calls] == [(0, "get_time")]


def test_required_output_cut_short_is_content():
    parser = RequiredCalls()
    assert parser.feed('[{"name": "get_we', [1], False).calls == []
    assert parser.feed("", [], True).content == '[{"name": "get_we'
    assert parse_call_list('{"name": "x"}') is None and parse_call_list("[]") is None
    assert parse_call_list('[{"name": "x", "parameters": {"a": 1}}]') == [("x", '{"a": 1}')]


def test_auto_needs_a_tool_parser():
    request = TextRequest(messages=[], tools=[WEATHER], tool_choice="auto")
    with pytest.raises(RequestError) as e:
        OutputParsing().for_request(request)
    assert e.value.status == 400 and e.value.param == "tool_choice"
    assert OutputParsing().for_request(TextRequest(messages=[], tools=[WEATHER], tool_choice="none")) is None
    assert OutputParsing().for_request(TextRequest(prompt="x")) is None


def test_templates_without_tools_get_them_in_the_system_message():
    call = {"id": "c", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "", "tool_calls": [call]}]
    out, extra = chat_template_inputs(messages, [WEATHER], "{{ messages }}")
    assert extra == {} and out[0]["role"] == "system" and '"get_weather"' in out[0]["content"]
    assert out[2]["content"] == '<tool_call>[{"name": "get_time", "arguments": {}}]</tool_call>'
    assert "tool_calls" not in out[2] and "tool_calls" in messages[1]  # the request's own messages are untouched
    system = [{"role": "system", "content": "Be brief."}, *messages[:1]]
    out, _ = chat_template_inputs(system, [WEATHER], None)
    assert out[0]["content"].startswith("Be brief.\n\n") and len(out) == 2
    assert chat_template_inputs(messages, [WEATHER], "{% for tool in tools %}") == (messages, {"tools": [WEATHER]})
    assert chat_template_inputs(messages, None, None) == (messages, {})


# ------------------------------------------------------------------------------------------ vLLM's parsers
@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    tok.add_tokens(["<tool_call>", "</tool_call>", "<think>", "</think>", "<|python_tag|>"], special_tokens=True)
    return tok


def vllm_parsing(tokenizer, tool_parser=None, reasoning_parser=None) -> OutputParsing:
    pytest.importorskip("vllm")
    from zdyn.roles.output_parsing import OutputParsingConfig

    return OutputParsingConfig(tool_parser, reasoning_parser).build(tokenizer)


def tokens(tokenizer, text: str) -> list[tuple[str, int]]:
    """``text`` cut into the pieces an engine would stream, token by token, with their token ids."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    return [(tokenizer.decode(ids[: i + 1])[len(tokenizer.decode(ids[:i])) :], t) for i, t in enumerate(ids)]


OUTPUTS = {
    "hermes": 'Let me look.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
    "smollm2": 'Let me look.<tool_call>[{"name": "get_weather", "arguments": {"city": "Paris"}}]</tool_call>',
    "llama3_json": '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}',
}


@pytest.mark.slow  # imports vLLM (seconds)
@pytest.mark.parametrize("name", sorted(OUTPUTS))
@pytest.mark.parametrize("stream", [False, True])
def test_vllm_tool_parsers_find_the_call_streamed_or_not(tokenizer, name, stream):
    parsing = vllm_parsing(tokenizer, name)
    request = TextRequest(messages=[], tools=[WEATHER], tool_choice="auto", stream=stream)
    deltas = run(parsing, request, tokens(tokenizer, OUTPUTS[name]))
    calls = calls_of(deltas)
    assert calls[0].name == "get_weather" and calls[0].id and [c.index for c in calls] == [0] * len(calls)
    assert json.loads("".join(c.arguments for c in calls)) == {"city": "Paris"}
    content = "".join(d.text or "" for d in deltas)
    assert "tool_call" not in content and "get_weather" not in content
    assert deltas[-1].finish.reason == "tool_calls"


@pytest.mark.slow  # imports vLLM (seconds)
@pytest.mark.parametrize("stream", [False, True])
def test_text_without_a_call_stays_content(tokenizer, stream):
    parsing = vllm_parsing(tokenizer, "hermes")
    request = TextRequest(messages=[], tools=[WEATHER], tool_choice="auto", stream=stream)
    deltas = run(parsing, request, tokens(tokenizer, "It is sunny in Paris."))
    assert "".join(d.text or "" for d in deltas) == "It is sunny in Paris." and not calls_of(deltas)
    assert deltas[-1].finish.reason == "stop"


@pytest.mark.slow  # imports vLLM (seconds)
@pytest.mark.parametrize("stream", [False, True])
def test_reasoning_is_split_off(tokenizer, stream):
    parsing = vllm_parsing(tokenizer, reasoning_parser="deepseek_r1")
    assert parsing.keeps_special_tokens
    pieces = tokens(tokenizer, "<think>Hmm, Paris.</think>Sunny.")
    deltas = run(parsing, TextRequest(messages=[], stream=stream), pieces)
    assert "".join(d.reasoning or "" for d in deltas) == "Hmm, Paris."
    assert "".join(d.text or "" for d in deltas) == "Sunny."
    assert parsing.for_request(TextRequest(prompt="x")) is None  # completions keep their text whole, as in vLLM


@pytest.mark.slow  # imports vLLM (seconds)
def test_unknown_parsers_and_unfit_tokenizers_are_refused_at_start(tokenizer, tiny_model):
    from transformers import AutoTokenizer

    with pytest.raises(ValueError, match="unknown --tool-call-parser 'nope'; choose one of .*hermes"):
        vllm_parsing(tokenizer, "nope")
    with pytest.raises(ValueError, match="unknown --reasoning-parser"):
        vllm_parsing(tokenizer, reasoning_parser="nope")
    plain = AutoTokenizer.from_pretrained(str(tiny_model))
    with pytest.raises(ValueError, match="output parser"):
        vllm_parsing(plain, "llama3_json")  # its tokenizer has no <|python_tag|>


# ------------------------------------------------------------------------------------------ response shapes
def chat_request(stream: bool):
    return parse({**CHAT, "tools": [WEATHER], "stream": stream})


def tool_deltas() -> list[Delta]:
    first = ToolCallDelta(index=0, id="call_1", name="get_weather", arguments='{"city"')
    return [
        Delta(request_id="r", reasoning="Paris, so", text="Checking."),
        Delta(request_id="r", tool_calls=[first]),
        Delta(
            request_id="r",
            tool_calls=[ToolCallDelta(index=0, arguments=': "Paris"}')],
            finish=Finish(reason="tool_calls"),
        ),
    ]


def test_streamed_tool_calls_follow_openai():
    builder = ResponseBuilder(chat_request(True), "r")
    chunks = [c for d in tool_deltas() for c in builder.chunks(d)]
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[1] == {"content": "Checking.", "reasoning_content": "Paris, so"}
    assert deltas[2] == {"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                         "function": {"name": "get_weather", "arguments": '{"city"'}}]}  # fmt: skip
    assert deltas[3] == {"tool_calls": [{"index": 0, "function": {"arguments": ': "Paris"}'}}]}
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_a_whole_response_has_the_calls_in_its_message():
    builder = ResponseBuilder(chat_request(False), "r")
    for delta in tool_deltas():
        builder.add(delta)
    choice = builder.response()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"] == {
        "role": "assistant",
        "content": "Checking.",
        "reasoning_content": "Paris, so",
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
        ],
    }
    only_calls = ResponseBuilder(chat_request(False), "r")
    only_calls.add(tool_deltas()[2])
    assert only_calls.response()["choices"][0]["message"]["content"] is None


# ------------------------------------------------------------------------------------------ the mocker's answers
@pytest.mark.parametrize(
    "schema",
    [
        {"type": "object"},
        WEATHER["function"]["parameters"],
        required_schema([WEATHER, TIME], parallel=True),
        {
            "type": "object",
            "properties": {
                "n": {"type": "integer", "minimum": 3},
                "ok": {"type": "boolean"},
                "tags": {"type": "array", "items": {"type": "string"}, "minItems": 2},
                "kind": {"enum": ["x", "y"]},
                "maybe": {"type": ["null", "number"]},
                "s": {"type": "string", "minLength": 4},
            },
            "required": ["n", "ok", "tags", "kind", "maybe", "s"],
        },  # fmt: skip
        {"anyOf": [{"type": "string"}, {"type": "integer"}]},
    ],
)
def test_the_mockers_answer_fits_the_schema(schema):
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(json.loads(valid_text(StructuredOutputs(json=json.dumps(schema)), seed=1)), schema)


def test_the_mockers_answers_to_other_constraints():
    assert valid_text(StructuredOutputs(choice=["a", "b", "c"]), seed=4) == "b"
    assert valid_text(StructuredOutputs(json_object=True), seed=0) == "{}"
    assert valid_text(StructuredOutputs(regex="[0-9]+"), seed=0) is None  # random tokens, as without a constraint
    assert (
        scripted_token([5, 6], 1, 2) == 6 and scripted_token([5, 6], 2, 2) == 2 and scripted_token(None, 0, 2) is None
    )


async def test_the_mocker_engine_gives_the_answer_then_eos(tiny_model):
    from tokenizers import Tokenizer

    from zdyn.engines.mocker import MockerConfig
    from zdyn.engines.mocker.engine import MockerEngine
    from zdyn.protocol import Generate, SamplingParams

    engine = MockerEngine(MockerConfig(model_path=str(tiny_model), speedup=100))
    await engine.start()
    try:
        sampling = SamplingParams(max_tokens=50, structured=StructuredOutputs(choice=["sunny", "rainy"]))
        out = [d async for d in engine.generate(Generate(request_id="r", token_ids=[1, 2, 3], sampling=sampling))]
    finally:
        await engine.shutdown()
    ids = [t for d in out for t in d.token_ids]
    tokenizer = Tokenizer.from_file(str(tiny_model / "tokenizer.json"))
    assert tokenizer.decode(ids[:-1]) in ("sunny", "rainy") and ids[-1] == engine.config.eos_token_id
    assert out[-1].finish.reason == "stop"


def test_a_choice_resumed_from_another_processor_continues_its_call():
    request = TextRequest(messages=[], tools=[WEATHER], tool_choice="named", tool_name="get_weather")
    outputs = OutputParsing().for_request(request)
    outputs.prime(0, '{"city": "Pa', [1, 2])  # what the client got from the processor that died
    rest = Delta(request_id="r", token_ids=[3], text='ris"}', finish=Finish(reason="stop"))
    outputs.apply(rest)
    assert [(c.index, c.id, c.name, c.arguments) for c in rest.tool_calls] == [(0, None, None, 'ris"}')]
    required = TextRequest(messages=[], tools=[WEATHER], tool_choice="required")
    outputs = OutputParsing().for_request(required)
    outputs.prime(0, '[{"name": "get_weather", ', [1])
    end = Delta(request_id="r", token_ids=[2], text='"arguments": {"city": "Rome"}}]', finish=Finish(reason="stop"))
    outputs.apply(end)
    assert end.tool_calls[0].name == "get_weather" and end.finish.reason == "tool_calls"
