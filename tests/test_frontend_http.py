"""The frontend's HTTP edge: Content-Type, body size, JSON depth, API keys and its settings."""

import msgspec
import pytest
from frontend_fake import CHAT, call_asgi, client, count
from frontend_fake import make_frontend as frontend

from zdyn.frontend.http import HttpSettings

BODY = msgspec.json.encode(CHAT)


@pytest.mark.parametrize(
    "content_type, status",
    [
        (None, 400),
        ("text/plain", 400),
        ("application/x-www-form-urlencoded", 400),
        ("application/jsonl", 400),
        ("application/json", 200),
        ("application/json; charset=utf-8", 200),
        ("Application/JSON", 200),
    ],
)
async def test_only_json_bodies_are_accepted(content_type, status):
    f = frontend()
    headers = [] if content_type is None else [(b"content-type", content_type.encode())]
    sent = await call_asgi(f, "/v1/chat/completions", [BODY], headers=headers)
    assert sent[0]["status"] == status
    if status == 400:
        error = msgspec.json.decode(sent[1]["body"])["error"]
        assert "application/json" in error["message"] and error["type"] == "invalid_request_error"
        assert count(f, "zdyn_requests_total", endpoint="chat", status="error_400") == 1
    assert len(f.backend.requests) == (0 if status == 400 else 1)


async def test_a_body_over_the_limit_is_a_413_by_its_content_length():
    f = frontend(max_body_bytes=4096)
    async with client(f) as c:
        at_limit = await c.post(
            "/v1/chat/completions",
            content=BODY + b" " * (4096 - len(BODY)),
            headers={"content-type": "application/json"},
        )
        over = await c.post(
            "/v1/chat/completions",
            content=BODY + b" " * (4097 - len(BODY)),
            headers={"content-type": "application/json"},
        )
    assert at_limit.status_code == 200
    assert over.status_code == 413 and "4096 bytes" in over.json()["error"]["message"]
    assert count(f, "zdyn_requests_total", endpoint="chat", status="error_413") == 1


async def test_a_streamed_body_is_refused_as_soon_as_it_passes_the_limit():
    f = frontend(max_body_bytes=64 * 1024)
    chunk = b" " * 1024
    received: list[int] = []
    sent = await call_asgi(f, "/v1/chat/completions", [BODY] + [chunk] * 1000, received=received)
    assert sent[0]["status"] == 413
    assert len(received) == 65  # the JSON and 64 chunks of 1 KiB: the other 936 were never read
    assert f.backend.requests == []


@pytest.mark.parametrize("depth", [10**3, 10**5])
async def test_deeply_nested_json_is_a_400_not_a_500(depth):
    f = frontend()
    deep = b"[" * depth + b"]" * depth
    bodies = [
        BODY[:-1] + b', "chat_template_kwargs": {"a": ' + deep + b"}}",
        BODY[:-1] + b', "nvext": {"a": ' + deep + b"}}",  # an ignored field
        deep,
    ]
    async with client(f) as c:
        for body in bodies:
            r = await c.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
            assert r.status_code == 400, r.text
    assert count(f, "zdyn_internal_errors_total") == 0


async def test_json_depth_limit_is_a_setting():
    kwargs = {"a": {"b": {"c": {}}}}  # levels 2-5 of the body
    async with client(frontend(max_json_depth=5)) as c:
        assert (await c.post("/v1/chat/completions", json={**CHAT, "chat_template_kwargs": kwargs})).status_code == 200
    async with client(frontend(max_json_depth=4)) as c:
        r = await c.post("/v1/chat/completions", json={**CHAT, "chat_template_kwargs": kwargs})
    assert r.status_code == 400 and r.json()["error"]["param"] == "chat_template_kwargs"


async def test_api_keys():
    f = frontend(api_keys=("key-one", "key-two"))
    async with client(f) as c:
        missing = await c.post("/v1/chat/completions", json=CHAT)
        wrong = await c.post("/v1/chat/completions", json=CHAT, headers={"authorization": "Bearer key-three"})
        basic = await c.post("/v1/chat/completions", json=CHAT, headers={"authorization": "Basic key-one"})
        models = await c.get("/v1/models")
        one = await c.post("/v1/chat/completions", json=CHAT, headers={"authorization": "Bearer key-one"})
        two = await c.post(
            "/v1/completions", json={"model": "m", "prompt": "x"}, headers={"Authorization": "bearer key-two"}
        )
        health, metrics = await c.get("/health"), await c.get("/metrics")
    for r in (missing, wrong, basic, models):
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert r.json()["error"]["type"] == "invalid_request_error" and r.json()["error"]["code"] == 401
    assert "Authorization: Bearer" in missing.json()["error"]["message"]
    assert "incorrect API key" in wrong.json()["error"]["message"]
    assert (one.status_code, two.status_code, health.status_code, metrics.status_code) == (200, 200, 200, 200)
    assert count(f, "zdyn_requests_total", endpoint="chat", status="error_401") == 3
    assert count(f, "zdyn_requests_total", endpoint="models", status="error_401") == 1
    assert len(f.backend.requests) == 2


async def test_health_and_metrics_can_need_the_key_too():
    f = frontend(api_keys=("k",), protect_health_and_metrics=True)
    async with client(f) as c:
        assert (await c.get("/health")).status_code == 401
        assert (await c.get("/metrics")).status_code == 401
        assert (await c.get("/health", headers={"authorization": "Bearer k"})).status_code == 200
        assert (await c.get("/metrics", headers={"authorization": "Bearer k"})).status_code == 200


@pytest.mark.parametrize(
    "settings, match",
    [
        ({"api_keys": ("",)}, "non-empty"),
        ({"api_keys": ("a b",)}, "without spaces"),
        ({"protect_health_and_metrics": True}, "needs at least one API key"),
        ({"max_body_bytes": 10}, "max_body_bytes"),
        ({"max_json_depth": 1}, "max_json_depth"),
        ({"max_json_depth": 10_000}, "max_json_depth"),
    ],
)
def test_settings_are_checked(settings, match):
    with pytest.raises(ValueError, match=match):
        HttpSettings(**settings)


def test_settings_defaults():
    s = HttpSettings(api_keys=["a"])  # type: ignore[arg-type]
    assert s.api_keys == ("a",) and not s.protect_health_and_metrics
    assert s.max_body_bytes == 16 * 2**20 and s.max_json_depth == 64
