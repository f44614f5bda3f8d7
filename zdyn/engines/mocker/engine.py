"""MockerEngine: a simulated vLLM worker engine that costs no GPU and almost no CPU."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import zmq
from tokenizers import Tokenizer

from zdyn.engines.base import EngineDeadError, EngineInfo
from zdyn.engines.mocker.config import MockerConfig
from zdyn.engines.mocker.scheduler import Scheduler
from zdyn.engines.mocker.sequence import MockSequence, new_sequence
from zdyn.engines.mocker.structured import valid_text
from zdyn.engines.mocker.timing import InterpolatedTiming, PolynomialTiming, StepComposition, TimingModel
from zdyn.kv_publisher import KvEventPublisher
from zdyn.protocol import Delta, Generate, Heartbeat, StructuredOutputs
from zdyn.rpc.stream import merge_into

log = logging.getLogger(__name__)

MIN_SLEEP_S = 1e-4  # a step modelled shorter than this takes no sleep
SLICE_S = 1e-3  # such steps run back to back for up to this long before the engine yields to the event loop
IDLE_RETRY_S = 0.01


class MockerEngine:
    """Implements zdyn's Engine protocol with a real scheduler and KV block manager but simulated compute.

    One asyncio task steps the scheduler while there is work, sleeping for each step's modelled duration,
    and publishes the step's KV events in vLLM's wire format when an endpoint is configured. It plays both
    sides of a disaggregated prefill through ``kv_transfer_params`` (see ``kv_transfer``); a KV transfer runs
    beside the steps, on a timer.
    """

    def __init__(
        self,
        config: MockerConfig,
        *,
        timing: TimingModel | None = None,
        publisher: KvEventPublisher | None = None,
    ) -> None:
        self.config = config
        if timing is None:
            timing = InterpolatedTiming.from_file(config.timing_file) if config.timing_file else PolynomialTiming()
        self.timing = timing
        self.scheduler = Scheduler(config)
        self.engine_id = self.scheduler.engine_id  # remote_engine_id in the kv_transfer_params of its prefills
        self.info = EngineInfo(
            model=config.model_name,
            engine="mocker",
            max_model_len=config.max_model_len,
            max_num_seqs=config.max_num_seqs,
            block_size=config.block_size,
            num_kv_blocks=config.num_blocks,
            kv_events_endpoint=config.kv_events_endpoint or "",
            kv_replay_endpoint=config.kv_events_replay_endpoint or "",
        )
        self._publisher = publisher
        self._owns_publisher = False
        self._queues: dict[str, asyncio.Queue[Delta | Exception]] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._dead: EngineDeadError | None = None
        self.num_steps = 0
        self.simulated_ms = 0.0  # modelled engine time before the speed-up, summed over all steps
        self.last_step: tuple[StepComposition, float] | None = None
        self.transfer_ms = 0.0  # modelled KV-transfer time before the speed-up, summed over remote prefills
        self.transfer_wait_s = 0.0  # what those transfers were given to wait, after the speed-up
        self._tokenizer: Tokenizer | None = None  # the model's, loaded for the first structured-output request

    @property
    def publisher(self) -> KvEventPublisher | None:
        return self._publisher

    async def start(self) -> None:
        if self._task is not None:
            return
        if self._publisher is None and self.config.kv_events_endpoint:
            self._publisher = KvEventPublisher(
                self.config.kv_events_endpoint,
                replay_endpoint=self.config.kv_events_replay_endpoint,
                topic=self.config.kv_events_topic,
                buffer_steps=self.config.kv_events_buffer_steps,
            )
            self._owns_publisher = True
        if self._publisher is not None:
            await self._publisher.start()
        self._task = asyncio.create_task(self._run(), name="mocker-engine")

    async def generate(self, request: Generate) -> AsyncIterator[Delta]:
        if self._dead is not None:
            raise self._dead
        if self._task is None:
            raise RuntimeError("call start() before generate()")
        seq = new_sequence(request, self.config)
        if request.sampling.structured is not None:
            seq.script = self._script(request.sampling.structured, seq.seed)
        self.scheduler.add(seq)
        queue: asyncio.Queue[Delta | Exception] = asyncio.Queue()
        self._queues[seq.request_id] = queue
        self._wake.set()
        finished = False
        try:
            while not finished:
                delta = await queue.get()
                if isinstance(delta, Exception):
                    raise delta
                while delta.finish is None and not queue.empty():  # several steps ran in one slice
                    following = queue.get_nowait()
                    if isinstance(following, Exception):
                        queue.put_nowait(following)
                        break
                    merge_into(delta, following)
                    if following.kv_transfer_params is not None:  # merge_into does not carry it
                        delta.kv_transfer_params = following.kv_transfer_params
                finished = delta.finish is not None
                yield delta
        finally:
            self._queues.pop(seq.request_id, None)
            if not finished:
                self.scheduler.abort(seq.request_id)

    def _script(self, structured: StructuredOutputs, seed: int) -> list[int] | None:
        """Token ids of a valid answer to a structured-output request (see ``structured``), when the model dir
        has a tokenizer."""
        text = valid_text(structured, seed)
        if text is None or not self.config.model_path:
            return None
        if self._tokenizer is None:
            path = Path(self.config.model_path) / "tokenizer.json"
            if not path.is_file():
                return None
            self._tokenizer = Tokenizer.from_file(str(path))
        return list(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def load(self) -> Heartbeat:
        return Heartbeat(
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting,
            kv_usage=self.scheduler.kv.usage,
        )

    def reset_prefix_cache(self) -> bool:
        """Drop all cached blocks (AllBlocksCleared goes out with the next step's events, as in vLLM)."""
        return self.scheduler.kv.reset_prefix_cache()

    async def release_kv(self, request_id: str, kv_transfer_params: dict[str, Any]) -> None:
        """Nothing to free: a simulated prefill worker keeps no KV for its reader (see ``kv_transfer``)."""

    async def shutdown(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._fail(EngineDeadError("mocker engine shut down"))
        if self._publisher is not None and self._owns_publisher:
            await self._publisher.close()

    async def _run(self) -> None:
        yielded = time.monotonic()
        try:
            while True:
                if not self.scheduler.has_work():
                    self._wake.clear()
                    await self._wake.wait()
                    yielded = time.monotonic()
                    continue
                if await self._step():
                    yielded = time.monotonic()
                elif time.monotonic() - yielded > SLICE_S:
                    await asyncio.sleep(0)  # let streams and new requests in
                    yielded = time.monotonic()
        except Exception as e:
            log.exception("mocker engine failed")
            self._fail(EngineDeadError(f"mocker engine failed: {e!r}"))

    async def _step(self) -> bool:
        """Run one engine step; True if it slept (yielded to the event loop)."""
        started = time.monotonic()
        plan = self.scheduler.schedule()
        for seq in plan.transfers:
            self._start_transfer(seq)
        if not plan.chunks and self.scheduler.num_receiving:  # nothing can run before a transfer's timer wakes us
            self._wake.clear()
            await self._wake.wait()
            return True
        if not plan.chunks:  # cannot happen with a validated config; never spin if it does
            log.error("mocker scheduled nothing with %d waiting", self.scheduler.num_waiting)
            await asyncio.sleep(IDLE_RETRY_S)
            return True
        duration_ms = self.timing(plan.composition)
        self.num_steps += 1
        self.simulated_ms += duration_ms
        self.last_step = (plan.composition, duration_ms)
        remaining = started + duration_ms / 1000 / self.config.speedup - time.monotonic()
        slept = remaining > MIN_SLEEP_S
        if slept:
            await asyncio.sleep(remaining)
        for delta in self.scheduler.update(plan):
            queue = self._queues.get(delta.request_id)
            if queue is not None:
                queue.put_nowait(delta)
        events = self.scheduler.kv.take_events()
        if events and self._publisher is not None:
            try:
                await self._publisher.publish(events)
            except zmq.ZMQError:
                log.exception("could not publish KV events")  # best effort, like vLLM's publisher
        return slept

    def _start_transfer(self, seq: MockSequence) -> None:
        """Let the sequence's prompt KV arrive after its modelled transfer time, divided by the speed-up."""
        duration_ms = self.config.kv_transfer_ms(seq.num_transferred_tokens)
        wait_s = duration_ms / 1000 / self.config.speedup
        self.transfer_ms += duration_ms
        self.transfer_wait_s += wait_s
        asyncio.get_running_loop().call_later(wait_s, self._finish_transfer, seq)

    def _finish_transfer(self, seq: MockSequence) -> None:
        if self.scheduler.finish_transfer(seq):
            self._wake.set()

    def _fail(self, error: EngineDeadError) -> None:
        if self._dead is None:
            self._dead = error
        for request_id, queue in list(self._queues.items()):
            self.scheduler.abort(request_id)
            queue.put_nowait(error)
