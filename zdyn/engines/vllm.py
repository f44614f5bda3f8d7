"""vLLM's AsyncLLM behind the Engine interface. The only module that imports vLLM."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any

from zdyn.engines.base import EngineDeadError, EngineInfo, RequestError
from zdyn.protocol import Delta, Finish, Generate, Heartbeat, SamplingParams, TokenLogprob, TopLogprob

log = logging.getLogger(__name__)


PROMPT_TOKEN_SOURCES = ("computed", "local_cache_hit", "external_kv_transfer")  # vLLM's PromptTokenStats
NIXL_KV_LEASE_S = 30  # NixlConnector's default kv_lease_duration: unread prefill KV is freed after this


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    """Every vLLM engine argument (``--max-model-len``, ``--block-size``, ...) on the worker's command line."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    AsyncEngineArgs.add_cli_args(parser)  # type: ignore[arg-type]


def kv_events_config(endpoint: str, replay_endpoint: str) -> Any:
    """vLLM's own ZMQ publisher of KV-cache events (what the KV router subscribes to)."""
    from vllm.config import KVEventsConfig

    return KVEventsConfig(
        enable_kv_cache_events=True, publisher="zmq", endpoint=endpoint, replay_endpoint=replay_endpoint
    )


def nixl_transfer_config(on_cpu: bool, lease_s: int = NIXL_KV_LEASE_S) -> Any:
    """vLLM's NixlConnector for disaggregated prefill: the decode side pulls the prompt's KV from the prefill
    side (on CPU through UCX from host memory). A KV pull that fails is recomputed locally, not an error.
    The prefill side keeps a finished prompt's KV for ``lease_s`` seconds, renewed while a reader has it."""
    from vllm.config import KVTransferConfig

    return KVTransferConfig(
        kv_connector="NixlConnector",
        kv_role="kv_both",
        kv_buffer_device="cpu" if on_cpu else "cuda",
        kv_load_failure_policy="recompute",
        kv_connector_extra_config={"backends": ["UCX"], "kv_lease_duration": lease_s},
    )


def make_parser(**kwargs: Any) -> argparse.ArgumentParser:
    """vLLM's own parser class understands its JSON- and dict-valued flags."""
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return FlexibleArgumentParser(**kwargs)


