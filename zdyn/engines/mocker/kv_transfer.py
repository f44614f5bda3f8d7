"""Disaggregated prefill in the mocker, through the ``kv_transfer_params`` of vLLM's NixlConnector (pull mode).

Prefill side: a request whose params say ``do_remote_decode`` runs as usual (the caller sets max_tokens=1) and
its final delta carries :func:`prefill_result`, the keys vLLM 0.32's NixlConnector returns. Its blocks are freed
(and stay in the prefix cache) when it finishes: real vLLM pins them until the decode side has read them or a
lease runs out, but a simulated decode side reads nothing, so the prefill side cannot know when that happens.

Decode side: a request whose params say ``do_remote_prefill`` allocates its blocks, holds them without running
for the simulated transfer time of the prompt tokens it does not already have in its own prefix cache, and then
counts them as computed except the last prompt token, which is recomputed to sample the first output token
(vLLM's ``_update_waiting_for_remote_kv``). Like vLLM 0.32 it reports the prefill worker's own prefix-cache hit
(``remote_prefill_cached_tokens``) as ``num_cached_tokens``, else local hit plus transferred tokens.
Unusable params make it compute the prompt locally.

Transfer time = tokens × kv_bytes_per_token / (kv_transfer_bandwidth_gbps × 1e9) seconds, Dynamo's formula and
default (64 GB/s). Dynamo's mocker charges it to the prefill worker before its last token; here the decode worker
waits for it, as with NixlConnector's pull, so the prefill worker's output comes as soon as its prefill is done.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeGuard

SIDE_CHANNEL_PORT = 0  # a simulated prefill worker serves no NIXL side channel; the key is there for vLLM's shape


@dataclass(slots=True, frozen=True)
class RemotePrefill:
    """Where a decode request's prompt KV is: the prefill worker's answer, read from ``kv_transfer_params``."""

    engine_id: str
    num_tokens: int  # leading prompt tokens whose KV the prefill worker holds (vLLM's remote_num_tokens)
    cached_tokens: int | None  # the prefill worker's own prefix-cache hit, reported as num_cached_tokens


def wants_remote_prefill(params: dict[str, Any] | None) -> bool:
    return bool(params and params.get("do_remote_prefill"))


def wants_remote_decode(params: dict[str, Any] | None) -> bool:
    return bool(params and params.get("do_remote_decode"))


def parse_remote_prefill(params: dict[str, Any], prompt_len: int) -> RemotePrefill:
    """Read a decode request's params; raise ValueError saying what makes them unusable."""
    engine_id = _get(params, "remote_engine_id", str)
    if not engine_id:
        raise ValueError("remote_engine_id is empty")
    _get(params, "remote_request_id", str)
    _get(params, "remote_host", str)
    _get(params, "remote_port", int)
    _check_block_ids(params.get("remote_block_ids"))
    num_tokens = _get(params, "remote_num_tokens", int)
    if not 0 <= num_tokens <= prompt_len:
        raise ValueError(f"remote_num_tokens {num_tokens} is outside [0, {prompt_len}] (the prompt's length)")
    cached = params.get("remote_prefill_cached_tokens")
    # vLLM's output processor uses this only when it is an int, and ignores it otherwise.
    usable_cached = cached if _is_int(cached) and cached >= 0 else None
    return RemotePrefill(engine_id, num_tokens, usable_cached)


def prefill_result(
    *, engine_id: str, request_id: str, block_ids: list[int], num_tokens: int, cached_tokens: int, host: str
) -> dict[str, Any]:
    """The ``kv_transfer_params`` of a finished prefill, with the keys of vLLM 0.32 NixlConnector's request_finished."""
    return {
        "do_remote_prefill": True,
        "do_remote_decode": False,
        "remote_engine_id": engine_id,
        "remote_request_id": request_id,
        "remote_block_ids": [block_ids],  # one list per KV-cache group, as vLLM sends them
        "remote_host": host,
        "remote_port": SIDE_CHANNEL_PORT,
        "remote_num_tokens": num_tokens,
        "remote_prefill_cached_tokens": cached_tokens,
        "tp_size": 1,
    }


def transfer_ms(num_tokens: int, bytes_per_token: int, bandwidth_gbps: float) -> float:
    """Milliseconds to move the KV of ``num_tokens`` tokens at ``bandwidth_gbps`` GB/s (0: no time), as Dynamo does."""
    if bandwidth_gbps == 0 or num_tokens <= 0:
        return 0.0
    return num_tokens * bytes_per_token / (bandwidth_gbps * 1e9) * 1000


def kv_bytes_per_token(model: dict[str, Any]) -> int | None:
    """K and V of every layer in 16-bit floats: 2 × layers × KV heads × head dim × 2 bytes; None if unknown."""
    layers, heads, hidden = model.get("num_hidden_layers"), model.get("num_attention_heads"), model.get("hidden_size")
    kv_heads = model.get("num_key_value_heads", heads)
    head_dim = model.get("head_dim")
    if head_dim is None and _is_int(hidden) and _is_int(heads) and heads > 0:
        head_dim = hidden // heads
    if not (_is_int(layers) and _is_int(kv_heads) and _is_int(head_dim)) or min(layers, kv_heads, head_dim) <= 0:
        return None
    return 2 * layers * kv_heads * head_dim * 2


def _get(params: dict[str, Any], key: str, kind: type[Any]) -> Any:
    value = params.get(key)
    if value is None:
        raise ValueError(f"{key} is missing")
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ValueError(f"{key} must be a {kind.__name__}, got {value!r}")
    return value


def _check_block_ids(block_ids: Any) -> None:
    """Block ids are a list of ints, or one such list per KV-cache group (what vLLM 0.32 sends)."""
    if block_ids is None:
        raise ValueError("remote_block_ids is missing")
    groups = block_ids if isinstance(block_ids, list) and block_ids and isinstance(block_ids[0], list) else [block_ids]
    for group in groups:
        if not isinstance(group, list) or not all(_is_int(b) and b >= 0 for b in group):
            raise ValueError(f"remote_block_ids must be a list of block ids, or one per KV-cache group: {block_ids!r}")


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)
