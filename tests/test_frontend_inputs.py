"""Which request bodies the frontend accepts and which it refuses (with what status and ``param``), and a fuzz
test: no body, however odd, gets a 500."""

import msgspec
import pytest
from frontend_fake import CHAT, COMPLETION, SyncClient, client, count
from frontend_fake import make_frontend as frontend
from helpers import examples
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zdyn.frontend.schema import ChatRequest, CompletionRequest

USER = {"role": "user", "content": "hi"}
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
CALL = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}

ACCEPTED = [  # harmless nulls and defaults of what zdyn does not implement, and OpenAI's optional fields
    ("chat", {"tools": [TOOL]}),
    ("chat", {"tools": [TOOL], "tool_choice": "auto", "parallel_tool_calls": False}),
    ("chat", {"tools": [TOOL], "tool_choice": "required"}),
    ("chat", {"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "f"}}}),
    ("chat", {"tools": [TOOL], "tool_choice": "none"}),
    ("chat", {"tools": [TOOL, {"type": "function", "function": {"name": "g-2", "description": "d"}}]}),
    ("chat", {"response_format": {"type": "json_object"}}),
    ("chat", {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}),
    ("chat", {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}, "strict": True}}}),
    ("chat", {"guided_json": {"type": "object"}}),
    ("chat", {"guided_json": '{"type": "object"}'}),
    ("chat", {"guided_regex": "[a-z]+", "guided_json": None}),
    ("chat", {"guided_choice": ["yes", "no"]}),
    ("chat", {"guided_grammar": "root ::= 'a'"}),
    ("chat", {"structured_outputs": {"choice": ["a"], "disable_any_whitespace": True}}),
    ("chat", {"structured_outputs": {"json_object": True}}),
    ("completions", {"guided_choice": ["yes", "no"]}),
    ("completions", {"structured_outputs": {"regex": "a+"}}),
    ("chat", {"tools": None}),
    ("chat", {"tools": []}),
    ("chat", {"tool_choice": "none"}),
    ("chat", {"tool_choice": None, "parallel_tool_calls": True}),
    ("chat", {"functions": None, "function_call": None}),
    ("chat", {"functions": [], "function_call": "none"}),
    ("chat", {"prediction": None, "audio": None, "web_search_options": None, "reasoning_effort": None}),
    ("chat", {"response_format": None}),
    ("chat", {"response_format": {"type": "text"}}),
    ("chat", {"modalities": ["text"]}),
    ("chat", {"logit_bias": {}}),
    ("chat", {"logit_bias": None, "guided_json": None, "structured_outputs": None, "prompt_logprobs": None}),
    ("chat", {"stream_options": None, "stream": False}),
    ("chat", {"user": "u", "metadata": {"k": "v"}, "store": False, "service_tier": "auto"}),
    ("chat", {"safety_identifier": "s", "prompt_cache_key": "p"}),
    ("chat", {"nvext": {"ignore_eos": True, "greed_sampling": 1}}),
    ("chat", {"seed": 2**63 - 1}),
    ("chat", {"seed": -(2**63)}),
    ("chat", {"n": 16, "temperature": 2, "top_p": 1, "top_k": -1, "min_p": 0, "max_tokens": 2**31 - 1}),
    ("chat", {"top_logprobs": 0}),
    ("chat", {"logprobs": True, "top_logprobs": 20}),
    ("chat", {"messages": [{"role": "system", "content": "s"}, USER]}),
    ("chat", {"messages": [{"role": "developer", "content": [{"type": "text", "text": "d"}]}, USER]}),
    ("chat", {"messages": [{"role": "user", "content": ""}]}),
    ("chat", {"messages": [USER, {"role": "assistant", "content": "", "refusal": None}, USER]}),
    (
        "chat",
        {
            "messages": [
                USER,
                {"role": "assistant", "tool_calls": [CALL]},
                {"role": "tool", "content": "x", "tool_call_id": "c1"},
            ]
        },
    ),
    (
        "chat",
        {"messages": [USER, {"role": "assistant", "content": None, "function_call": {"name": "f", "arguments": "{}"}}]},
    ),
    (
        "chat",
        {
            "messages": [
                USER,
                {"role": "assistant", "content": "a", "tool_calls": None, "annotations": [], "audio": None},
            ]
        },
    ),
    ("chat", {"messages": [USER, {"role": "function", "name": "f", "content": None}]}),
    ("completions", {"best_of": 1}),
    ("completions", {"best_of": 2, "n": 2}),
    ("completions", {"echo": False, "suffix": None}),
    ("completions", {"suffix": ""}),
    ("completions", {"logprobs": 0}),
    ("completions", {"prompt": [1, 2, 3]}),
    ("completions", {"prompt": ["x"]}),
    ("completions", {"prompt": [[1, 2]]}),
]

