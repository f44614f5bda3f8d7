"""A request's stream of deltas on the hub side: the queue the socket reader fills and the consumer drains."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from zdyn.protocol import Delta, Error, Process, Request


@dataclass(slots=True, eq=False)
class DeltaStream:
    """One request's deltas from one peer, as the hub's reader hands them to the request's consumer."""

    identity: bytes
    queue: asyncio.Queue[Delta | Error] = field(default_factory=asyncio.Queue)
    last_output: float = 0.0
    held: Delta | Error | None = None  # taken from the queue but not mergeable into the item handed out

    async def next(self) -> Delta | Error:
        """The next item; deltas of the same choice already waiting are merged into one (one SSE write)."""
        if self.held is not None:
            item, self.held = self.held, None
        else:
            item = await self.queue.get()
        while isinstance(item, Delta) and item.finish is None and not self.queue.empty():
            following = self.queue.get_nowait()
            if isinstance(following, Error) or following.index != item.index:
                self.held = following
                break
            merge_into(item, following)
        return item


def num_choices(request: Request) -> int:
    """How many finishes end a stream: a text request's ``n`` choices (minus any a resumed one finished)."""
    if isinstance(request, Process):
        return request.request.n - sum(1 for p in request.resume if p.finished)
    return 1


def merge_into(delta: Delta, following: Delta) -> None:
    """Append ``following`` (the next delta of the same request) to ``delta``."""
    delta.token_ids.extend(following.token_ids)
    if following.text is not None:
        delta.text = (delta.text or "") + following.text
    if following.logprobs is not None:
        delta.logprobs = (delta.logprobs or []) + following.logprobs
    if delta.num_cached_tokens is None:
        delta.num_cached_tokens = following.num_cached_tokens
    delta.finish = following.finish
    if following.kv_transfer_params is not None:
        delta.kv_transfer_params = following.kv_transfer_params
    if following.job_s is not None:
        delta.job_s = following.job_s
