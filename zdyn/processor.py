"""The processor: chat template and tokenization, worker choice, streaming, detokenization.

It runs inside the frontend process by default (it is a frontend ``Backend``). Started on its own
(``zdyn processor``) it registers with the frontend as a peer, so several processors spread tokenization over
several cores.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing
from pathlib import Path
from typing import Any

import msgspec
from transformers import AutoTokenizer

from zdyn.detokenizer import Detokenizer
from zdyn.errors import RequestError, unavailable
from zdyn.protocol import (
    GENERATION_DEFAULTS,
    Delta,
    Finish,
    Generate,
    Ready,
    RouteEvent,
    SamplingParams,
    TextRequest,
    TokenLogprob,
    TopLogprob,
)
from zdyn.router.selector import Route, Selector
from zdyn.rpc import Hub, Peer
from zdyn.tools import OutputParsing, chat_template_inputs

log = logging.getLogger(__name__)


class Processor:
    """Serves ``TextRequest``s for one model through the workers registered at ``workers``."""

    def __init__(
        self, tokenizer_path: str, model: str, workers: Hub, selector: Selector, outputs: OutputParsing | None = None
    ) -> None:
        self.model = model
        self.hub = workers
        self.selector = selector
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        self.backend = self.tokenizer.backend_tokenizer  # the fast Rust tokenizer, for decoding
        self.max_model_len = int(getattr(self.tokenizer, "model_max_length", 0) or 0)
        self.sampling_defaults = generation_defaults(tokenizer_path)
        self._token_text: dict[int, str] = {}
        self.outputs = outputs or OutputParsing()  # tool calls and reasoning in the output (zdyn.tools)

    def tokenize(self, request: TextRequest) -> list[int]:
        """Prompt token ids: the chat template applied to the messages, or the completion prompt."""
        if request.messages is not None:
            tools = request.tools if request.tool_choice != "none" else None
            messages, extra = chat_template_inputs(request.messages, tools, self.tokenizer.chat_template)
            try:
                text = self.tokenizer.apply_chat_template(
                    messages,
                    tokenize=False,
                    add_generation_prompt=True,
                    **extra,
                    **request.chat_template_kwargs,
                )
            except Exception as e:  # jinja errors: the template rejected these messages
                raise RequestError(f"cannot apply the chat template: {e}") from e
            return list(self.tokenizer.encode(text, add_special_tokens=False))
        if isinstance(request.prompt, list):
            vocab = len(self.tokenizer)
            if any(not 0 <= t < vocab for t in request.prompt):
                raise RequestError(f"prompt token ids must be in [0, {vocab})")
            return request.prompt
        return list(self.tokenizer.encode(request.prompt or "", add_special_tokens=True))

    def models(self) -> list[str]:
        return [self.model]

    def live_workers(self) -> list[Peer]:
        return [p for p in self.hub.live_peers() if p.ready.model == self.model]

    def workers(self) -> list[dict[str, Any]]:
        """Each live worker with its load, as the frontend's /health lists them."""
        return [
            {
                "id": p.id,
                "model": p.ready.model,
                "engine": p.ready.engine,
                "running": p.load.num_running,
                "waiting": p.load.num_waiting,
                "kv_usage": round(p.load.kv_usage, 4),
                "in_flight": p.num_inflight,
            }
            for p in self.live_workers()
        ]

    async def process(self, request_id: str, request: TextRequest) -> AsyncGenerator[Delta]:
        """Yield text deltas (``index`` = choice) until every choice has finished."""
        outputs = self.outputs.for_request(request)  # a 400 if it needs a parser this processor lacks
        if outputs is not None and self.outputs.keeps_special_tokens:
            request.skip_special_tokens = False  # tool-call and thinking tags are special tokens in many models
        token_ids = self.tokenize(request)
        peers = self.live_workers()
        if not peers:
            raise unavailable(f"no worker is serving {self.model} right now")
        # Validated before routing, against the context every live worker can take: a rejected request is
        # never counted as load by the router.
        sampling = self._sampling(
            request, len(token_ids), min(p.ready.max_model_len or self.max_model_len for p in peers)
        )
        route = await self.selector.select(request_id, token_ids, peers)
        try:
            if request.n == 1:
                streams = [self._generate(request_id, 0, route, token_ids, sampling, request)]
            else:
                streams = [
                    self._generate(f"{request_id}-{i}", i, route, token_ids, _choice_seed(sampling, i), request)
                    for i in range(request.n)
                ]
            prefilled = False
            async with aclosing(streams[0] if len(streams) == 1 else interleave(streams)) as deltas:
                async for delta in deltas:
                    if not prefilled:
                        self.selector.update(request_id, RouteEvent.PREFILLED)
                        prefilled = True
                    delta.request_id = request_id
                    if outputs is not None:
                        outputs.apply(delta)
                    yield delta
        finally:
            self.selector.update(request_id, RouteEvent.FINISHED)

    def _sampling(self, request: TextRequest, num_prompt: int, max_model_len: int) -> SamplingParams:
        if max_model_len and num_prompt >= max_model_len:
            raise RequestError(
                f"This model's maximum context length is {max_model_len} tokens, "
                f"but the prompt has {num_prompt} tokens."
            )
        max_tokens = request.max_tokens
        if max_tokens is None:
            max_tokens = max_model_len - num_prompt if max_model_len else 16
        elif max_model_len and num_prompt + max_tokens > max_model_len:
            raise RequestError(
                f"This model's maximum context length is {max_model_len} tokens. However, you requested "
                f"{num_prompt + max_tokens} tokens ({num_prompt} in the prompt, {max_tokens} for the output)."
            )
        defaults = {k: v for k, v in self.sampling_defaults.items() if k not in request.sampling_set}
        return msgspec.structs.replace(request.sampling, max_tokens=max_tokens, **defaults)

    async def _generate(
        self, rid: str, index: int, route: Route, token_ids: list[int], sampling: SamplingParams, request: TextRequest
    ) -> AsyncGenerator[Delta]:
        peer = route.peer
        started = time.perf_counter()
        detok = Detokenizer(
            self.backend,
            stop=request.stop,
            include_stop_str_in_output=request.include_stop_str_in_output,
            skip_special_tokens=request.skip_special_tokens,
        )
        cached = 0
        outcome = "cancelled"
        generate = Generate(
            request_id=rid,
            token_ids=token_ids,
            sampling=sampling,
            model=self.model,
            overlap_blocks=route.overlap_blocks,
        )
        stream = self.hub.stream(peer, generate)
        try:
            async for delta in stream:
                if delta.num_cached_tokens is not None:
                    cached = delta.num_cached_tokens
                elif delta.finish is not None:
                    cached = delta.finish.cached_tokens
                text = detok.step(delta.token_ids)
                finish = delta.finish
                if detok.stop is not None:
                    finish = Finish(
                        reason="stop",
                        stop_reason=detok.stop,
                        prompt_tokens=len(token_ids),
                        completion_tokens=len(detok.token_ids),
                        cached_tokens=cached,
                    )
                elif finish is not None:
                    text += detok.finish()
                out = Delta(request_id=rid, index=index, token_ids=delta.token_ids, text=text, finish=finish)
                if delta.logprobs:
                    out.logprobs = self._with_token_text(delta.logprobs)
                yield out
                if finish is not None:
                    outcome = f"finish={finish.reason}"
                    return
            outcome = "stream ended without finish"
            raise RequestError(f"worker {peer.id} ended the stream without finishing", 502, "bad_gateway")
        except RequestError as e:
            outcome = f"failed: {e.message}"
            raise
        finally:
            await stream.aclose()
            log.info(
                "request %s: worker=%s (%s) prompt=%d cached=%d output=%d %s in %.3fs",
                rid, peer.id, route.reason, len(token_ids), cached, len(detok.token_ids), outcome,
                time.perf_counter() - started,
            )  # fmt: skip

    def _with_token_text(self, logprobs: list[TokenLogprob]) -> list[TokenLogprob]:
        for lp in logprobs:
            lp.token = self._text_of(lp.token_id)
            lp.top = [
                TopLogprob(token_id=t.token_id, logprob=t.logprob, token=self._text_of(t.token_id)) for t in lp.top
            ]
        return logprobs

    def _text_of(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = self._token_text[token_id] = self.backend.decode([token_id], skip_special_tokens=False)
        return text


def generation_defaults(model_path: str) -> dict[str, Any]:
    """Sampling defaults from the model's generation_config.json, for fields a request leaves unset."""
    path = Path(model_path) / "generation_config.json"
    if not path.is_file():
        return {}
    config = json.loads(path.read_text())
    return {k: config[k] for k in GENERATION_DEFAULTS if config.get(k) is not None}


def accept_model(name: str) -> Callable[[Ready], str | None]:
    """A hub's READY check: workers must serve the processor's model."""

    def accept(ready: Ready) -> str | None:
        return None if ready.model == name else f"this processor serves {name!r}, not {ready.model!r}"

    return accept


def _choice_seed(sampling: SamplingParams, index: int) -> SamplingParams:
    """Each of n choices samples independently; with a seed, reproducibly so."""
    seed = None if sampling.seed is None else sampling.seed + index
    return msgspec.structs.replace(sampling, seed=seed)


async def interleave(streams: list[AsyncGenerator[Delta]]) -> AsyncGenerator[Delta]:
    """Interleave several delta streams; the first failure cancels the rest and is raised."""
    queue: asyncio.Queue[Delta | BaseException | None] = asyncio.Queue()

    async def pump(stream: AsyncIterator[Delta]) -> None:
        try:
            async for item in stream:
                queue.put_nowait(item)
            queue.put_nowait(None)
        except asyncio.CancelledError:
            raise
        except BaseException as e:
            queue.put_nowait(e)

    tasks = [asyncio.create_task(pump(s)) for s in streams]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
