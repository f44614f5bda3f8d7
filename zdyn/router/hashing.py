"""The router's own chained block hash, computed from token ids (never the engine's hash).

``h_i = xxh3_64(tokens of block i as little-endian uint32, seed=h_{i-1})`` with ``h_{-1}`` a fixed root seed,
mixed with the LoRA name when there is one. vLLM's published block hashes depend on its hash algorithm, seed and
version, so the router indexes these instead and maps engine hashes onto them (see ``indexer.py``).
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Sequence

import xxhash

from zdyn.protocol import TokenIds

ROOT_SEED = 0x7A64796E_726F7574  # b"zdynrout"
_xxh3 = xxhash.xxh3_64_intdigest
_U32 = next(code for code in "IL" if array(code).itemsize == 4)
_SWAP = sys.byteorder == "big"


def root_seed(lora_name: str | None = None) -> int:
    """The seed of a chain's first block: fixed, or derived from the LoRA name."""
    return ROOT_SEED if lora_name is None else _xxh3(lora_name.encode(), ROOT_SEED)


def hash_blocks(
    token_ids: Sequence[int], block_size: int, lora_name: str | None = None, parent: int | None = None
) -> list[int]:
    """Router hashes of the full blocks of ``token_ids`` (a partial trailing block is ignored).

    ``parent`` continues a chain: when ``a`` is whole blocks,
    ``hash_blocks(b, n, parent=hash_blocks(a, n)[-1]) == hash_blocks(a + b, n)[len(a) // n:]``.
    The LoRA name only seeds a chain's root, so it is ignored when ``parent`` is given.
    """
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    num_tokens = len(token_ids) - len(token_ids) % block_size
    if num_tokens == 0:
        return []
    if isinstance(token_ids, TokenIds):  # already packed: hash its bytes, no copy
        return _chain(
            token_ids.packed(), num_tokens * 4, block_size * 4, root_seed(lora_name) if parent is None else parent
        )
    if isinstance(token_ids, list):
        tokens = array(_U32)
        tokens.fromlist(token_ids)  # faster than array(code, list)
        del tokens[num_tokens:]
    else:
        tokens = array(_U32, token_ids[:num_tokens])
    if _SWAP:
        tokens.byteswap()
    return _chain(tokens.tobytes(), num_tokens * 4, block_size * 4, root_seed(lora_name) if parent is None else parent)


def _chain(data: bytes, end: int, step: int, h: int) -> list[int]:
    """The chained hashes of ``data[:end]`` in ``step``-byte blocks, starting from seed ``h``."""
    view = memoryview(data)
    out: list[int] = []
    append = out.append
    for start in range(0, end, step):
        h = _xxh3(view[start : start + step], h)
        append(h)
    return out
