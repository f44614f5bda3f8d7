"""The HTTP frontend in process: a fake backend, the ASGI app driven by httpx or directly (no sockets)."""

import asyncio

import msgspec
import pytest
from frontend_fake import CHAT, COMPLETION, PROMPT_TOKENS, WORDS, FakeBackend, call_asgi, client, count, events
from frontend_fake import make_frontend as frontend

from zdyn.errors import RequestError

TEXT = "".join(WORDS)


async def test_chat_non_streaming_and_its_metrics():
    f = frontend()
    async with client(f) as c:
        r = await c.post("/v1/chat/completions", json={**CHAT, "max_tokens": 5})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-") and body["model"] == "m"
    assert body["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": TEXT},
            "logprobs": None,
            "finish_reason": "stop",
            "stop_reason": None,
        }
    ]
    assert body["usage"] == {
        "prompt_tokens": PROMPT_TOKENS,
        "completion_tokens": 3,
        "total_tokens": PROMPT_TOKENS + 3,
        "prompt_tokens_details": {"cached_tokens": 3},
    }
    assert count(f, "zdyn_requests_total", endpoint="chat", status="success") == 1
    assert count(f, "zdyn_requests_in_flight") == 0
    assert count(f, "zdyn_prompt_tokens_total") == PROMPT_TOKENS and count(f, "zdyn_output_tokens_total") == 3
    assert count(f, "zdyn_cached_tokens_total") == 3
    assert count(f, "zdyn_time_to_first_token_seconds_count") == 1
    assert count(f, "zdyn_inter_token_latency_seconds_count") == 2
    assert count(f, "zdyn_request_latency_seconds_count") == 1


@pytest.mark.parametrize("include_usage", [True, False])
async def test_chat_streaming_follows_openai(include_usage):
    f = frontend()
    options = {"stream_options": {"include_usage": True}} if include_usage else {}
    async with client(f) as c:
        r = await c.post("/v1/chat/completions", json={**CHAT, "stream": True, **options})
    assert r.status_code == 200 and r.headers["content-type"] == "text/event-stream; charset=utf-8"
    data = events(r.text)
    assert data[-1] == "[DONE]"
    chunks = data[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert deltas == [{"role": "assistant", "content": ""}] + [{"content": w} for w in WORDS]
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]] == [None, None, None, "stop"]
    if include_usage:
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == PROMPT_TOKENS + 3
        assert all(c["usage"] is None for c in chunks[:-1])
    else:
        assert all("usage" not in c for c in chunks)
    assert count(f, "zdyn_requests_total", endpoint="chat", status="success") == 1
    assert count(f, "zdyn_output_tokens_total") == 3


async def test_completions_streaming_and_not():
    f = frontend()
    async with client(f) as c:
        whole = (await c.post("/v1/completions", json=COMPLETION)).json()
        streamed = events((await c.post("/v1/completions", json={**COMPLETION, "stream": True})).text)
    assert whole["object"] == "text_completion" and whole["id"].startswith("cmpl-")
    assert whole["choices"][0]["text"] == TEXT and whole["choices"][0]["finish_reason"] == "stop"
    assert [c["object"] for c in streamed[:-1]] == ["text_completion"] * 3
    assert "".join(c["choices"][0]["text"] for c in streamed[:-1]) == TEXT
    assert count(f, "zdyn_requests_total", endpoint="completions", status="success") == 2


@pytest.mark.parametrize("stream", [False, True])
async def test_n_choices(stream):
    f = frontend()
    async with client(f) as c:
        r = await c.post("/v1/chat/completions", json={**CHAT, "n": 3, "stream": stream})
    if not stream:
        choices = r.json()["choices"]
        assert [(c["index"], c["message"]["content"]) for c in choices] == [(i, TEXT) for i in range(3)]
        assert r.json()["usage"]["completion_tokens"] == 9
        return
    chunks = [c for c in events(r.text)[:-1] if c["choices"]]
    for i in range(3):
        mine = [c["choices"][0]["delta"] for c in chunks if c["choices"][0]["index"] == i]
        assert mine == [{"role": "assistant", "content": ""}] + [{"content": w} for w in WORDS]


async def test_logprobs_shapes():
    f = frontend()
    async with client(f) as c:
        chat = (await c.post("/v1/chat/completions", json={**CHAT, "logprobs": True, "top_logprobs": 2})).json()
        plain = (await c.post("/v1/chat/completions", json={**CHAT, "logprobs": True})).json()
        stream = await c.post("/v1/chat/completions", json={**CHAT, "logprobs": True, "stream": True})
        completion = (await c.post("/v1/completions", json={**COMPLETION, "logprobs": 1})).json()
    content = chat["choices"][0]["logprobs"]["content"]
    assert [x["token"] for x in content] == list(WORDS)
    assert content[0] == {
        "token": "Hello",
        "logprob": -0.5,
        "bytes": list(b"Hello"),
        "top_logprobs": [
            {"token": "t0", "logprob": -0.0, "bytes": list(b"t0")},
            {"token": "t1", "logprob": -1.0, "bytes": list(b"t1")},
        ],
    }
    assert all(x["top_logprobs"] == [] for x in plain["choices"][0]["logprobs"]["content"])
    streamed = [c["choices"][0]["logprobs"] for c in events(stream.text)[1:-1]]
    assert [lp["content"][0]["token"] for lp in streamed] == list(WORDS)
    assert completion["choices"][0]["logprobs"] == {
        "tokens": list(WORDS),
        "token_logprobs": [-0.5] * 3,
        "top_logprobs": [{"t0": -0.0}] * 3,
        "text_offset": [0, 5, 11],
    }


