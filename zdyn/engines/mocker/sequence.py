"""A request inside the simulated engine, checked as vLLM checks it, and its tokens, fixed by a seed."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import xxhash

from zdyn.engines.base import RequestError
from zdyn.engines.mocker.config import MockerConfig
from zdyn.engines.mocker.kv_transfer import RemotePrefill
from zdyn.protocol import Finish, Generate, TokenIds

SEED_MASK = (1 << 64) - 1


def sample_token(seed: int, index: int, vocab_size: int) -> int:
    """The ``index``-th output token of a request: uniform over the vocabulary, fixed by the seed."""
    return xxhash.xxh3_64_intdigest(index.to_bytes(8, "little"), seed=seed) % vocab_size


class MockSequence:
    """One request inside the simulated engine."""

    __slots__ = (
        "eos_token_id",
        "finish",
        "in_prefill",
        "kv_transfer_params",
        "max_tokens",
        "min_tokens",
        "num_cached_tokens",
        "num_computed",
        "num_transferred_tokens",
        "prompt_len",
        "remote_prefill",
        "request_id",
        "script",
        "seed",
        "stop_token_ids",
        "token_ids",
    )

    def __init__(
        self,
        request_id: str,
        prompt: Sequence[int],
        *,
        max_tokens: int,
        seed: int,
        min_tokens: int = 0,
        stop_token_ids: frozenset[int] = frozenset(),
        eos_token_id: int | None = None,
        kv_transfer_params: dict[str, Any] | None = None,
    ) -> None:
        self.request_id = request_id
        self.token_ids = TokenIds(prompt)  # prompt followed by the output so far (a copy: packed, memcpy-fast)
        self.prompt_len = len(prompt)
        self.max_tokens = max_tokens
        self.min_tokens = min_tokens
        self.stop_token_ids = stop_token_ids
        self.eos_token_id = eos_token_id  # None when ignore_eos
        self.seed = seed & SEED_MASK
        self.num_computed = 0  # tokens whose KV is in the cache
        self.num_cached_tokens = -1  # prefix hit at first admission; -1 until then
        self.in_prefill = True  # (re)computing the context rather than decoding
        self.finish: Finish | None = None
        self.kv_transfer_params = kv_transfer_params  # vLLM KV-connector params, as the request gave them
        self.remote_prefill: RemotePrefill | None = None  # the prompt's KV to pull in before running
        self.num_transferred_tokens = 0  # prompt tokens whose KV came from a prefill worker
        self.script: list[int] | None = None  # the output to give, then EOS (a structured-output request)

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len :].tolist()


def new_sequence(request: Generate, config: MockerConfig) -> MockSequence:
    """Validate a request the way vLLM does and turn it into a sequence; bad ones raise RequestError."""
    prompt, sampling = request.token_ids, request.sampling
    if not prompt:
        raise RequestError("the prompt is empty")
    if len(prompt) > config.max_model_len:
        raise RequestError(
            f"the prompt has {len(prompt)} tokens, more than the maximum model length of {config.max_model_len}"
        )
    packed = isinstance(prompt, TokenIds)  # unsigned: only the top needs checking, at C speed
    if (prompt.max_id() if packed else max(prompt)) >= config.vocab_size or (not packed and min(prompt) < 0):
        bad = next(t for t in prompt if not 0 <= t < config.vocab_size)
        raise RequestError(f"token id {bad} is outside the vocabulary [0, {config.vocab_size})")
    if sampling.max_tokens < 1:
        raise RequestError(f"max_tokens must be at least 1, got {sampling.max_tokens}")
    if len(prompt) + sampling.max_tokens > config.max_model_len:
        raise RequestError(
            f"this model's maximum context length is {config.max_model_len} tokens, but {len(prompt)} prompt "
            f"tokens plus max_tokens {sampling.max_tokens} were requested"
        )
    if not 0 <= sampling.min_tokens <= sampling.max_tokens:
        raise RequestError(f"min_tokens {sampling.min_tokens} must be in [0, max_tokens {sampling.max_tokens}]")
    if sampling.seed is not None:
        seed = sampling.seed
    else:
        seed = xxhash.xxh3_64_intdigest(request.request_id.encode(), seed=config.seed & SEED_MASK)
    return MockSequence(
        request.request_id,
        request.token_ids,
        max_tokens=sampling.max_tokens,
        min_tokens=sampling.min_tokens,
        seed=seed,
        stop_token_ids=frozenset(sampling.stop_token_ids),
        eos_token_id=None if sampling.ignore_eos else config.eos_token_id,
        kv_transfer_params=request.kv_transfer_params,
    )
