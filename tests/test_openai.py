"""OpenAI request parsing (body bytes -> TextRequest) and response shaping, without HTTP."""

import msgspec
import pytest

from zdyn.errors import RequestError
from zdyn.frontend.openai import parse_request, validation_error
from zdyn.frontend.responses import ResponseBuilder
from zdyn.protocol import Delta, Finish, TokenLogprob, TopLogprob

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def parse(endpoint, body, max_depth=64):
    return parse_request(endpoint, msgspec.json.encode(body), max_depth)


def test_chat_defaults():
    p = parse("chat", CHAT)
    assert p.model == "m" and not p.stream and not p.include_usage and not p.logprobs
    assert p.text.messages == [{"role": "user", "content": "hi"}]
    assert p.text.max_tokens is None and p.text.n == 1 and p.text.stop == [] and p.text.sampling_set == []
    assert p.text.sampling.temperature == 1.0 and p.text.sampling.logprobs is None
    assert p.text.skip_special_tokens and not p.text.include_stop_str_in_output and not p.text.sampling.ignore_eos


def test_chat_sampling_fields_are_carried():
    body = {
        **CHAT,
        "max_completion_tokens": 7,
        "max_tokens": 99,
        "temperature": 0,
        "top_p": 0.5,
        "top_k": 4,
        "min_p": 0.1,
        "seed": 3,
        "stop": "END",
        "stop_token_ids": [2],
        "presence_penalty": 0.5,
        "frequency_penalty": -0.5,
        "repetition_penalty": 1.1,
        "ignore_eos": True,
        "min_tokens": 2,
        "logprobs": True,
        "top_logprobs": 3,
        "n": 2,
        "stream": True,
        "stream_options": {"include_usage": True},
        "user": "someone",
        "skip_special_tokens": False,
        "include_stop_str_in_output": True,
    }
    p = parse("chat", body)
    s = p.text.sampling
    assert p.text.max_tokens == 7  # max_completion_tokens wins
    assert (s.temperature, s.top_p, s.top_k, s.min_p, s.seed) == (0.0, 0.5, 4, 0.1, 3)
    assert (s.presence_penalty, s.frequency_penalty, s.repetition_penalty) == (0.5, -0.5, 1.1)
    assert s.stop_token_ids == [2] and s.ignore_eos and s.min_tokens == 2 and s.logprobs == 3
    assert p.text.stop == ["END"] and p.stream and p.include_usage and p.logprobs and p.text.n == 2
    assert not p.text.skip_special_tokens and p.text.include_stop_str_in_output
    assert p.text.sampling_set == ["min_p", "repetition_penalty", "temperature", "top_k", "top_p"]


def test_messages_reach_the_template_as_plain_dicts():
    body = {
        "model": "m",
        "messages": [
            {"role": "developer", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]},
            {"role": "user", "content": "Weather?", "name": "ann"},
            {
                "role": "assistant",
                "content": None,
                "refusal": None,
                "annotations": [],
                "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
            },
            {"role": "tool", "content": "sunny", "tool_call_id": "c1"},
            {"role": "assistant", "content": [{"type": "refusal", "refusal": "No."}]},
        ],
        "nvext": {"ignore_eos": True, "annotations": ["x"]},
        "chat_template_kwargs": {"enable_thinking": False},
    }
    p = parse("chat", body)
    assert p.text.messages == [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": "Weather?", "name": "ann"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"id": "c1", "function": {"name": "f", "arguments": "{}"}, "type": "function"}],
        },
        {"role": "tool", "content": "sunny", "tool_call_id": "c1"},
        {"role": "assistant", "content": "No."},
    ]
    assert p.text.sampling.ignore_eos and p.text.chat_template_kwargs == {"enable_thinking": False}


def test_completions_prompt_forms():
    assert parse("completions", {"model": "m", "prompt": "x"}).text.prompt == "x"
    assert parse("completions", {"model": "m", "prompt": [1, 2]}).text.prompt == [1, 2]
    assert parse("completions", {"model": "m", "prompt": ["x"]}).text.prompt == "x"
    assert parse("completions", {"model": "m", "prompt": [[4, 5]]}).text.prompt == [4, 5]
    p = parse("completions", {"model": "m", "prompt": "x", "logprobs": 2, "best_of": 1, "echo": False})
    assert p.logprobs and p.text.sampling.logprobs == 2 and p.text.messages is None
    assert parse("completions", {"model": "m", "prompt": "x", "logprobs": 0}).text.sampling.logprobs == 0


