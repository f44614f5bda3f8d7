import pytest

from zdyn.errors import RequestError
from zdyn.frontend.openai import ResponseBuilder, parse_request
from zdyn.protocol import Delta, Finish, TokenLogprob, TopLogprob

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def test_chat_defaults():
    p = parse_request("chat", CHAT)
    assert p.model == "m" and not p.stream and not p.include_usage and not p.logprobs
    assert p.text.messages == [{"role": "user", "content": "hi"}]
    assert p.text.max_tokens is None and p.text.n == 1 and p.text.stop == []
    assert p.text.sampling.temperature == 1.0 and p.text.sampling.logprobs is None


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
        "stream": True,
        "stream_options": {"include_usage": True},
        "user": "someone",
    }
    p = parse_request("chat", body)
    s = p.text.sampling
    assert p.text.max_tokens == 7  # max_completion_tokens wins
    assert (s.temperature, s.top_p, s.top_k, s.min_p, s.seed) == (0.0, 0.5, 4, 0.1, 3)
    assert (s.presence_penalty, s.frequency_penalty, s.repetition_penalty) == (0.5, -0.5, 1.1)
    assert s.stop_token_ids == [2] and s.ignore_eos and s.min_tokens == 2 and s.logprobs == 3
    assert p.text.stop == ["END"] and p.stream and p.include_usage and p.logprobs


def test_text_parts_are_joined_and_nvext_ignore_eos_is_honoured():
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
        "nvext": {"ignore_eos": True},
    }
    p = parse_request("chat", body)
    assert p.text.messages[0]["content"] == "ab" and p.text.sampling.ignore_eos


def test_completions_prompt_forms():
    assert parse_request("completions", {"model": "m", "prompt": "x"}).text.prompt == "x"
    assert parse_request("completions", {"model": "m", "prompt": [1, 2]}).text.prompt == [1, 2]
    assert parse_request("completions", {"model": "m", "prompt": ["x"]}).text.prompt == "x"
    assert parse_request("completions", {"model": "m", "prompt": [[4, 5]]}).text.prompt == [4, 5]
    p = parse_request("completions", {"model": "m", "prompt": "x", "logprobs": 2})
    assert p.logprobs and p.text.sampling.logprobs == 2


@pytest.mark.parametrize(
    "endpoint, body, param, match",
    [
        ("chat", [], None, "JSON object"),
        ("chat", {"messages": CHAT["messages"]}, "model", "'model' is required"),
        ("chat", {"model": "m"}, "messages", "non-empty list"),
        ("chat", {"model": "m", "messages": []}, "messages", "non-empty list"),
        ("chat", {"model": "m", "messages": ["hi"]}, "messages", "string 'role'"),
        ("chat", {"model": "m", "messages": [{"role": "user", "content": 5}]}, "messages", "string or a list"),
        ("chat", {**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages", "text"),
        ("chat", {**CHAT, "max_tokens": 0}, "max_tokens", "at least 1"),
        ("chat", {**CHAT, "max_tokens": -5}, "max_tokens", "at least 1"),
        ("chat", {**CHAT, "max_tokens": "10"}, "max_tokens", "type int"),
        ("chat", {**CHAT, "max_tokens": 1.5}, "max_tokens", "type int"),
        ("chat", {**CHAT, "temperature": "hot"}, "temperature", "type float"),
        ("chat", {**CHAT, "temperature": 3}, "temperature", "<= 2.0"),
        ("chat", {**CHAT, "top_p": 0}, "top_p", ">="),
        ("chat", {**CHAT, "stream": "yes"}, "stream", "type bool"),
        ("chat", {**CHAT, "n": 0}, "n", ">= 1"),
        ("chat", {**CHAT, "stop": [1]}, "stop", "list of strings"),
        ("chat", {**CHAT, "stop_token_ids": [-1]}, "stop_token_ids", "non-negative"),
        ("chat", {**CHAT, "top_logprobs": 2}, "top_logprobs", "requires"),
        ("chat", {**CHAT, "tools": []}, "tools", "not supported"),
        ("chat", {**CHAT, "response_format": {"type": "json_object"}}, "response_format", "not supported"),
        ("chat", {**CHAT, "bogus": 1}, "bogus", "Unrecognized request argument"),
        ("chat", {**CHAT, "stream_options": 1}, "stream_options", "object"),
        ("completions", {"model": "m"}, "prompt", "'prompt' must be"),
        ("completions", {"model": "m", "prompt": []}, "prompt", "'prompt' must be"),
        ("completions", {"model": "m", "prompt": ["a", "b"]}, "prompt", "batched prompts"),
        ("completions", {"model": "m", "prompt": "x", "echo": True}, "echo", "not supported"),
        ("completions", {"model": "m", "prompt": "x", "messages": []}, "messages", "Unrecognized"),
        ("completions", {"model": "m", "prompt": "x", "suffix": "y"}, "suffix", "not supported"),
    ],
)
def test_bad_requests_are_400_with_the_field_named(endpoint, body, param, match):
    with pytest.raises(RequestError, match=match) as err:
        parse_request(endpoint, body)
    assert err.value.status == 400 and err.value.type == "invalid_request_error"
    assert getattr(err.value, "param", None) == param


def _finish(reason="stop", completion=2, cached=4, stop_reason=None):
    return Finish(
        reason=reason, stop_reason=stop_reason, prompt_tokens=10, completion_tokens=completion, cached_tokens=cached
    )


def test_chat_stream_chunks_follow_openai():
    p = parse_request("chat", {**CHAT, "stream": True, "stream_options": {"include_usage": True}})
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
    p = parse_request("completions", {"model": "m", "prompt": "x", "logprobs": 1})
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
    p = parse_request("chat", {**CHAT, "n": 2, "logprobs": True})
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
