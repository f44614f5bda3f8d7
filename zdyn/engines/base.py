"""The small interface every inference engine behind a zdyn worker implements."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

from zdyn.errors import EngineDeadError, RequestError
from zdyn.protocol import Delta, Generate, Heartbeat

__all__ = ["Engine", "EngineDeadError", "EngineInfo", "RequestError"]


@dataclass(slots=True)
class EngineInfo:
    model: str  # the served model name
    engine: str  # "vllm" | "mocker"
    max_model_len: int
    max_num_seqs: int
    block_size: int
    num_kv_blocks: int
    kv_events_endpoint: str = ""  # where the engine publishes KV events (bind form, e.g. tcp://*:5557)
    kv_replay_endpoint: str = ""
    kv_lease_s: float = 0.0  # how long a finished prefill's KV waits for a remote reader (0 = not bounded)


class Engine(Protocol):
    """Token ids in, token deltas out.

    ``generate`` yields one Delta per engine step for that request (several tokens when the engine
    produced several); the last one carries ``finish``. Closing or cancelling the iterator aborts the
    request inside the engine. Bad requests raise RequestError, a dead engine EngineDeadError.
    """

    @property
    def info(self) -> EngineInfo: ...

    async def start(self) -> None: ...

    def generate(self, request: Generate) -> AsyncIterator[Delta]: ...

    def load(self) -> Heartbeat: ...

    async def release_kv(self, request_id: str, kv_transfer_params: dict[str, Any]) -> None:
        """Tell the prefill worker behind ``kv_transfer_params`` that this KV will never be read: free it now."""
        ...

    async def shutdown(self) -> None: ...