REJECTED = [  # (endpoint, fields, status, param)
    ("chat", {"tool_choice": "auto"}, 400, "tool_choice"),
    ("chat", {"tool_choice": "required", "tools": []}, 400, "tool_choice"),
    ("chat", {"tool_choice": {"type": "function", "function": {"name": "f"}}}, 400, "tool_choice"),
    ("chat", {"tool_choice": "sometimes"}, 400, "tool_choice"),
    ("chat", {"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "g"}}}, 400, "tool_choice"),
    ("chat", {"tools": [TOOL], "tool_choice": "required", "guided_regex": "a"}, 400, "tool_choice"),
    ("chat", {"tools": [TOOL, TOOL]}, 400, "tools[1].function.name"),
    ("chat", {"tools": [{"type": "function", "function": {"name": "a b"}}]}, 400, "tools[0].function.name"),
    (
        "chat",
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]},
        400,
        "tools[0].function.parameters",
    ),  # fmt: skip
    ("chat", {"tools": [{"type": "retrieval"}]}, 400, "tools[0].type"),
    ("chat", {"functions": [{"name": "f"}]}, 400, "functions"),
    ("chat", {"function_call": "auto"}, 400, "function_call"),
    ("chat", {"response_format": {"type": "xml"}}, 400, "response_format.type"),
    ("chat", {"response_format": {"type": "json_schema"}}, 400, "response_format.json_schema"),
    ("chat", {"response_format": {"type": "json_object"}, "guided_json": {}}, 400, "guided_json"),
    ("chat", {"guided_json": {"type": "object"}, "guided_regex": "a"}, 400, "guided_regex"),
    ("chat", {"guided_json": "{not json"}, 400, "guided_json"),
    ("chat", {"guided_json": "[1]"}, 400, "guided_json"),
    ("chat", {"guided_json": 5}, 400, "guided_json"),
    ("chat", {"guided_json": {"maximum": 2**64}}, 400, "guided_json"),
    ("chat", {"guided_regex": ""}, 400, "guided_regex"),
    ("chat", {"guided_choice": []}, 400, "guided_choice"),
    ("chat", {"guided_choice": [1]}, 400, "guided_choice[0]"),
    ("chat", {"structured_outputs": {}}, 400, "structured_outputs"),
    ("chat", {"structured_outputs": {"json_object": False}}, 400, "structured_outputs"),
    ("chat", {"structured_outputs": {"regex": "a", "choice": ["a"]}}, 400, "structured_outputs.choice"),
    ("chat", {"structured_outputs": {"structural_tag": "x"}}, 400, "structured_outputs.structural_tag"),
    ("completions", {"guided_json": {}, "guided_choice": ["a"]}, 400, "guided_choice"),
    ("chat", {"prediction": {"type": "content", "content": "x"}}, 400, "prediction"),
    ("chat", {"modalities": ["text", "audio"]}, 400, "modalities"),
    ("chat", {"audio": {"voice": "alloy"}}, 400, "audio"),
    ("chat", {"reasoning_effort": "low"}, 400, "reasoning_effort"),
    ("chat", {"logit_bias": {"50256": -100}}, 400, "logit_bias"),
    ("chat", {"stream_options": {"include_usage": True}}, 400, "stream_options"),
    ("chat", {"stream": True, "stream_options": {"include_usage": True, "bogus": 1}}, 400, "stream_options.bogus"),
    ("chat", {"bogus": 1}, 400, "bogus"),
    ("chat", {"top_logprobs": 2}, 400, "top_logprobs"),
    ("chat", {"logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    ("chat", {"seed": 2**63}, 400, "seed"),
    ("chat", {"seed": 2**64}, 400, "seed"),
    ("chat", {"seed": -(2**63) - 1}, 400, "seed"),
    ("chat", {"seed": 1.5}, 400, "seed"),
    ("chat", {"n": 0}, 400, "n"),
    ("chat", {"n": 17}, 400, "n"),
    ("chat", {"max_tokens": 0}, 400, "max_tokens"),
    ("chat", {"max_tokens": 2**31}, 400, "max_tokens"),
    ("chat", {"max_tokens": True}, 400, "max_tokens"),
    ("chat", {"max_completion_tokens": -1}, 400, "max_completion_tokens"),
    ("chat", {"min_tokens": -1}, 400, "min_tokens"),
    ("chat", {"top_k": -2}, 400, "top_k"),
    ("chat", {"top_p": 0}, 400, "top_p"),
    ("chat", {"temperature": 2.5}, 400, "temperature"),
    ("chat", {"temperature": "hot"}, 400, "temperature"),
    ("chat", {"presence_penalty": -3}, 400, "presence_penalty"),
    ("chat", {"repetition_penalty": 0}, 400, "repetition_penalty"),
    ("chat", {"stop": ["a"] * 17}, 400, "stop"),
    ("chat", {"stop": [1]}, 400, "stop[0]"),
    ("chat", {"stop_token_ids": [-1]}, 400, "stop_token_ids[0]"),
    ("chat", {"stop_token_ids": [2**40]}, 400, "stop_token_ids[0]"),
    ("chat", {"stream": "yes"}, 400, "stream"),
    ("chat", {"metadata": {"k": 1}}, 400, "metadata"),
    ("chat", {"chat_template_kwargs": {"x": 2**64}}, 400, "chat_template_kwargs"),
    ("chat", {"chat_template_kwargs": []}, 400, "chat_template_kwargs"),
    ("chat", {"messages": []}, 400, "messages"),
    ("chat", {"messages": "hi"}, 400, "messages"),
    ("chat", {"messages": ["hi"]}, 400, "messages[0]"),
    ("chat", {"messages": [{"content": "hi"}]}, 400, "messages[0].role"),
    ("chat", {"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role"),
    ("chat", {"messages": [{"role": "user"}]}, 400, "messages[0].content"),
    ("chat", {"messages": [{"role": "user", "content": None}]}, 400, "messages[0].content"),
    ("chat", {"messages": [{"role": "user", "content": []}]}, 400, "messages[0].content"),
    ("chat", {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ("chat", {"messages": [{"role": "system"}, USER]}, 400, "messages[0].content"),
    ("chat", {"messages": [USER, {"role": "assistant"}]}, 400, "messages[1].content"),
    (
        "chat",
        {"messages": [USER, {"role": "assistant", "content": None, "tool_calls": []}]},
        400,
        "messages[1].content",
    ),
    ("chat", {"messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0].tool_call_id"),
    ("chat", {"messages": [{"role": "user", "content": "x", "extra": 1}]}, 400, "messages[0].extra"),
    (
        "chat",
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]}]},
        400,
        "messages[0].content[0]",
    ),
    ("chat", {"messages": [{"role": "user", "content": [{"type": "video"}]}]}, 400, "messages[0].content[0].type"),
    ("chat", {"model": None}, 400, "model"),
    ("chat", {"model": "nope"}, 404, "model"),
    ("completions", {"prompt": ""}, 400, "prompt"),
    ("completions", {"prompt": [""]}, 400, "prompt"),
    ("completions", {"prompt": []}, 400, "prompt"),
    ("completions", {"prompt": [[]]}, 400, "prompt"),
    ("completions", {"prompt": None}, 400, "prompt"),
    ("completions", {"prompt": ["a", "b"]}, 400, "prompt"),
    ("completions", {"prompt": [1, "a"]}, 400, "prompt"),
    ("completions", {"prompt": [-1]}, 400, "prompt[0]"),
    ("completions", {"prompt": [True]}, 400, "prompt[0]"),
    ("completions", {"echo": True}, 400, "echo"),
    ("completions", {"suffix": "x"}, 400, "suffix"),
    ("completions", {"best_of": 2}, 400, "best_of"),
    ("completions", {"best_of": 1, "n": 2}, 400, "best_of"),
    ("completions", {"logprobs": 21}, 400, "logprobs"),
    ("completions", {"logprobs": True}, 400, "logprobs"),
    ("completions", {"messages": [USER]}, 400, "messages"),
]


def _body(endpoint, fields):
    return {**(CHAT if endpoint == "chat" else COMPLETION), **fields}


@pytest.mark.parametrize("endpoint, fields", ACCEPTED)
async def test_accepted(endpoint, fields):
    f = frontend()
    async with client(f) as c:
        r = await c.post(_path(endpoint), json=_body(endpoint, fields))
    assert r.status_code == 200, r.text
    assert count(f, "zdyn_requests_total", endpoint=endpoint, status="success") == 1


@pytest.mark.parametrize("endpoint, fields, status, param", REJECTED)
async def test_rejected(endpoint, fields, status, param):
    f = frontend()
    async with client(f) as c:
        r = await c.post(_path(endpoint), json=_body(endpoint, fields))
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["code"] == status and error["message"]
    assert count(f, "zdyn_requests_total", endpoint=endpoint, status=f"error_{status}") == 1
    assert f.backend.requests == []


FIELDS = sorted(set(ChatRequest.__struct_fields__) | set(CompletionRequest.__struct_fields__) | {"x", "role"})
JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from(["", "m", "user", "assistant", "text", "function", "none", "auto"])
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=8,
)
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "system", "tool", "robot"])},
    optional={"content": JSON, "tool_calls": JSON, "tool_call_id": JSON, "name": JSON},
)


