"""Streaming OpenAI client on aiohttp: one RequestRecord per request, chunk arrivals on perf_counter."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import aiohttp

from zdyn.bench.records import RequestRecord


def _json_dumps(obj: Any) -> bytes:
    return json.dumps(obj).encode()


_loads: Callable[[bytes | str], Any] = json.loads
_dumps: Callable[[Any], bytes] = _json_dumps
try:
    import orjson

    _loads, _dumps = orjson.loads, orjson.dumps
except ImportError:  # orjson only makes the load generator cheaper per chunk
    pass

_DRAIN_AFTER_DONE_S = 1.0
_MAX_DETAIL = 500


@dataclass(slots=True, frozen=True)
class ClientConfig:
    """Connection policy. Compare two servers only with the same settings: keep-alive alone can change TTFT
    by tens of ms (Nagle and delayed ACKs on servers without TCP_NODELAY)."""

    base_url: str
    keep_alive: bool = True
    max_connections: int = 0  # 0 = no limit (aiohttp's own default would be 100)
    timeout_s: float = 600.0
    headers: dict[str, str] = field(default_factory=dict)


class StreamError(Exception):
    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


def error_message(payload: Any) -> str:
    """The message of an OpenAI/vLLM/Dynamo error object, else the payload itself."""
    if isinstance(payload, dict):
        err = payload.get("error")
        if isinstance(err, dict) and "message" in err:
            return str(err["message"])
        if isinstance(err, str):
            return err
        if "message" in payload:
            return str(payload["message"])
    return str(payload)[:_MAX_DETAIL]


def _choice_text(choice: Any) -> str:
    if not isinstance(choice, dict):
        return ""
    delta = choice.get("delta")
    if isinstance(delta, dict):
        piece = delta.get("content") or delta.get("reasoning_content") or delta.get("reasoning")
    else:
        piece = choice.get("text")
    return piece if isinstance(piece, str) else ""


class SseStream:
    """Consumes SSE lines of one streamed completion and fills the record.

    A chunk counts as a token chunk when it carries text; role-only and finish-only chunks do not, so
    servers that announce the role before prefill do not get a near-zero TTFT. A chunk with several
    tokens is one ITL sample, as in vLLM's benchmark.
    """

    def __init__(self, record: RequestRecord, keep_text: bool = False) -> None:
        self.record = record
        self.keep_text = keep_text
        self.done = False
        self.event = ""
        self.first_choice_at: float | None = None
        self.last_token_at: float | None = None
        self.pieces: list[str] = []
        self.usage: dict[str, Any] | None = None

    def feed(self, raw: bytes, now: float) -> None:
        line = raw.rstrip(b"\r\n")
        if not line:
            self.event = ""
            return
        if line.startswith(b"event:"):
            self.event = line[6:].strip().decode(errors="replace")
            return
        if not line.startswith(b"data:"):
            return  # comments (": ping"), id:, retry:
        payload = line[5:].strip()
        if payload == b"[DONE]":
            self.done = True
            return
        try:
            obj = _loads(payload)
        except ValueError:
            raise StreamError("parse", f"invalid JSON in stream: {payload[:200]!r}") from None
        if not isinstance(obj, dict):
            raise StreamError("parse", f"stream chunk is not an object: {payload[:200]!r}")
        if self.event == "error" or obj.get("error") or obj.get("object") == "error":
            raise StreamError("server_error", error_message(obj))
        usage = obj.get("usage")
        if isinstance(usage, dict):
            self.usage = usage
        choices = obj.get("choices")
        if not choices or not isinstance(choices, list):
            return
        if self.first_choice_at is None:
            self.first_choice_at = now
        piece = _choice_text(choices[0])
        if not piece:
            return
        if self.keep_text:
            self.pieces.append(piece)
        rec = self.record
        if self.last_token_at is None:
            rec.ttft = now - rec.start
        else:
            rec.itl.append(now - self.last_token_at)
        self.last_token_at = now
        rec.num_chunks += 1

    def finish(self, prompt_len: int) -> None:
        """Settle counts after ``[DONE]``: usage from the server when it sent one, else counted chunks."""
        rec = self.record
        if self.last_token_at is None:
            if self.first_choice_at is None:
                raise StreamError("empty", "stream ended without any completion chunk")
            rec.ttft = self.first_choice_at - rec.start
        usage = self.usage or {}
        completion = usage.get("completion_tokens")
        prompt = usage.get("prompt_tokens")
        rec.output_tokens = completion if isinstance(completion, int) else rec.num_chunks
        rec.prompt_tokens = prompt if isinstance(prompt, int) else prompt_len
        details = usage.get("prompt_tokens_details")
        cached = details.get("cached_tokens") if isinstance(details, dict) else None
        rec.cached_tokens = cached if isinstance(cached, int) else None
        rec.text = "".join(self.pieces)
        rec.success = True


class OpenAIClient:
    """``async with OpenAIClient(cfg) as c: record = await c.stream(path, body, index, prompt_len)``."""

    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> OpenAIClient:
        cfg = self.config
        connector = aiohttp.TCPConnector(limit=cfg.max_connections, force_close=not cfg.keep_alive)
        self._session = aiohttp.ClientSession(
            base_url=cfg.base_url.rstrip("/") + "/",
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=cfg.timeout_s),
            headers={"Content-Type": "application/json", **cfg.headers},
        )
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("OpenAIClient used outside 'async with'")
        return self._session

    async def get_json(self, path: str) -> Any:
        async with self.session.get(path.lstrip("/")) as resp:
            resp.raise_for_status()
            return await resp.json(content_type=None)

    async def stream(
        self, path: str, body: dict[str, Any], index: int, prompt_len: int, *, keep_text: bool = False
    ) -> RequestRecord:
        """Send one streaming request; never raises for request failures, which end up in the record.
        The generated text is kept only when asked (multi-turn history), to bound memory on long runs."""
        record = RequestRecord(index=index)
        data = _dumps(body)
        stream = SseStream(record, keep_text)
        record.start = time.perf_counter()
        try:
            async with self.session.post(path.lstrip("/"), data=data) as resp:
                record.status = resp.status
                if resp.status != 200:
                    text = await resp.text(errors="replace")
                    try:
                        detail = error_message(_loads(text))
                    except ValueError:
                        detail = text[:_MAX_DETAIL]
                    raise StreamError(f"http_{resp.status}", detail)
                async for line in resp.content:
                    stream.feed(line, time.perf_counter())
                    if stream.done:
                        break
                record.end = time.perf_counter()
                if not stream.done:
                    raise StreamError("incomplete", "stream closed before [DONE]")
                stream.finish(prompt_len)
                await self._drain(resp)
        except StreamError as e:
            record.error, record.error_detail = e.kind, e.detail
        except TimeoutError:
            record.error, record.error_detail = (
                "timeout",
                f"no complete response within {self.config.timeout_s} s",
            )
        except (aiohttp.ClientError, OSError) as e:
            record.error, record.error_detail = "connection", f"{type(e).__name__}: {e}"[:_MAX_DETAIL]
        except ValueError as e:  # aiohttp: a line longer than its buffer
            record.error, record.error_detail = "parse", str(e)[:_MAX_DETAIL]
        if not record.success:
            record.end = time.perf_counter()
        return record

    @staticmethod
    async def _drain(resp: aiohttp.ClientResponse) -> None:
        # Reading to EOF lets a keep-alive connection go back to the pool; an unread body closes it.
        try:
            await asyncio.wait_for(resp.content.read(), _DRAIN_AFTER_DONE_S)
        except (TimeoutError, aiohttp.ClientError):
            pass