@pytest.mark.parametrize(
    "message, param, detail",
    [
        ("Expected `int` >= 1 - at `$.max_tokens`", "max_tokens", "Invalid 'max_tokens': expected `int` >= 1."),
        ("Object missing required field `model`", "model", "Missing required parameter: 'model'."),
        (
            "Object missing required field `content` - at `$.messages[2]`",
            "messages[2].content",
            "Missing required parameter: 'messages[2].content'.",
        ),
        ("Object contains unknown field `x`", "x", "Unrecognized request argument supplied: x"),
        ("Object contains unknown field `x` - at `$.nvext`", "nvext.x", "Unrecognized argument 'x' in 'nvext'"),
        ("Expected `object`, got `array`", None, "The request body must be a JSON object"),
    ],
)
def test_msgspec_errors_become_openai_errors(message, param, detail):
    error = validation_error(message)
    assert (error.status, error.type, error.param) == (400, "invalid_request_error", param)
    assert error.message.startswith(detail)


def test_depth_of_free_form_json_is_bounded():
    nested: dict = {}
    inner = nested
    for _ in range(10):
        inner["a"] = {}
        inner = inner["a"]
    body = {**CHAT, "chat_template_kwargs": nested}
    assert parse("chat", body, max_depth=12).text.chat_template_kwargs == nested
    with pytest.raises(RequestError, match="nested too deeply") as err:
        parse("chat", body, max_depth=11)
    assert err.value.param == "chat_template_kwargs"
    deep = msgspec.json.encode(CHAT)[:-1] + b', "chat_template_kwargs": {"a": ' + b"[" * 10**5 + b"]" * 10**5 + b"}}"
    with pytest.raises(RequestError, match="nested too deeply"):
        parse_request("chat", deep)


def _finish(reason="stop", completion=2, cached=4, stop_reason=None):
    return Finish(
        reason=reason, stop_reason=stop_reason, prompt_tokens=10, completion_tokens=completion, cached_tokens=cached
    )


def test_chat_stream_chunks_follow_openai():
    p = parse("chat", {**CHAT, "stream": True, "stream_options": {"include_usage": True}})
    b = ResponseBuilder(p, "abc")
    first = b.chunks(Delta(request_id="abc", token_ids=[1], text="Hel"))
    assert [c["choices"][0]["delta"] for c in first] == [{"role": "assistant", "content": ""}, {"content": "Hel"}]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == "chatcmpl-abc" for c in first)
    assert all(c["usage"] is None and c["choices"][0]["finish_reason"] is None for c in first)
    assert b.chunks(Delta(request_id="abc", token_ids=[2], text="")) == []  # nothing to say yet
    last = b.chunks(Delta(request_id="abc", token_ids=[3], text="lo", finish=_finish()))
    assert last[0]["choices"][0]["delta"] == {"content": "lo"}
    assert last[0]["choices"][0]["finish_reason"] == "stop"
    usage = b.usage_chunk()
    assert usage["choices"] == []
    assert usage["usage"] == {
        "prompt_tokens": 10,
        "completion_tokens": 2,
        "total_tokens": 12,
        "prompt_tokens_details": {"cached_tokens": 4},
    }


def test_completion_response_and_logprobs():
    p = parse("completions", {"model": "m", "prompt": "x", "logprobs": 1})
    b = ResponseBuilder(p, "r")
    lp = [TokenLogprob(token_id=5, logprob=-0.1, token="He", top=[TopLogprob(token_id=5, logprob=-0.1, token="He")])]
    b.add(Delta(request_id="r", text="He", logprobs=lp))
    lp2 = [TokenLogprob(token_id=6, logprob=-0.2, token="y", top=[TopLogprob(token_id=7, logprob=-0.01, token="z")])]
    b.add(Delta(request_id="r", text="y", logprobs=lp2, finish=_finish("length")))
    body = b.response()
    assert body["object"] == "text_completion" and body["id"] == "cmpl-r"
    choice = body["choices"][0]
    assert choice["text"] == "Hey" and choice["finish_reason"] == "length"
    assert choice["logprobs"] == {
        "tokens": ["He", "y"],
        "token_logprobs": [-0.1, -0.2],
        "top_logprobs": [{"He": -0.1}, {"z": -0.01}],
        "text_offset": [0, 2],
    }


def test_chat_response_with_n_choices_sums_usage():
    p = parse("chat", {**CHAT, "n": 2, "logprobs": True})
    b = ResponseBuilder(p, "r")
    b.add(Delta(request_id="r", index=1, text="b", finish=_finish(completion=3)))
    lp = [TokenLogprob(token_id=1, logprob=-1.0, token="é")]
    b.add(Delta(request_id="r", index=0, text="a", logprobs=lp, finish=_finish(completion=2, stop_reason="\n")))
    body = b.response()
    assert [c["message"]["content"] for c in body["choices"]] == ["a", "b"]
    assert body["choices"][0]["stop_reason"] == "\n"
    assert body["usage"]["completion_tokens"] == 5 and body["usage"]["prompt_tokens"] == 10
    assert body["choices"][0]["logprobs"]["content"][0] == {
        "token": "é",
        "logprob": -1.0,
        "bytes": [195, 169],
        "top_logprobs": [],
    }
