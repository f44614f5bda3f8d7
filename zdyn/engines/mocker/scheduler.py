"""Continuous batching like vLLM V1: chunked prefill, a per-step token budget, recompute preemption."""

from __future__ import annotations

import logging
import socket
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from zdyn.engines.base import RequestError
from zdyn.engines.mocker.config import MockerConfig
from zdyn.engines.mocker.kv_manager import KvBlockManager
from zdyn.engines.mocker.kv_transfer import (
    parse_remote_prefill,
    prefill_result,
    wants_remote_decode,
    wants_remote_prefill,
)
from zdyn.engines.mocker.sequence import MockSequence, sample_token
from zdyn.engines.mocker.structured import scripted_token
from zdyn.engines.mocker.timing import StepComposition
from zdyn.protocol import Delta, Finish, FinishReason

log = logging.getLogger(__name__)


@dataclass(slots=True)
class ScheduledChunk:
    seq: MockSequence
    num_new_tokens: int
    is_prefill: bool


@dataclass(slots=True)
class StepPlan:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)
    transfers: list[MockSequence] = field(default_factory=list)  # started pulling their prompt's KV this step
    composition: StepComposition = field(default_factory=StepComposition)


class Scheduler:
    """Decides what each engine step computes and produces its output tokens; no clocks, no IO.

    A remote-prefilled sequence leaves ``waiting`` for ``receiving`` holding its blocks and needing no steps;
    whoever keeps the clock calls ``finish_transfer`` once its KV has arrived.
    """

    def __init__(self, config: MockerConfig, kv: KvBlockManager | None = None, *, engine_id: str = "") -> None:
        self.config = config
        self.kv = kv or KvBlockManager(
            config.num_blocks, config.block_size, enable_prefix_caching=config.enable_prefix_caching
        )
        self.engine_id = engine_id or str(uuid.uuid4())  # vLLM's KV-transfer engine id is a uuid4 too
        self.host = socket.gethostname()
        self.waiting: deque[MockSequence] = deque()
        self.running: list[MockSequence] = []  # in admission order
        self.receiving: dict[str, MockSequence] = {}  # holding blocks while their prompt's KV arrives
        self._seqs: dict[str, MockSequence] = {}
        self.num_preemptions = 0
        self.num_remote_prefills = 0
        self.num_transferred_tokens = 0
        self.num_kv_transfer_fallbacks = 0  # remote-prefill requests with unusable params, computed locally

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting) + len(self.receiving)  # vLLM counts requests waiting for remote KV as waiting

    @property
    def num_receiving(self) -> int:
        return len(self.receiving)

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def add(self, seq: MockSequence) -> None:
        if seq.request_id in self._seqs:
            raise RequestError(f"request id {seq.request_id} is already running")
        params = seq.kv_transfer_params
        if params is not None and wants_remote_prefill(params):
            try:
                seq.remote_prefill = parse_remote_prefill(params, seq.prompt_len)
            except ValueError as e:
                self.num_kv_transfer_fallbacks += 1
                log.warning("request %s: unusable kv_transfer_params, prefilling locally: %s", seq.request_id, e)
        self._seqs[seq.request_id] = seq
        self.waiting.append(seq)

    def abort(self, request_id: str) -> bool:
        """Drop a request and free its blocks; False if it is unknown or already finished."""
        seq = self._seqs.pop(request_id, None)
        if seq is None:
            return False
        if seq in self.running:
            self.running.remove(seq)
        elif self.receiving.pop(request_id, None) is None:
            self.waiting.remove(seq)
        self.kv.free(request_id)
        seq.finish = Finish(reason="abort", prompt_tokens=seq.prompt_len, completion_tokens=seq.num_output)
        return True

    def schedule(self) -> StepPlan:
        plan = StepPlan()
        budget = self._schedule_running(plan, self.config.max_num_batched_tokens)
        if not plan.preempted:  # like vLLM, admit nobody in a step that had to preempt: memory is short
            self._schedule_waiting(plan, budget)
        plan.composition = self._compose(plan)
        return plan

    def _schedule_running(self, plan: StepPlan, budget: int) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = len(seq.token_ids) - seq.num_computed
            if self.config.enable_chunked_prefill:
                num_new = min(num_new, budget)
            elif num_new > budget:
                i += 1
                continue
            if not self._allocate_or_preempt(seq, seq.num_computed + num_new, plan):
                break  # seq itself was preempted, and it was the last one running
            plan.chunks.append(ScheduledChunk(seq, num_new, seq.in_prefill))
            budget -= num_new
            i += 1
        return budget

    def _allocate_or_preempt(self, seq: MockSequence, num_tokens: int, plan: StepPlan) -> bool:
        """Preempt the most recently admitted requests (vLLM V1, FCFS) until seq fits; False if seq was one."""
        while not self.kv.allocate(seq.request_id, seq.token_ids, num_tokens):
            victim = self.running.pop()
            self._preempt(victim)
            plan.preempted.append(victim.request_id)
            if victim is seq:
                return False
        return True

    def _schedule_waiting(self, plan: StepPlan, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if seq.remote_prefill is not None:
                if not self._start_transfer(seq, plan):
                    return
                continue
            if seq.num_computed:  # its prompt's KV arrived by transfer: it holds those blocks already
                num_cached, reserve = seq.num_computed, 0
            else:
                num_cached = self.kv.match_prefix(seq.request_id, seq.token_ids)
                reserve = self.config.watermark_blocks
            num_new = len(seq.token_ids) - num_cached
            if not self.config.enable_chunked_prefill and num_new > budget:
                return
            num_new = min(num_new, budget)
            if not self.kv.allocate(seq.request_id, seq.token_ids, num_cached + num_new, reserve=reserve):
                return
            self.waiting.popleft()
            self.running.append(seq)
            seq.num_computed = num_cached
            if seq.num_cached_tokens < 0:
                seq.num_cached_tokens = num_cached
            plan.chunks.append(ScheduledChunk(seq, num_new, True))
            budget -= num_new

    def _start_transfer(self, seq: MockSequence, plan: StepPlan) -> bool:
        """Move a remote-prefilled sequence from waiting to receiving, holding blocks for the KV it will get
        (vLLM: WAITING_FOR_REMOTE_KVS). Only the prompt tokens missing from the local prefix cache are pulled.
        False if memory is short."""
        remote = seq.remote_prefill
        assert remote is not None
        num_cached = self.kv.match_prefix(seq.request_id, seq.token_ids)
        if min(remote.num_tokens, seq.prompt_len - 1) <= num_cached:  # nothing to gain: compute it locally
            seq.remote_prefill = None
            return True
        reserve = self.config.watermark_blocks
        if not self.kv.allocate(seq.request_id, seq.token_ids, remote.num_tokens, reserve=reserve, cache=False):
            return False
        self.waiting.popleft()
        self.receiving[seq.request_id] = seq
        seq.remote_prefill = None
        seq.num_computed = remote.num_tokens
        seq.num_transferred_tokens = remote.num_tokens - num_cached
        # vLLM 0.32 reports the prefill worker's own prefix hit, else its own (local hit + transferred tokens).
        seq.num_cached_tokens = remote.num_tokens if remote.cached_tokens is None else remote.cached_tokens
        self.num_remote_prefills += 1
        self.num_transferred_tokens += seq.num_transferred_tokens
        plan.transfers.append(seq)
        log.debug(
            "request %s: pulling %d tokens of KV from engine %s",
            seq.request_id,
            seq.num_transferred_tokens,
            remote.engine_id,
        )
        return True

    def finish_transfer(self, seq: MockSequence) -> bool:
        """The KV of a receiving sequence has arrived: cache its blocks and queue it first, with every prompt
        token computed but the last, which is recomputed to sample the first output token (as vLLM does).
        False if the sequence was aborted meanwhile."""
        if self.receiving.get(seq.request_id) is not seq:
            return False
        del self.receiving[seq.request_id]
        self.kv.allocate(seq.request_id, seq.token_ids, seq.num_computed)  # no new blocks: only caches them
        seq.num_computed = min(seq.num_computed, seq.prompt_len - 1)
        self.waiting.appendleft(seq)
        return True

    def update(self, plan: StepPlan) -> list[Delta]:
        """Finish the step: advance the computed tokens, sample one token per completed context, stop requests."""
        deltas: list[Delta] = []
        for chunk in plan.chunks:
            seq = chunk.seq
            if seq.finish is not None:  # aborted while the step ran
                continue
            seq.num_computed += chunk.num_new_tokens
            if seq.num_computed < len(seq.token_ids):
                continue  # a prefill chunk that did not reach the end of the context
            seq.in_prefill = False
            token = self._sample(seq)
            seq.token_ids.append(token)
            seq.finish = self._check_stop(seq, token)
            delta = Delta(request_id=seq.request_id, token_ids=[token], finish=seq.finish)
            if seq.num_output == 1:
                delta.num_cached_tokens = max(seq.num_cached_tokens, 0)
            deltas.append(delta)
            if seq.finish is not None:
                if wants_remote_decode(seq.kv_transfer_params):
                    delta.kv_transfer_params = self._prefill_result(seq)
                self.kv.free(seq.request_id)
                del self._seqs[seq.request_id]
        if any(d.finish is not None for d in deltas):
            self.running = [s for s in self.running if s.finish is None]
        return deltas

    def step(self) -> list[Delta]:
        return self.update(self.schedule())

    def _prefill_result(self, seq: MockSequence) -> dict[str, Any]:
        return prefill_result(
            engine_id=self.engine_id,
            request_id=seq.request_id,
            block_ids=self.kv.blocks_of(seq.request_id),
            num_tokens=seq.num_computed,
            cached_tokens=max(seq.num_cached_tokens, 0),
            host=self.host,
        )

    def _preempt(self, seq: MockSequence) -> None:
        self.kv.free(seq.request_id)
        seq.num_computed = 0
        seq.in_prefill = True
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def _compose(self, plan: StepPlan) -> StepComposition:
        # One new token is a decode token's work, whatever made vLLM compute it: the last prompt token after its
        # KV arrived from a prefill worker or was all in the prefix cache, or the tail of a chunked prompt. A
        # prefill polynomial would charge its constant term (26 ms in Dynamo's) for it, as for a real prefill.
        prefill = [c for c in plan.chunks if c.is_prefill and c.num_new_tokens > 1]
        return StepComposition(
            prefill_tokens=tuple(c.num_new_tokens for c in prefill),
            prefill_context=tuple(c.seq.num_computed for c in prefill),
            decode_context=tuple(
                len(c.seq.token_ids) for c in plan.chunks if not c.is_prefill or c.num_new_tokens == 1
            ),
            kv_usage=self.kv.usage,
        )

    def _sample(self, seq: MockSequence) -> int:
        if (scripted := scripted_token(seq.script, seq.num_output, seq.eos_token_id)) is not None:
            return scripted
        vocab = self.config.vocab_size
        token = sample_token(seq.seed, seq.num_output, vocab)
        if seq.num_output < seq.min_tokens:
            # vLLM masks stop ids until min_tokens is reached; shift to the next non-stop id instead.
            stops = seq.stop_token_ids if seq.eos_token_id is None else seq.stop_token_ids | {seq.eos_token_id}
            for _ in range(min(len(stops), vocab - 1)):
                if token not in stops:
                    break
                token = (token + 1) % vocab
        return token

    def _check_stop(self, seq: MockSequence, token: int) -> Finish | None:
        reason: FinishReason | None = None
        stop_reason: int | None = None
        if seq.num_output >= seq.min_tokens:
            if token == seq.eos_token_id:
                reason = "stop"
            elif token in seq.stop_token_ids:
                reason, stop_reason = "stop", token
        if reason is None and (seq.num_output >= seq.max_tokens or len(seq.token_ids) >= self.config.max_model_len):
            reason = "length"
        if reason is None:
            return None
        return Finish(
            reason=reason,
            stop_reason=stop_reason,
            prompt_tokens=seq.prompt_len,
            completion_tokens=seq.num_output,
            cached_tokens=max(seq.num_cached_tokens, 0),
        )