@pytest.fixture
def fuzz():
    """A frontend and a synchronous client of it, for hypothesis."""
    f = frontend()
    sync = SyncClient(f)
    yield f, sync
    sync.close()


def _path(endpoint):
    return "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"


def fuzz_settings(budget: int) -> settings:
    return settings(max_examples=budget, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("budget", examples(20, 100))
@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_fuzz_random_json_is_never_a_500(endpoint, fuzz, budget):
    f, sync = fuzz

    @fuzz_settings(budget)
    @given(body=JSON)
    def check(body):
        assert sync.post(_path(endpoint), msgspec.json.encode(body)) in (200, 400, 404)

    check()
    assert count(f, "zdyn_internal_errors_total") == 0


@pytest.mark.parametrize("budget", examples(20, 100))
@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_fuzz_valid_bodies_with_random_fields_are_never_a_500(endpoint, fuzz, budget):
    f, sync = fuzz
    base = CHAT if endpoint == "chat" else COMPLETION

    @fuzz_settings(budget)
    @given(fields=st.dictionaries(st.sampled_from(FIELDS), JSON, max_size=4), messages=st.lists(MESSAGE, max_size=3))
    def check(fields, messages):
        body = {**base, **fields}
        if endpoint == "chat" and messages:
            body["messages"] = messages
        assert sync.post(_path(endpoint), msgspec.json.encode(body)) in (200, 400, 404)

    check()
    assert count(f, "zdyn_internal_errors_total") == 0
    assert count(f, "zdyn_requests_total", endpoint=endpoint, status="success") > 0


@pytest.mark.parametrize("budget", examples(20, 100))
def test_fuzz_bytes_are_never_a_500(fuzz, budget):
    f, sync = fuzz

    @fuzz_settings(budget)
    @given(body=st.binary(max_size=64))
    def check(body):
        assert sync.post("/v1/chat/completions", body) == 400

    check()
    assert count(f, "zdyn_internal_errors_total") == 0
