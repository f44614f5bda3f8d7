"""A backend without a model, and ways to drive the frontend's ASGI app in process (no sockets)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, MutableMapping
from typing import Any

import httpx
import msgspec

from zdyn.frontend.app import Frontend
from zdyn.frontend.http import HttpSettings
from zdyn.protocol import Delta, Finish, Process, TextRequest, TokenLogprob, TopLogprob, encode

WORDS = ("Hello", " there", "!")
PROMPT_TOKENS = 7
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
COMPLETION = {"model": "m", "prompt": "hi"}


class FakeBackend:
    """Answers each choice with WORDS, one delta per word, and logprobs when asked.

    ``fail`` is raised before the first delta, ``fail_after_first`` after it; ``hold`` ("before" or "after" the
    first delta) waits until the request is cancelled. ``requests``, ``closed`` and ``cancelled`` record what
    happened to each request.
    """

    def __init__(self, models: tuple[str, ...] = ("m",)) -> None:
        self.model_names = list(models)
        self.requests: list[TextRequest] = []
        self.closed: list[str] = []
        self.cancelled: list[str] = []
        self.fail: BaseException | None = None
        self.fail_after_first: BaseException | None = None
        self.hold: str | None = None
        self.holding = asyncio.Event()

    def models(self) -> list[str]:
        return self.model_names

    def workers(self) -> list[dict[str, Any]]:
        return [{"id": "w0", "model": m} for m in self.model_names]

    async def process(self, request_id: str, request: TextRequest) -> AsyncIterator[Delta]:
        self.requests.append(request)
        encode(Process(request_id=request_id, request=request))  # what a separate processor would be sent
        try:
            await self._wait("before")
            if self.fail is not None:
                raise self.fail
            for step, word in enumerate(WORDS):
                for index in range(request.n):
                    yield self._delta(request_id, request, index, step, word)
                if step == 0:
                    if self.fail_after_first is not None:
                        raise self.fail_after_first
                    await self._wait("after")
        except asyncio.CancelledError:
            self.cancelled.append(request_id)
            raise
        finally:
            self.closed.append(request_id)

    async def _wait(self, when: str) -> None:
        if self.hold == when:
            self.holding.set()
            await asyncio.Event().wait()  # until cancelled

    def _delta(self, request_id: str, request: TextRequest, index: int, step: int, word: str) -> Delta:
        logprobs = None
        top = request.sampling.logprobs
        if top is not None:
            alternatives = [TopLogprob(token_id=k, logprob=-float(k), token=f"t{k}") for k in range(top)]
            logprobs = [TokenLogprob(token_id=step, logprob=-0.5, token=word, top=alternatives)]
        finish = None
        if step == len(WORDS) - 1:
            finish = Finish(reason="stop", prompt_tokens=PROMPT_TOKENS, completion_tokens=len(WORDS), cached_tokens=3)
        return Delta(request_id=request_id, index=index, token_ids=[step], text=word, logprobs=logprobs, finish=finish)


def make_frontend(backend: FakeBackend | None = None, **settings: Any) -> Frontend:
    return Frontend(backend or FakeBackend(), HttpSettings(**settings))


def client(frontend: Frontend) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=frontend.app()), base_url="http://zdyn")


class SyncClient:
    """Posts JSON bytes from synchronous code (hypothesis tests) through one event loop and one app."""

    def __init__(self, frontend: Frontend) -> None:
        self.loop = asyncio.new_event_loop()
        self.client = client(frontend)

    def post(self, path: str, body: bytes) -> int:
        headers = {"content-type": "application/json"}
        return self.loop.run_until_complete(self.client.post(path, content=body, headers=headers)).status_code

    def close(self) -> None:
        self.loop.run_until_complete(self.client.aclose())
        self.loop.close()


def count(frontend: Frontend, name: str, **labels: str) -> float:
    """A sample of the frontend's Prometheus registry (0 when it was never touched)."""
    return frontend.metrics.registry.get_sample_value(name, labels) or 0.0


def events(text: str) -> list[Any]:
    """The data of each server-sent event: decoded JSON, or "[DONE]"."""
    lines = [line.removeprefix("data: ") for line in text.split("\n\n") if line]
    return [line if line == "[DONE]" else msgspec.json.decode(line) for line in lines]


async def call_asgi(
    frontend: Frontend,
    path: str,
    chunks: list[bytes],
    *,
    headers: list[tuple[bytes, bytes]] | None = None,
    hang_up: asyncio.Event | None = None,
    received: list[int] | None = None,
) -> list[MutableMapping[str, Any]]:
    """POST ``chunks`` as the body straight into the ASGI app and return what it sent.

    The client disconnects when ``hang_up`` is set; ``received`` collects one item per body chunk read.
    """
    sent: list[MutableMapping[str, Any]] = []
    gone = hang_up or asyncio.Event()
    pending = list(chunks)

    async def receive() -> dict[str, Any]:
        if pending:
            if received is not None:
                received.append(1)
            body = pending.pop(0)
            return {"type": "http.request", "body": body, "more_body": bool(pending)}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers if headers is not None else [(b"content-type", b"application/json")],
        "server": ("zdyn", 80),
        "client": ("127.0.0.1", 1234),
    }
    app = asyncio.ensure_future(frontend.app()(scope, receive, send))
    done, _ = await asyncio.wait([app], timeout=10)
    if not done:
        app.cancel()
        raise AssertionError(f"the app did not finish its response; it sent {sent}")
    app.result()
    return sent
