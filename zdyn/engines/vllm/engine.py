"""``VllmEngine``: vLLM's ``AsyncLLM`` behind zdyn's Engine interface (token ids in, token deltas out)."""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any

from zdyn.engines.base import EngineDeadError, EngineInfo, RequestError
from zdyn.engines.vllm.host import NIXL_KV_LEASE_S
from zdyn.engines.vllm.plugin import WORKER_PID_ENV
from zdyn.protocol import (
    Delta,
    Finish,
    FinishReason,
    Generate,
    Heartbeat,
    SamplingParams,
    TokenIds,
    TokenLogprob,
    TopLogprob,
)

log = logging.getLogger(__name__)

PROMPT_TOKEN_SOURCES = ("computed", "local_cache_hit", "external_kv_transfer")  # vLLM's PromptTokenStats
FINISH_REASONS: dict[str, FinishReason] = {"stop": "stop", "length": "length", "abort": "abort", "repetition": "stop"}


class VllmEngine:
    """Token ids in, token deltas out, one ``AsyncLLM`` (its EngineCore runs in a child process)."""

    def __init__(self, engine_args: Any) -> None:
        """``engine_args``: vLLM's ``AsyncEngineArgs`` (see ``host.engine_args``)."""
        self.engine_args = engine_args
        served_model_name = engine_args.served_model_name[0] if engine_args.served_model_name else engine_args.model
        self.served_model_name = served_model_name
        self.info = EngineInfo(served_model_name, "vllm", 0, 0, 0, 0)
        self._loads: dict[int, Heartbeat] = {}  # by data-parallel rank (one stat logger per engine core)
        self._inflight: Counter[int] = Counter()  # requests in flight by data-parallel rank
        self.ranks: list[int] = [0]  # the data-parallel ranks this engine's client sends requests to
        self.kv_event_sources: dict[int, tuple[str, str]] = {}  # rank -> where its KV-event publisher is
        self._released = 0
        self.prompt_tokens: Counter[str] = Counter()  # prompt tokens by where their KV came from
        self.generation_tokens = 0  # tokens vLLM generated (its iteration stats)
        self._llm: Any = None

    async def start(self) -> None:
        from vllm.v1.engine.async_llm import AsyncLLM

        engine = self

        class LoadLogger(_stat_logger_base()):  # type: ignore[misc]
            """Keeps the scheduler's latest running/waiting/KV-usage figures for heartbeats."""

            def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
                self.rank = engine_index

            def record(self, scheduler_stats: Any, iteration_stats: Any, *args: Any, **kwargs: Any) -> None:
                engine.generation_tokens += getattr(iteration_stats, "num_generation_tokens", 0)
                prompt = getattr(iteration_stats, "prompt_token_stats", None)
                if prompt is not None and prompt.total:
                    for source in PROMPT_TOKEN_SOURCES:
                        engine.prompt_tokens[source] += getattr(prompt, source, 0)
                if scheduler_stats is not None:
                    engine._loads[self.rank] = Heartbeat(
                        num_running=scheduler_stats.num_running_reqs,
                        num_waiting=scheduler_stats.num_waiting_reqs,
                        kv_usage=float(scheduler_stats.kv_cache_usage),
                    )

            def log_engine_initialized(self) -> None:
                pass

        os.environ[WORKER_PID_ENV] = str(os.getpid())  # see _die_with_worker()
        self._llm = AsyncLLM.from_engine_args(self.engine_args, stat_loggers=[LoadLogger])
        config = self._llm.vllm_config
        self.info = EngineInfo(
            model=self.served_model_name,
            engine="vllm",
            max_model_len=config.model_config.max_model_len,
            max_num_seqs=config.scheduler_config.max_num_seqs,
            block_size=config.cache_config.block_size,
            num_kv_blocks=config.cache_config.num_gpu_blocks or 0,
        )
        transfer = config.kv_transfer_config
        if transfer is not None and transfer.kv_connector == "NixlConnector":
            self.info.kv_lease_s = float(transfer.get_from_extra_config("kv_lease_duration", NIXL_KV_LEASE_S))
        self.ranks = list(getattr(self._llm.engine_core, "engine_ranks_managed", None) or [0])
        # each engine core reports where its publisher is (vLLM offsets the endpoint by its data-parallel rank)
        for rank, events in self._llm.get_kv_event_sources().items():
            if events.enable_kv_cache_events and events.publisher == "zmq":
                self.kv_event_sources[rank] = (events.endpoint, events.replay_endpoint or "")
        self.info.kv_events_endpoint, self.info.kv_replay_endpoint = self.kv_event_sources.get(self.ranks[0], ("", ""))
        for rank in self.ranks:
            await self._warm_up(rank if len(self.ranks) > 1 else None)

    async def _warm_up(self, rank: int | None) -> None:
        """One tiny request before serving: vLLM initialises parts of its client lazily, blocking the event
        loop (and so the worker's heartbeats) for a second or more on the first real request. It asks for
        logprobs: vLLM compiles its logprobs kernel (torch.compile) on first use, which stalls the whole batch
        (~10 s on CPU the first time, ~2 s from torch's on-disk cache): better before serving than inside it."""
        started = time.perf_counter()
        warm_up = Generate(request_id=f"zdyn-warm-up-{os.getpid()}-{rank}", token_ids=TokenIds([0, 1, 2]))
        warm_up.sampling.max_tokens = 2
        warm_up.sampling.logprobs = 1
        async for _ in self.generate(warm_up, rank):
            pass
        log.info(
            "engine warm-up%s took %.2fs", "" if rank is None else f" of rank {rank}", time.perf_counter() - started
        )

    def load(self, rank: int | None = None) -> Heartbeat:
        """The scheduler's latest figures: of data-parallel ``rank``, or of the first rank."""
        rank = self.ranks[0] if rank is None else rank
        latest = self._loads.get(rank, Heartbeat())
        if self._inflight[rank] == 0:  # vLLM reports stats per step, so the last ones go stale when it idles
            return Heartbeat(kv_usage=latest.kv_usage)
        return latest

    def num_unfinished(self) -> int:
        """Requests vLLM itself still holds (an aborted one leaves at once)."""
        return int(self._llm.get_num_unfinished_requests()) if self._llm is not None else 0

    async def generate(self, request: Generate, rank: int | None = None) -> AsyncIterator[Delta]:
        """Stream ``request``'s deltas; ``rank``: run it on that data-parallel rank (None: vLLM chooses)."""
        from vllm.v1.engine.exceptions import EngineDeadError as VllmEngineDead

        rid = request.request_id
        prompt = {"prompt_token_ids": list(request.token_ids)}  # vLLM wants a list (TokenIds when decoded)
        num_prompt = len(request.token_ids)
        num_output = 0
        first = True
        counted = self.ranks[0] if rank is None else rank
        self._inflight[counted] += 1
        try:
            sampling = to_vllm_sampling(request.sampling, request.kv_transfer_params)
            # vLLM's client numbers the engines it manages from 0, in rank order
            index = None if rank is None else self.ranks.index(rank)
            async for out in self._llm.generate(prompt, sampling, rid, data_parallel_rank=index):
                completion = out.outputs[0]
                token_ids = list(completion.token_ids)
                num_output += len(token_ids)
                delta = Delta(request_id=rid, token_ids=token_ids)
                if first:
                    delta.num_cached_tokens = out.num_cached_tokens or 0
                    first = False
                if request.sampling.logprobs is not None and completion.logprobs:
                    delta.logprobs = convert_logprobs(token_ids, completion.logprobs, request.sampling.logprobs)
                if out.finished:
                    if completion.finish_reason == "error":
                        raise RequestError(f"vLLM failed request {rid}", 500, "internal_error")
                    delta.kv_transfer_params = out.kv_transfer_params  # a prefill's result (KV connector)
                    delta.finish = Finish(
                        reason=FINISH_REASONS.get(completion.finish_reason or "stop", "stop"),
                        stop_reason=completion.stop_reason,
                        prompt_tokens=num_prompt,
                        completion_tokens=num_output,
                        cached_tokens=out.num_cached_tokens or 0,
                    )
                yield delta
        except VllmEngineDead as e:
            raise EngineDeadError(str(e)) from e
        except (ValueError, _validation_error()) as e:  # vLLM's checks of the request: a 400, not an engine fault
            raise RequestError(str(e)) from e
        finally:
            self._inflight[counted] -= 1

    async def release_kv(self, request_id: str, kv_transfer_params: dict[str, Any]) -> None:
        # A request that vLLM aborts on arrival: its NixlConnector tells the prefill side it is done with the KV.
        self._released += 1
        params = {**kv_transfer_params, "do_remote_prefill": True}
        await self._llm.notify_kv_transfer_request_rejected(f"{request_id}-unused-{self._released}", params)

    async def shutdown(self) -> None:
        if self._llm is not None:
            self._llm.shutdown()
            self._llm = None


