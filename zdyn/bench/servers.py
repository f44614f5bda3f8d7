"""Servers that are not zdyn, started as deployments to measure zdyn against: vLLM's own OpenAI server, and a bare
uvicorn SSE server (the HTTP ceiling of one Python process: no engine, no tokenizer, no ZeroMQ).

    python -m zdyn.bench.servers --port 8000 --chunks 64      # the bare SSE server by hand
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import sys
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from zdyn.bench.deploy import LOOPBACK, Deployment
from zdyn.bench.procs import ProcessGroup, free_port, get_json, wait_until


def _models_listed(base_url: str) -> bool:
    status, body = get_json(f"{base_url}/v1/models")
    return status == 200 and bool(body.get("data"))


@contextlib.contextmanager
def _serve(name: str, argv: list[str], port: int, log_dir: Path, env: Mapping[str, str], timeout_s: float,
           model: str) -> Iterator[Deployment]:  # fmt: skip
    group = ProcessGroup(log_dir)
    base_url = f"http://{LOOPBACK}:{port}"
    t0 = time.monotonic()
    try:
        group.start(name, argv, env)
        wait_until(lambda: _models_listed(base_url), f"{name} not serving (log in {log_dir})", timeout_s, group)
        yield Deployment(
            base_url, model, group, info={"start_s": round(time.monotonic() - t0, 2), "commands": group.argv}
        )
    finally:
        group.stop()


def start_vllm_server(
    model: str, served_name: str, engine_args: Sequence[str], log_dir: Path, env: Mapping[str, str] | None = None,
    timeout_s: float = 300.0,
) -> contextlib.AbstractContextManager[Deployment]:  # fmt: skip
    """``python -m vllm.entrypoints.openai.api_server`` (its API server and EngineCore; role ``api_server``)."""
    port = free_port()
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
            "--served-model-name", served_name, "--host", LOOPBACK, "--port", str(port), *engine_args]  # fmt: skip
    return _serve("api_server", argv, port, log_dir, env or {}, timeout_s, served_name)


def start_bare_sse(
    chunks: int, log_dir: Path, timeout_s: float = 30.0
) -> contextlib.AbstractContextManager[Deployment]:
    """This module's bare SSE server (role ``frontend``), answering each request in ``chunks`` content chunks."""
    port = free_port()
    argv = [sys.executable, "-m", "zdyn.bench.servers", "--port", str(port), "--chunks", str(chunks)]
    return _serve("frontend", argv, port, log_dir, {}, timeout_s, "bare")


def sse_app(chunks_per_request: int) -> Any:
    """A minimal OpenAI-shaped streaming chat endpoint: ``max_tokens`` tokens in ``chunks_per_request`` chunks (plus
    the role chunk, the usage chunk and [DONE]), JSON-encoded per chunk with msgspec as zdyn does."""
    import msgspec
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    encode = msgspec.json.Encoder().encode
    headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]

    class Sse(Response):
        def __init__(self, chunks: Iterator[bytes]) -> None:
            self.status_code = 200
            self.raw_headers = list(headers)
            self.background = None
            self.chunks = chunks

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            for chunk in self.chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    def events(body: dict[str, Any]) -> Iterator[bytes]:
        n = int(body.get("max_tokens") or 16)
        base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk", "created": int(time.time()),
                "model": body.get("model", "bare")}  # fmt: skip

        def chunk(delta: dict[str, str], finish: str | None) -> bytes:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return b"data: " + encode({**base, "choices": [choice]}) + b"\n\n"

        yield chunk({"role": "assistant", "content": ""}, None)
        groups = min(n, chunks_per_request)
        for g in range(groups):
            tokens = n // groups + (1 if g < n % groups else 0)
            yield chunk({"content": " tok" * tokens}, "length" if g == groups - 1 else None)
        if (body.get("stream_options") or {}).get("include_usage"):
            usage = {"completion_tokens": n, "total_tokens": n}  # prompt not tokenized: the client uses its own
            yield b"data: " + encode({**base, "choices": [], "usage": usage}) + b"\n\n"
        yield b"data: [DONE]\n\n"

    async def chat(request: Request) -> Response:
        return Sse(events(msgspec.json.decode(await request.body())))

    async def models(request: Request) -> Response:
        listing = {"object": "list", "data": [{"id": "bare", "object": "model", "created": 0, "owned_by": "bench"}]}
        return Response(encode(listing), media_type="application/json")

    routes = [Route("/v1/chat/completions", chat, methods=["POST"]), Route("/v1/models", models, methods=["GET"])]
    return Starlette(routes=routes)


def main(argv: Sequence[str] | None = None) -> int:
    """uvicorn on uvloop with httptools, as ``zdyn frontend`` runs."""
    import uvicorn
    import uvloop

    p = argparse.ArgumentParser(prog="python -m zdyn.bench.servers", description="The bare uvicorn SSE server.")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--chunks", type=int, default=64, help="content chunks per response")
    args = p.parse_args(argv)
    config = uvicorn.Config(sse_app(args.chunks), host=LOOPBACK, port=args.port, http="httptools",
                            log_level="warning", access_log=False)  # fmt: skip
    gc.collect()
    gc.freeze()
    uvloop.run(uvicorn.Server(config).serve())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
