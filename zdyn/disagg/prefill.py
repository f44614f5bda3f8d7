"""The prefill worker's side of disaggregated prefill: an engine wrapper that runs prompts only.

``PrefillEngine`` is the mirror of ``decode.DisaggEngine``: it wraps a worker's engine so that each request
computes the prompt's KV and one discarded token, and the engine keeps that KV for the decode worker to pull
(vLLM's NixlConnector with ``do_remote_decode``). Its last delta carries the KV-transfer parameters the decode
side needs and ``job_s``, the worker's own time for the job, from which the decode side bounds the KV's age.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec

from zdyn.engines.base import Engine, EngineInfo
from zdyn.errors import RequestError
from zdyn.protocol import Delta, Generate, Heartbeat


def as_prefill(request: Generate) -> Generate:
    """``request`` as a prefill job: prompt only, and keep the KV for a remote reader."""
    return msgspec.structs.replace(
        request,
        sampling=msgspec.structs.replace(request.sampling, max_tokens=1, min_tokens=0),
        kv_transfer_params={**(request.kv_transfer_params or {}), "do_remote_decode": True},
    )


class PrefillEngine:
    """An ``Engine`` that serves prefill jobs from the prefill queue."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @property
    def info(self) -> EngineInfo:
        return self.engine.info

    async def start(self) -> None:
        await self.engine.start()

    def load(self) -> Heartbeat:
        return self.engine.load()

    async def release_kv(self, request_id: str, kv_transfer_params: dict[str, Any]) -> None:
        await self.engine.release_kv(request_id, kv_transfer_params)

    async def shutdown(self) -> None:
        await self.engine.shutdown()

    async def generate(self, request: Generate) -> AsyncIterator[Delta]:
        if request.model and request.model != self.info.model:
            raise RequestError(f"this prefill worker serves {self.info.model!r}, not {request.model!r}")
        received = time.monotonic()
        async for delta in self.engine.generate(as_prefill(request)):
            if delta.finish is not None:
                delta.job_s = time.monotonic() - received  # the KV's lease starts about now
            yield delta