def to_vllm_sampling(params: SamplingParams, kv_transfer_params: dict[str, Any] | None = None) -> Any:
    from vllm import SamplingParams as VllmSamplingParams
    from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

    structured = None
    if params.structured is not None:  # at most one kind is set (the frontend checked); vLLM checks the rest
        s = params.structured
        structured = StructuredOutputsParams(
            json=s.json, regex=s.regex, choice=s.choice, grammar=s.grammar, json_object=s.json_object or None
        )

    return VllmSamplingParams(
        n=1,
        max_tokens=params.max_tokens,
        min_tokens=params.min_tokens,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        min_p=params.min_p,
        seed=params.seed,
        stop_token_ids=params.stop_token_ids,
        ignore_eos=params.ignore_eos,
        presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty,
        repetition_penalty=params.repetition_penalty,
        logprobs=params.logprobs,
        structured_outputs=structured,
        detokenize=False,  # the processor detokenizes
        output_kind=RequestOutputKind.DELTA,
        extra_args={"kv_transfer_params": kv_transfer_params} if kv_transfer_params else None,
    )


def convert_logprobs(token_ids: list[int], positions: Iterable[Mapping[int, Any]], num_top: int) -> list[TokenLogprob]:
    """vLLM's per-position {token id: Logprob} maps -> the sampled token's logprob plus the top ``num_top``."""
    result = []
    for token_id, candidates in zip(token_ids, positions, strict=False):
        ranked = sorted(candidates.items(), key=lambda item: item[1].rank or 0)
        chosen = candidates.get(token_id)
        result.append(
            TokenLogprob(
                token_id=token_id,
                logprob=float(chosen.logprob) if chosen is not None else float("-inf"),
                top=[
                    TopLogprob(token_id=t, logprob=float(lp.logprob))
                    for t, lp in ranked
                    if lp.rank and lp.rank <= num_top
                ],
            )
        )
    return result


def _validation_error() -> type[Exception]:
    """vLLM's error for a request it refuses (a ValueError in older vLLM, its own client error since)."""
    try:
        from vllm.exceptions import VLLMValidationError
    except ImportError:
        return ValueError
    return VLLMValidationError


def _stat_logger_base() -> type:
    from vllm.v1.metrics.loggers import StatLoggerBase

    return StatLoggerBase
