"""Conditional disaggregation, as in Dynamo: prefill remotely only when it is worth it and the queue has room."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class Decision:
    remote: bool
    reason: str
    new_tokens: int  # prompt tokens not already cached on this worker


@dataclass(slots=True)
class DisaggPolicy:
    """Remote prefill when the prompt tokens not cached on this worker exceed ``max_local_prefill_length`` and
    fewer than ``max_prefill_queue_size`` jobs wait for a prefill worker. Both may change while running."""

    max_local_prefill_length: int = 512
    max_prefill_queue_size: int = 8

    def __post_init__(self) -> None:
        self.update(self.max_local_prefill_length, self.max_prefill_queue_size)

    def update(self, max_local_prefill_length: int | None = None, max_prefill_queue_size: int | None = None) -> None:
        if max_local_prefill_length is not None:
            if max_local_prefill_length < 0:
                raise ValueError(f"max_local_prefill_length must be >= 0, got {max_local_prefill_length}")
            self.max_local_prefill_length = max_local_prefill_length
        if max_prefill_queue_size is not None:
            if max_prefill_queue_size < 0:
                raise ValueError(f"max_prefill_queue_size must be >= 0, got {max_prefill_queue_size}")
            self.max_prefill_queue_size = max_prefill_queue_size

    def decide(self, prompt_tokens: int, cached_tokens: int, queued: int, prefill_workers: int) -> Decision:
        new = max(prompt_tokens - cached_tokens, 0)
        if new <= self.max_local_prefill_length:
            return Decision(False, f"{new} new tokens <= max_local_prefill_length {self.max_local_prefill_length}", new)
        if prefill_workers == 0:
            return Decision(False, "no prefill worker", new)
        if queued >= self.max_prefill_queue_size:
            return Decision(False, f"prefill queue full ({queued} >= {self.max_prefill_queue_size})", new)
        return Decision(True, f"{new} new tokens > {self.max_local_prefill_length}, {queued} queued", new)
