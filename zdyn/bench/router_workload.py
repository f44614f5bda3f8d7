"""Deterministic KV-cache workload for the router speed benchmarks (``benchmarks/router_speed*.py``).

Standard library only, so that the same inputs can be replayed into NVIDIA Dynamo's indexer from its own venv
(``benchmarks/router_speed_dynamo.py``). A workload is a population of shared documents (system prompts, few-shot
examples, long RAG contexts) each cached by a random subset of workers with a unique tail per copy, plus unique
sequences per worker, stored as vLLM would report them: BlockStored events of at most one prefill chunk.
"""

from __future__ import annotations

import random
import sys
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field

DOC_TOKENS = (1024, 2048, 4096, 8192, 16384, 32768)
NUM_DOCS = 200
SHARED_FRACTION = 0.6  # of the target blocks, in copies of shared documents
CHUNK_TOKENS = 1024  # tokens per BlockStored event (a prefill chunk)
_M64 = (1 << 64) - 1


def mix64(x: int) -> int:
    """splitmix64's finaliser: distinct inputs give distinct, random-looking 64-bit engine hashes."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


_LOW_BIT = bytes(b & 1 for b in range(256))


def random_tokens(rng: random.Random, n: int) -> array[int]:
    """n random token ids below 2**17 (a 131k vocabulary), made without a Python loop per token."""
    raw = bytearray(rng.randbytes(4 * n))
    raw[2::4] = raw[2::4].translate(_LOW_BIT)
    raw[3::4] = bytes(n)
    tokens = array("I", raw)
    if sys.byteorder == "big":
        tokens.byteswap()
    return tokens


@dataclass(slots=True)
class Stored:
    worker: int
    parent: int | None
    hashes: list[int]
    tokens: list[int]


@dataclass
class Workload:
    num_workers: int
    block_size: int
    target_blocks: int = 1_000_000
    seed: int = 0
    docs: list[array[int]] = field(init=False)
    unique_seqs: list[tuple[int, list[int]]] = field(init=False, default_factory=list)  # (worker, engine hashes)

    def __post_init__(self) -> None:
        rng = random.Random(self.seed)
        self.docs = [random_tokens(rng, rng.choice(DOC_TOKENS)) for _ in range(NUM_DOCS)]

    def stored_events(self) -> Iterator[Stored]:
        """Every BlockStored of the workload, worker by worker, about ``target_blocks`` blocks in all."""
        rng = random.Random(self.seed + 1)
        bs, num_blocks, next_unique = self.block_size, 0, 1 << 62
        holders = [rng.sample(range(self.num_workers), self.num_workers) for _ in self.docs]
        shared_target = int(self.target_blocks * SHARED_FRACTION)
        order = list(range(len(self.docs)))
        while num_blocks < shared_target and any(holders):
            rng.shuffle(order)
            for d in order:
                if not holders[d] or num_blocks >= shared_target:
                    continue
                worker, doc = holders[d].pop(), self.docs[d]
                hashes = [mix64((d << 32) | i) for i in range(len(doc) // bs)]
                yield from self._chunks(worker, None, hashes, doc)
                tail = [mix64(next_unique + i) for i in range(rng.randint(1, 32))]
                next_unique += len(tail)
                yield from self._chunks(worker, hashes[-1], tail, random_tokens(rng, len(tail) * bs))
                num_blocks += len(hashes) + len(tail)
        worker = 0
        while num_blocks < self.target_blocks:
            n = min(rng.randint(16, 256), self.target_blocks - num_blocks)
            hashes = [mix64(next_unique + i) for i in range(n)]
            next_unique += n
            if len(self.unique_seqs) < 20_000:
                self.unique_seqs.append((worker, hashes))
            yield from self._chunks(worker, None, hashes, random_tokens(rng, n * bs))
            num_blocks += n
            worker = (worker + 1) % self.num_workers

    def prompts(self, num_tokens: int, count: int, seed: int = 0) -> list[list[int]]:
        """Requests of ``num_tokens`` tokens: 50-90 % a document's prefix (as long as it has), then new tokens."""
        rng = random.Random(seed)
        out = []
        for _ in range(count):
            doc = rng.choice([d for d in self.docs if len(d) >= num_tokens // 2] or self.docs)
            shared = min(len(doc), int(num_tokens * rng.uniform(0.5, 0.9)))
            out.append(doc[:shared].tolist() + random_tokens(rng, num_tokens - shared).tolist())
        return out

    def fresh_sequences(self, num_blocks: int, seed: int) -> list[Stored]:
        """New unique sequences (not in ``stored_events``) on random workers, for event-rate runs."""
        rng = random.Random(seed)
        out: list[Stored] = []
        base = (1 << 63) + seed * (1 << 40)
        while num_blocks > 0:
            n = min(rng.randint(16, 128), num_blocks)
            hashes = [mix64(base + i) for i in range(n)]
            base += n
            out.extend(
                self._chunks(rng.randrange(self.num_workers), None, hashes, random_tokens(rng, n * self.block_size))
            )
            num_blocks -= n
        return out

    def _chunks(self, worker: int, parent: int | None, hashes: list[int], tokens: array[int]) -> Iterator[Stored]:
        bs, per_event = self.block_size, max(1, CHUNK_TOKENS // self.block_size)
        for i in range(0, len(hashes), per_event):
            part = hashes[i : i + per_event]
            yield Stored(worker, parent, part, tokens[i * bs : (i + len(part)) * bs].tolist())
            parent = part[-1]
