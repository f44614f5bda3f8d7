"""The processor: chat template and tokenization, worker choice, streaming, detokenization.

It runs inside the frontend process by default (it is a frontend ``Backend``). Started on its own
(``zdyn processor``) it registers with the frontend as a peer, so several processors spread tokenization over
several cores.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from pathlib import Path
from typing import Any

import msgspec
from transformers import AutoTokenizer

from zdyn.admission import Admission
from zdyn.choice import ChoiceRun, ChoiceSpec, Choose, Reissues, Resilience, movable
from zdyn.detokenizer import Detokenizer
from zdyn.errors import RequestError, unavailable
from zdyn.prompt_encoder import PromptEncoder
from zdyn.protocol import (
    GENERATION_DEFAULTS,
    ChoiceProgress,
    Delta,
    Ready,
    RouteEvent,
    SamplingParams,
    TextRequest,
    TokenIds,
    TokenLogprob,
    TopLogprob,
)
from zdyn.router.selector import Route, Selector
from zdyn.rpc import Hub, Peer
from zdyn.tools import OutputParsing, chat_template_inputs

log = logging.getLogger(__name__)

AVOID_WAIT_S = 1.0  # how long a re-issued request waits for a worker other than the one that failed it
# Prompts longer than this (characters) are templated and tokenized on a thread, not on the event loop: the Rust
# tokenizer's batch call releases the GIL, so long prompts tokenize on every core while the loop keeps streaming.
LONG_PROMPT_CHARS = 2048


class Processor:
    """Serves ``TextRequest``s for one model through the workers registered at ``workers``."""

    def __init__(
        self,
        tokenizer_path: str,
        model: str,
        workers: Hub,
        selector: Selector,
        resilience: Resilience | None = None,
        admission: Admission | None = None,
        outputs: OutputParsing | None = None,
        *,
        fast_tokenizer: bool = True,
    ) -> None:
        self.model = model
        self.resilience = resilience or Resilience()
        self.admission = admission or Admission()
        self.reissues = Reissues()
        self._routed: set[str] = set()  # choice request ids the selector is tracking
        self.hub = workers
        self.selector = selector
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        self.backend = self.tokenizer.backend_tokenizer  # the fast Rust tokenizer, for decoding
        self.encoder = PromptEncoder(self.backend, fast=fast_tokenizer)
        self.max_model_len = int(getattr(self.tokenizer, "model_max_length", 0) or 0)
        self.sampling_defaults = generation_defaults(tokenizer_path)
        self._token_text: dict[int, str] = {}
        # No token covers more characters than the longest in the vocabulary: a prompt longer than that many
        # times the context cannot fit, and is refused before anything tokenizes it.
        self.longest_token = max((len(t) for t in self.tokenizer.get_vocab()), default=1) or 1
        self.num_too_long = 0
        self._tokenize_pool = ThreadPoolExecutor(os.cpu_count() or 2, thread_name_prefix="zdyn-tokenize")
        self.num_tokenized_on_threads = 0  # requests whose prompt was long enough to go to the pool
        self.outputs = outputs or OutputParsing()  # tool calls and reasoning in the output (zdyn.tools)

    async def tokenize_async(self, request: TextRequest) -> TokenIds:
        """``tokenize``, a long prompt's text encoded on a thread; a 400 at once for one that cannot fit the context.

        Only the Rust call runs there (it releases the GIL throughout); the template (jinja, cheap) and the
        conversion of the ids (Python objects) stay on the loop, so that a tokenizing thread never holds the GIL
        the event loop waits for (a thread holding it would stall every send and receive by up to the switch
        interval)."""
        self.check_length(request)
        if text_chars(request) <= LONG_PROMPT_CHARS:
            return self.tokenize(request)
        prompt = self.prompt_text(request)
        if isinstance(prompt, TokenIds):
            return prompt
        self.num_tokenized_on_threads += 1
        ids = await asyncio.get_running_loop().run_in_executor(self._tokenize_pool, self.encoder.encode, *prompt)
        return TokenIds(ids)

    def check_length(self, request: TextRequest) -> None:
        """Refuse a prompt whose text alone is too long for any live worker's context, by its length in characters
        (a 10 MB prompt would otherwise take seconds of CPU and a gigabyte to tokenize, just to be refused)."""
        limit = max((p.ready.max_model_len for p in self.hub.live_peers()), default=0) or self.max_model_len
        chars = text_chars(request)
        if 0 < limit < 1 << 30 and chars > limit * self.longest_token:
            self.num_too_long += 1
            param = "prompt" if request.messages is None else "messages"
            raise RequestError(f"the prompt has {chars} characters: more than a {limit}-token context holds", 400,
                               param=param)  # fmt: skip

    def tokenize(self, request: TextRequest) -> TokenIds:
        """Prompt token ids: the chat template applied to the messages, or the completion prompt."""
        prompt = self.prompt_text(request)
        return prompt if isinstance(prompt, TokenIds) else TokenIds(self.encoder.encode(*prompt))

    def prompt_text(self, request: TextRequest) -> tuple[str, bool] | TokenIds:
        """The text to encode and whether to add special tokens; or the ids of a token-id prompt, checked."""
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
            return text, False
        if isinstance(request.prompt, list):
            vocab = len(self.tokenizer)
            if request.prompt and not 0 <= min(request.prompt) <= max(request.prompt) < vocab:
                raise RequestError(f"prompt token ids must be in [0, {vocab})")
            return TokenIds(request.prompt)
        return request.prompt or "", True

    def models(self) -> list[str]:
        return [self.model]

    def capacity(self) -> int:
        """Sequences the live workers run at once (their ``max_num_seqs``), for admission control."""
        return sum(p.ready.max_num_seqs for p in self.live_workers())

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
                "host": p.ready.host,
                **({"prefill_queues": msgspec.to_builtins(p.load.prefill_queues)} if p.load.prefill_queues else {}),
            }
            for p in self.live_workers()
        ]

    def routers(self) -> list[dict[str, Any]]:
        """The separate router this processor asks, and whether it answers (``/health``)."""
        client = getattr(self.selector, "client", None)
        return [] if client is None else [{"endpoint": client.endpoint, "status": client.status}]

    async def process(
        self, request_id: str, request: TextRequest, resume: list[ChoiceProgress] | None = None
    ) -> AsyncGenerator[Delta]:
        """Yield text deltas (``index`` = choice) until every choice has finished. ``resume``: the tokens each
        choice already produced under another processor (that one died): the stream continues after them."""
        outputs = self.outputs.for_request(request)  # a 400 if it needs a parser this processor lacks
        if outputs is not None and self.outputs.keeps_special_tokens:
            request.skip_special_tokens = False  # tool-call and thinking tags are special tokens in many models
        token_ids = await self.tokenize_async(request)
        peers = await self._workers(set())
        # Validated before routing, against the context every live worker can take: a rejected request is
        # never counted as load by the router.
        sampling = self._sampling(
            request, len(token_ids), min(p.ready.max_model_len or self.max_model_len for p in peers)
        )
        if outputs is not None:
            for progress in resume or []:  # choices another processor started: their parsers catch up
                text = self.backend.decode(progress.token_ids, skip_special_tokens=request.skip_special_tokens)
                outputs.prime(progress.index, text, progress.token_ids)
        run = self._run(request_id, token_ids, sampling, request, resume or [])
        async with self.admission.slot(self.capacity()), aclosing(run) as deltas:
            async for delta in deltas:
                if outputs is not None:
                    outputs.apply(delta)  # tool calls and reasoning apart from the content
                yield delta

    async def _run(
        self,
        request_id: str,
        token_ids: TokenIds,
        sampling: SamplingParams,
        request: TextRequest,
        resume: list[ChoiceProgress],
    ) -> AsyncGenerator[Delta]:
        runs = [self._choice_run(request_id, i, token_ids, sampling, request) for i in range(request.n)]
        for progress in resume:
            if 0 <= progress.index < len(runs):
                runs[progress.index].resume(progress.token_ids)
        done = {p.index for p in resume if p.finished}
        choose = self._choose if request.n == 1 else self._choose_together()
        streams = [run.deltas(choose, self.hub.stream) for run in runs if run.spec.index not in done]
        prefilled: set[int] = set()
        try:
            async with aclosing(streams[0] if len(streams) == 1 else interleave(streams)) as deltas:
                async for delta in deltas:
                    if delta.index not in prefilled:
                        self.selector.update(delta.request_id, RouteEvent.PREFILLED)
                        prefilled.add(delta.index)
                    delta.request_id = request_id
                    if delta.logprobs:
                        delta.logprobs = self.with_token_text(delta.logprobs)
                    yield delta
        finally:
            for run in runs:
                if run.spec.request_id in self._routed:
                    self._routed.discard(run.spec.request_id)
                    self.selector.update(run.spec.request_id, RouteEvent.FINISHED)

    def _choice_run(
        self, request_id: str, index: int, token_ids: TokenIds, sampling: SamplingParams, request: TextRequest
    ) -> ChoiceRun:
        detokenizer = Detokenizer(
            self.backend,
            stop=request.stop,
            include_stop_str_in_output=request.include_stop_str_in_output,
            skip_special_tokens=request.skip_special_tokens,
        )
        rid = request_id if request.n == 1 else f"{request_id}-{index}"
        choice_sampling = sampling if request.n == 1 else _choice_seed(sampling, index)
        spec = ChoiceSpec(rid, index, token_ids, choice_sampling, self.model, detokenizer, movable(choice_sampling))
        return ChoiceRun(spec, self.resilience, self.reissues)

    async def _workers(self, avoid: set[str]) -> list[Peer]:
        """Live workers, preferring those not in ``avoid`` (for up to AVOID_WAIT_S). With none live, wait up to
        ``worker_wait_s`` for one to join (a restart), then fail with a 503."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        while True:
            live = self.live_workers()
            preferred = [p for p in live if p.id not in avoid]
            waited = loop.time() - started
            if preferred:
                return preferred
            if live and waited >= AVOID_WAIT_S:
                return live
            if waited >= self.resilience.worker_wait_s:
                raise unavailable(f"no worker is serving {self.model} right now")
            limit = min(AVOID_WAIT_S, self.resilience.worker_wait_s) if live else self.resilience.worker_wait_s
            await self.hub.wait_for_change(max(0.01, limit - waited))

    def _choose_together(self) -> Choose:
        """Routes the choices of one request (n > 1): the first as usual, the others to the same worker while it is
        live and not to be avoided, so that they share its prefix cache (and, in disagg, one remote prefill)."""
        first: list[Peer] = []
        lock = asyncio.Lock()  # the choices start together: the others wait for the first one's route

        async def choose(rid: str, token_ids: TokenIds, avoid: set[str]) -> Route:
            async with lock:
                peer = first[0] if first else None
                same = peer is not None and peer.id not in avoid and peer in self.live_workers()
                route = await self._choose(rid, token_ids, avoid, [peer] if same and peer else None)
                first[:] = first or [route.peer]
                return route

        return choose

    async def _choose(self, rid: str, token_ids: TokenIds, avoid: set[str], only: list[Peer] | None = None) -> Route:
        peers = only or await self._workers(avoid)
        if rid in self._routed:  # routed before, to a worker that failed: the router forgets that
            self.selector.update(rid, RouteEvent.FINISHED)
        route = await self.selector.select(rid, token_ids, peers)
        self._routed.add(rid)
        return route

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

    def with_token_text(self, logprobs: list[TokenLogprob]) -> list[TokenLogprob]:
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


def text_chars(request: TextRequest) -> int:
    """The characters of a request's prompt text (message contents and their text parts)."""
    if request.messages is None:
        return len(request.prompt) if isinstance(request.prompt, str) else 0
    total = 0
    for message in request.messages:
        content = message.get("content")
        if isinstance(content, str):
            total += len(content)
        elif isinstance(content, list):
            total += sum(len(p.get("text") or "") for p in content if isinstance(p, dict))
    return total


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
