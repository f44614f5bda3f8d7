"""Synthetic token content: deterministic token ids per key, and text that re-tokenizes to the same ids.

Prompts are drawn from a pool of "word" tokens (a leading space plus letters) that survive a
decode -> encode round trip in context. Joining their strings gives text whose tokenization is exactly
the drawn ids for the usual BPE and SentencePiece tokenizers, so a prompt of n drawn ids is n tokens
long and equal keys give equal tokens in text and token-id prompts alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from zdyn.bench.records import Blocks, Content, Synthetic

_MASK = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_MIN_POOL = 64
_MAX_FIT_ROUNDS = 8
_BLOCK_DOMAIN = 1
_PROBE_KEY = 0x5EED


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A local Hugging Face tokenizer folder (or a tokenizer.json file); never reaches the hub."""
    path = Path(path)
    file = path if path.is_file() else path / "tokenizer.json"
    if file.is_file():
        return Tokenizer.from_file(str(file))
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer folder {path} does not exist")
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    backend = getattr(hf, "backend_tokenizer", None)
    if not isinstance(backend, Tokenizer):
        raise ValueError(f"{path}: no fast tokenizer (tokenizer.json) could be built")
    return backend


def _mix(x: int) -> int:
    x &= _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def _mix_array(x: np.ndarray) -> np.ndarray:
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    mixed: np.ndarray = x ^ (x >> np.uint64(31))
    return mixed


def stream_key(*parts: int) -> int:
    """64-bit key of a tuple of integers (splitmix64 chaining)."""
    h = 0
    for part in parts:
        h = _mix((h ^ (part & _MASK)) + _GOLDEN)
    return h


def draw(key: int, n: int, modulo: int) -> np.ndarray:
    """n pseudo-random integers in [0, modulo) from a counter-based stream: a function of (key, position)."""
    counters = np.arange(n, dtype=np.uint64) * np.uint64(_GOLDEN) + np.uint64(key)
    values: np.ndarray = (_mix_array(counters) % np.uint64(modulo)).astype(np.int64)
    return values


def word_pool(tokenizer: Tokenizer) -> tuple[list[int], list[str]]:
    """Token ids that decode to ' <letters>' and re-encode to themselves after any other word."""
    special = set(tokenizer.get_added_tokens_decoder())
    candidates = [t for t in range(tokenizer.get_vocab_size()) if t not in special]
    decoded = tokenizer.decode_batch([[t] for t in candidates])
    ids: list[int] = []
    words: list[str] = []
    for t, s in zip(candidates, decoded, strict=True):
        word = s.strip()
        if 2 <= len(word) <= 16 and word.isascii() and word.isalpha():
            ids.append(t)
            words.append(" " + word)
    anchor = tokenizer.encode("x", add_special_tokens=False).ids
    encoded = tokenizer.encode_batch(["x" + w for w in words], add_special_tokens=False)
    keep = [i for i, enc in enumerate(encoded) if enc.ids == [*anchor, ids[i]]]
    return [ids[i] for i in keep], [words[i] for i in keep]


@dataclass(slots=True, frozen=True)
class Vocab:
    """The token ids prompts are drawn from, with their text when joining texts is exact."""

    pool: np.ndarray
    words: dict[int, str]
    exact: bool

    @classmethod
    def build(cls, tokenizer: Tokenizer) -> Vocab:
        pool, words = word_pool(tokenizer)
        if len(pool) >= _MIN_POOL:
            vocab = cls(np.asarray(pool, dtype=np.int64), dict(zip(pool, words, strict=True)), True)
            probe = vocab.pool[draw(_PROBE_KEY, 256, len(pool))].tolist()
            text = "".join(vocab.words[t] for t in probe)
            if tokenizer.encode(text, add_special_tokens=False).ids == probe:
                return vocab
        special = set(tokenizer.get_added_tokens_decoder())
        ordinary = [t for t in range(tokenizer.get_vocab_size()) if t not in special]
        return cls(np.asarray(ordinary, dtype=np.int64), {}, False)


class TokenSynth:
    """Deterministic synthetic tokens and their text, for one tokenizer, seed and salt.

    The seed fixes everything; the salt changes content only, so two sweep points can send prompts of
    identical lengths that share no prefix.
    """

    def __init__(self, tokenizer: Tokenizer, seed: int = 0, salt: int = 0, *, vocab: Vocab | None = None) -> None:
        self.tokenizer = tokenizer
        self.seed = seed
        self.salt = salt
        self.vocab = vocab or Vocab.build(tokenizer)

    @property
    def exact(self) -> bool:
        """Whether ``text(ids)`` re-tokenizes to exactly ``ids``."""
        return self.vocab.exact

    def with_salt(self, salt: int) -> TokenSynth:
        return TokenSynth(self.tokenizer, self.seed, salt, vocab=self.vocab)

    def ids(self, key: tuple[int, ...], n: int) -> list[int]:
        """n token ids determined by (seed, salt, *key)."""
        pool = self.vocab.pool
        ids: list[int] = pool[draw(stream_key(self.seed, self.salt, *key), n, len(pool))].tolist()
        return ids

    def block(self, hash_id: int, n: int, block_size: int) -> list[int]:
        """The first n tokens of the block a trace hash id stands for."""
        return self.ids((_BLOCK_DOMAIN, block_size, hash_id), block_size)[:n]

    def blocks(self, blocks: Blocks) -> list[int]:
        out: list[int] = []
        remaining = blocks.num_tokens
        for hash_id in blocks.hash_ids:
            take = min(blocks.block_size, remaining)
            out += self.block(hash_id, take, blocks.block_size)
            remaining -= take
        return out

    def materialize(self, content: Content) -> list[int]:
        if isinstance(content, Blocks):
            return self.blocks(content)
        if isinstance(content, Synthetic):
            return self.fitted_ids(content.key, content.num_tokens)
        return content

    def text(self, ids: Sequence[int]) -> str:
        if self.vocab.exact:
            try:
                return "".join([self.vocab.words[t] for t in ids])
            except KeyError:
                pass
        return self.tokenizer.decode(list(ids))

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def fitted_ids(self, key: tuple[int, ...], n: int) -> list[int]:
        """Like ``ids`` but, for tokenizers without an exact pool, resized in proportion until the text
        re-tokenizes to n tokens (a few rounds, then the closest result)."""
        ids = self.ids(key, n)
        if self.vocab.exact or n == 0:
            return ids
        best, best_error = ids, n
        for round_no in range(_MAX_FIT_ROUNDS):
            got = len(self.encode(self.text(ids)))
            if abs(got - n) < best_error:
                best, best_error = ids, abs(got - n)
            if got == n:
                break
            size = max(1, round(len(ids) * n / got)) if got else len(ids) + 1
            if size == len(ids):
                size += 1 if got < n else -1
            extra = self.ids((*key, 1 + round_no), size - len(ids)) if size > len(ids) else []
            ids = ids[:size] + extra
        return best
