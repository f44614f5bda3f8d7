"""Datasets: the requests of a run (lengths, structure, arrival times), with content left symbolic."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from zdyn.bench.records import BenchRequest, Blocks, Content, Synthetic
from zdyn.bench.traces import MOONCAKE_BLOCK_SIZE, TraceEntry

# Key domains keep the token streams of different roles apart.
RANDOM_PROMPT = 10
SYSTEM_PROMPT = 11
USER_TURN = 12
SYNTHETIC_ANSWER = 13
TRACE_PROMPT = 14


class Dataset(Protocol):
    def size(self) -> int | None:
        """Number of requests, or None for an endless stream."""
        ...

    def requests(self, seed: int) -> Iterator[BenchRequest]: ...


def length_bounds(mean: int, range_ratio: float) -> tuple[int, int]:
    """Inclusive [low, high] of lengths sampled around ``mean`` (vLLM's random dataset rule), low >= 1."""
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError("range ratio must be in [0, 1)")
    return max(1, int(np.floor(mean * (1 - range_ratio)))), max(1, int(np.ceil(mean * (1 + range_ratio))))


@dataclass(slots=True, frozen=True)
class RandomDataset:
    """An endless stream of independent random-token prompts; lengths uniform in mean·(1 ± range_ratio)."""

    input_len: int = 1024
    output_len: int = 128
    range_ratio: float = 0.0

    def size(self) -> None:
        return None

    def requests(self, seed: int) -> Iterator[BenchRequest]:
        rng = np.random.default_rng(seed)
        in_low, in_high = length_bounds(self.input_len, self.range_ratio)
        out_low, out_high = length_bounds(self.output_len, self.range_ratio)
        for i in itertools.count():
            isl = int(rng.integers(in_low, in_high + 1))
            osl = int(rng.integers(out_low, out_high + 1))
            yield BenchRequest(i, [("user", Synthetic((RANDOM_PROMPT, i), isl))], isl, osl)


@dataclass(slots=True, frozen=True)
class PrefixDataset:
    """Shared system prompts × users; each user a multi-turn session whose history grows.

    Turn t of a user sends the system prompt, all earlier user turns and answers, and a new user message.
    Requests come turn by turn (all first turns, then all second turns, ...), users in seeded order.
    """

    num_prefixes: int = 10
    users_per_prefix: int = 4
    turns: int = 3
    prefix_len: int = 256
    suffix_len: int = 64
    output_len: int = 128

    def size(self) -> int:
        return self.num_prefixes * self.users_per_prefix * self.turns

    def prompt_len(self, turn: int) -> int:
        """Prompt tokens of a turn when every answer is exactly ``output_len`` tokens long."""
        return self.prefix_len + (turn + 1) * self.suffix_len + turn * self.output_len

    def requests(self, seed: int) -> Iterator[BenchRequest]:
        rng = np.random.default_rng(seed)
        num_users = self.num_prefixes * self.users_per_prefix
        index = 0
        for turn in range(self.turns):
            for user in rng.permutation(num_users).tolist():
                messages: list[tuple[str, Content]] = []
                if turn == 0:
                    prefix = user // self.users_per_prefix
                    messages.append(("system", Synthetic((SYSTEM_PROMPT, prefix), self.prefix_len)))
                messages.append(("user", Synthetic((USER_TURN, user, turn), self.suffix_len)))
                answer = Synthetic((SYNTHETIC_ANSWER, user, turn), self.output_len)
                yield BenchRequest(
                    index,
                    messages,
                    self.prompt_len(turn),
                    self.output_len,
                    session=user,
                    turn=turn,
                    synthetic_answer=answer,
                )
                index += 1


@dataclass(slots=True, frozen=True)
class TraceDataset:
    """Requests replayed from a trace. Entries with ``hash_ids`` become block prompts (equal id, equal
    block); others get independent random prompts of the traced length."""

    entries: tuple[TraceEntry, ...]
    block_size: int = MOONCAKE_BLOCK_SIZE

    def size(self) -> int:
        return len(self.entries)

    def requests(self, seed: int) -> Iterator[BenchRequest]:
        for i, entry in enumerate(self.entries):
            content: Blocks | Synthetic
            if entry.hash_ids:
                content = Blocks(entry.hash_ids, entry.input_length, self.block_size)
            else:
                content = Synthetic((TRACE_PROMPT, i), entry.input_length)
            yield BenchRequest(
                i,
                [("user", content)],
                entry.input_length,
                entry.output_length,
                arrival_s=entry.arrival_ms / 1000,
            )