class VllmEngine:
    """Token ids in, token deltas out, one ``AsyncLLM`` (its EngineCore runs in a child process)."""

    def __init__(self, args: argparse.Namespace, served_model_name: str) -> None:
        from vllm.engine.arg_utils import AsyncEngineArgs

        self.engine_args = AsyncEngineArgs.from_cli_args(args)
        self.served_model_name = served_model_name
        self.info = EngineInfo(served_model_name, "vllm", 0, 0, 0, 0)
        self._load = Heartbeat()
        self._num_inflight = 0
        self._released = 0
        self.prompt_tokens: Counter[str] = Counter()  # prompt tokens by where their KV came from
        self._llm: Any = None

    async def start(self) -> None:
        from vllm.v1.engine.async_llm import AsyncLLM

        engine = self

        class LoadLogger(_stat_logger_base()):  # type: ignore[misc]
            """Keeps the scheduler's latest running/waiting/KV-usage figures for heartbeats."""

            def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
                pass

            def record(self, scheduler_stats: Any, iteration_stats: Any, *args: Any, **kwargs: Any) -> None:
                prompt = getattr(iteration_stats, "prompt_token_stats", None)
                if prompt is not None and prompt.total:
                    for source in PROMPT_TOKEN_SOURCES:
                        engine.prompt_tokens[source] += getattr(prompt, source, 0)
                if scheduler_stats is not None:
                    engine._load = Heartbeat(
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
        events = config.kv_events_config
        if events is not None and events.enable_kv_cache_events and events.publisher == "zmq":
            self.info.kv_events_endpoint = events.endpoint
            self.info.kv_replay_endpoint = events.replay_endpoint or ""
        await self._warm_up()

    async def _warm_up(self) -> None:
        """One tiny request before serving: vLLM initialises parts of its client lazily, blocking the event
        loop (and so the worker's heartbeats) for a second or more on the first real request."""
        started = time.perf_counter()
        warm_up = Generate(request_id=f"zdyn-warm-up-{os.getpid()}", token_ids=[0, 1, 2])
        warm_up.sampling.max_tokens = 2
        async for _ in self.generate(warm_up):
            pass
        log.info("engine warm-up took %.2fs", time.perf_counter() - started)

    def load(self) -> Heartbeat:
        if self._num_inflight == 0:  # vLLM reports stats per step, so the last ones go stale when it idles
            return Heartbeat(kv_usage=self._load.kv_usage)
        return self._load

    async def generate(self, request: Generate) -> AsyncIterator[Delta]:
        from vllm.v1.engine.exceptions import EngineDeadError as VllmEngineDead

        rid = request.request_id
        prompt = {"prompt_token_ids": request.token_ids}
        num_prompt = len(request.token_ids)
        num_output = 0
        first = True
        self._num_inflight += 1
        try:
            sampling = to_vllm_sampling(request.sampling, request.kv_transfer_params)
            async for out in self._llm.generate(prompt, sampling, rid):
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
                    delta.kv_transfer_params = out.kv_transfer_params  # a prefill's result (KV connector)
                    delta.finish = Finish(
                        reason=completion.finish_reason or "stop",
                        stop_reason=completion.stop_reason,
                        prompt_tokens=num_prompt,
                        completion_tokens=num_output,
                        cached_tokens=out.num_cached_tokens or 0,
                    )
                yield delta
        except VllmEngineDead as e:
            raise EngineDeadError(str(e)) from e
        except (ValueError, TypeError) as e:  # vLLM's input validation (VLLMValidationError is a ValueError)
            raise RequestError(str(e)) from e
        finally:
            self._num_inflight -= 1

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
    from vllm.sampling_params import RequestOutputKind

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


def _stat_logger_base() -> type:
    from vllm.v1.metrics.loggers import StatLoggerBase

    return StatLoggerBase


WORKER_PID_ENV = "ZDYN_WORKER_PID"
ARCH_REQ_XCOMP_PERM = 0x1023
XFEATURE_XTILEDATA = 18
SYS_ARCH_PRCTL = 158  # x86_64


def setup_vllm_process() -> None:
    """vLLM general plugin: vLLM calls it at the start of each of its processes (EngineCore, workers)."""
    if sys.platform.startswith("linux"):
        _allow_amx()
        _die_with_worker()
    _calm_nixl_progress_thread()


NIXL_PROGRESS_ENV = "ZDYN_NIXL_PROGRESS_THREAD"
NIXL_APIS = ("nixl_cu12._api", "nixl_cu13._api", "nixl._api")


def _calm_nixl_progress_thread() -> None:
    """NIXL's Python agent runs a UCX progress thread that polls with no pause (``pthrDelay = 0``): a whole core
    per agent, idle or not. With a decode and a prefill worker on a 2-core CPU box that starves everything else
    (heartbeats stop, transfers stall). vLLM exposes neither setting, so when NIXL's module is imported its agent
    constructor is wrapped. ``ZDYN_NIXL_PROGRESS_THREAD``: ``off`` (the default without a GPU: vLLM's per-step
    polling drives UCX), a pause in microseconds between polls, or ``spin`` (NIXL's own behaviour, the default
    with a GPU)."""
    default = "spin" if os.environ.get("CUDA_VISIBLE_DEVICES") or _has_nvidia_gpu() else "off"
    mode = os.environ.get(NIXL_PROGRESS_ENV, default).strip().lower()
    if mode in ("spin", "0", ""):
        return
    import importlib.abc
    import importlib.util

    def patch(module: Any) -> None:
        make_agent = module.nixlBind.nixlAgent
        if getattr(make_agent, "zdyn_calmed", False):
            return

        def agent(name: str, config: Any) -> Any:
            if mode == "off":
                config.useProgThread = False
            else:
                config.pthrDelay = int(mode)
            return make_agent(name, config)

        agent.zdyn_calmed = True  # type: ignore[attr-defined]
        module.nixlBind.nixlAgent = agent

    class Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
            if fullname not in NIXL_APIS:
                return None
            sys.meta_path.remove(self)
            try:
                spec = importlib.util.find_spec(fullname)
            finally:
                sys.meta_path.insert(0, self)
            if spec is not None and spec.loader is not None:
                load = spec.loader.exec_module

                def exec_module(module: Any) -> None:
                    load(module)
                    patch(module)

                spec.loader.exec_module = exec_module  # type: ignore[method-assign]
            return spec

    loaded = [sys.modules[name] for name in NIXL_APIS if name in sys.modules]
    for module in loaded:  # imported before this plugin ran
        patch(module)
    sys.meta_path.insert(0, Finder())


def _has_nvidia_gpu() -> bool:
    return os.path.exists("/dev/nvidiactl")


def _allow_amx() -> None:
    """Ask Linux for the AMX tile state before any kernel uses it: without that permission the first AMX
    instruction (vLLM's CPU bf16 kernels on AMX Xeons) kills the process with SIGILL."""
    import ctypes
    import platform

    if platform.machine() != "x86_64":
        return
    try:
        with open("/proc/cpuinfo") as f:
            has_amx = "amx_tile" in f.read()
    except OSError:
        return
    if has_amx:
        ctypes.CDLL(None, use_errno=True).syscall(SYS_ARCH_PRCTL, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)


def _die_with_worker() -> None:
    """An EngineCore whose zdyn worker dies (even by SIGKILL) gets SIGTERM from the kernel instead of living
    on as an orphan holding the model's memory."""
    import ctypes
    import signal

    if os.environ.get(WORKER_PID_ENV) != str(os.getppid()):
        return
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM))
    if os.environ.get(WORKER_PID_ENV) != str(os.getppid()):  # the worker died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)