async def test_models_health_and_unknown_routes():
    f = frontend(FakeBackend(models=("a", "b")))
    async with client(f) as c:
        models = (await c.get("/v1/models")).json()
        health = await c.get("/health")
        missing = await c.post("/v1/nowhere", json={})
        wrong = await c.get("/v1/chat/completions")
        unknown = await c.post("/v1/chat/completions", json={**CHAT, "model": "nope"})
    assert [m["id"] for m in models["data"]] == ["a", "b"]
    assert health.status_code == 200 and health.json()["status"] == "healthy"
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"
    assert wrong.status_code == 405 and wrong.json()["error"]["code"] == 405
    assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "model"
    assert count(f, "zdyn_requests_total", endpoint="chat", status="error_404") == 1
    f.backend.model_names.clear()
    async with client(f) as c:
        assert (await c.get("/health")).status_code == 503


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    "error",
    [
        RequestError("no worker is serving m right now", 503, "unavailable"),
        RequestError("the prompt is too long", 400, "invalid_request_error", "messages"),
    ],
)
async def test_backend_errors_before_the_first_output_keep_their_status(stream, error):
    backend = FakeBackend()
    backend.fail = error
    f = frontend(backend)
    async with client(f) as c:
        r = await c.post("/v1/chat/completions", json={**CHAT, "stream": stream})
    assert r.status_code == error.status
    assert r.json()["error"] == {
        "message": error.message,
        "type": error.type,
        "param": error.param,
        "code": error.status,
    }
    assert count(f, "zdyn_requests_total", endpoint="chat", status=f"error_{error.status}") == 1
    assert count(f, "zdyn_requests_in_flight") == 0 and count(f, "zdyn_internal_errors_total") == 0


async def test_backend_error_mid_stream_is_the_last_event():
    backend = FakeBackend()
    backend.fail_after_first = RequestError("worker w0 is gone", 503, "unavailable")
    f = frontend(backend)
    async with client(f) as c:
        streamed = await c.post("/v1/completions", json={**COMPLETION, "stream": True})
        whole = await c.post("/v1/completions", json=COMPLETION)
    data = events(streamed.text)
    assert streamed.status_code == 200 and data[0]["choices"][0]["text"] == "Hello"
    assert data[1] == {"error": {"message": "worker w0 is gone", "type": "unavailable", "param": None, "code": 503}}
    assert data[2:] == ["[DONE]"]
    assert whole.status_code == 503
    assert count(f, "zdyn_requests_total", endpoint="completions", status="error_503") == 2
    assert count(f, "zdyn_requests_in_flight") == 0


@pytest.mark.parametrize("where", ["before", "after"])
async def test_a_bug_is_a_counted_500(where):
    backend = FakeBackend()
    setattr(backend, "fail" if where == "before" else "fail_after_first", KeyError("oops"))
    f = frontend(backend)
    async with client(f) as c:
        r = await c.post("/v1/chat/completions", json={**CHAT, "stream": True})
    error = {"message": "internal error: KeyError", "type": "internal_error", "param": None, "code": 500}
    if where == "before":
        assert r.status_code == 500 and r.json()["error"] == error
    else:
        assert r.status_code == 200 and events(r.text)[-2:] == [{"error": error}, "[DONE]"]
    assert count(f, "zdyn_internal_errors_total") == 1
    assert count(f, "zdyn_requests_total", endpoint="chat", status="error_500") == 1
    assert count(f, "zdyn_requests_in_flight") == 0


async def test_a_backend_that_ends_without_output_is_a_502():
    backend = FakeBackend()

    async def empty(request_id, request):
        return
        yield

    backend.process = empty
    f = frontend(backend)
    async with client(f) as c:
        r = await c.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 502 and count(f, "zdyn_internal_errors_total") == 0


@pytest.mark.parametrize("stream", [False, True])
async def test_client_disconnect_cancels_the_backend_request(stream):
    backend = FakeBackend()
    backend.hold = "after" if stream else "before"
    f = frontend(backend)
    body = msgspec.json.encode({**CHAT, "stream": stream})

    async def hang_up_when_held():
        await backend.holding.wait()
        assert count(f, "zdyn_requests_in_flight") == 1
        hang_up.set()

    hang_up = asyncio.Event()
    watcher = asyncio.ensure_future(hang_up_when_held())
    sent = await call_asgi(f, "/v1/chat/completions", [body], hang_up=hang_up)
    await watcher
    assert len(backend.cancelled) == 1 and backend.closed == backend.cancelled
    if stream:  # the first chunks went out, then the stream was cut short: no [DONE]
        assert sent[0]["status"] == 200 and b"[DONE]" not in b"".join(m.get("body", b"") for m in sent)
    else:
        assert sent == []
    assert count(f, "zdyn_requests_total", endpoint="chat", status="cancelled") == 1
    assert count(f, "zdyn_requests_in_flight") == 0
