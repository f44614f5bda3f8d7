"""Prompt text to token ids: the model's Rust tokenizer, or the same byte-level BPE through tiktoken.

At 4k-16k-token prompts tokenization is most of a frontend's CPU (~1.2 µs per token in Hugging Face's tokenizer).
tiktoken implements byte-level BPE 4-7x faster. Its algorithm (merge the adjacent pair whose concatenation has the
lowest rank) is Hugging Face's (merge the pair that comes first in the merge list) when every merge makes a new
token and the tokens are numbered in merge order, so the fast path is taken only for a ``tokenizer.json`` of
exactly that shape:

- model BPE without byte fallback, dropout or word prefixes/suffixes; no normalizer;
- pre-tokenizer ByteLevel with its regex (GPT-2's pattern), or a regex Split (isolated) then ByteLevel without one;
- all 256 bytes in the vocabulary, merge results strictly increasing in id (so rank order = merge order);
- added tokens without lstrip/rstrip/single-word (they are split out of the text first, as tiktoken's specials are).

And it stays checked, since the two regex engines could still differ on some text: a built-in corpus must encode
identically at start-up, then the first ``VERIFY_FIRST`` prompts and one in ``VERIFY_EVERY`` afterwards are encoded
by both. On any difference the fast path is turned off for good (an ERROR, ``mismatches`` counted) and that prompt
gets Hugging Face's ids, so a difference can cost CPU, never a wrong token.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import threading
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector
from tokenizers import Tokenizer

log = logging.getLogger(__name__)

VERIFY_FIRST = 4  # (each costs a Rust encode too: at 16k tokens ~15 ms)
VERIFY_EVERY = 256
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
SELF_TEST = [
    "Hello, world! It's 2026; the answer is 42.\n\n  Indented    spaces\tand\ttabs   \n",
    "Ünïcödé, 日本語のテキスト, emoji 🚀🎉, Zero\u200bwidth, Ελληνικά, русский текст, عربى.",
    'def f(x: int) -> dict[str, list[int]]:\n    return {"a": [x ** 2, 0x1F, 3.14e-5]}  # comment\n',
    "I'll say they've done it; we'd've known. DON'T SHOUT. 1234567890 1,000,000.00 $5 50% a.b.c",
    "   leading and trailing   ",
    "\n\n\n\r\n\t \u00a0\u3000 mixed whitespace",
]


@functools.cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2's map from the printable characters a byte-level vocabulary is written in back to bytes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def missing_bytes(spec: dict[str, Any]) -> list[int]:
    """Bytes of UTF-8 text (not C0, C1, F5-FF, which never occur) that are not tokens of this vocabulary."""
    decode = _byte_decoder()
    have = {decode[token] for token in spec["model"]["vocab"] if len(token) == 1 and token in decode}
    return [b for b in range(256) if b not in have and b not in (0xC0, 0xC1) and b < 0xF5]


def unencodable(missing: list[int]) -> re.Pattern[str] | None:
    """The characters whose UTF-8 holds a missing byte (a control character, or a range that a missing lead byte
    starts); the Rust tokenizer drops them, where tiktoken cannot encode them, so such prompts go to the former."""
    ranges = []
    for b in missing:
        if b < 0x80:
            ranges.append((b, b))
        else:  # a lead byte: the code points it starts
            low, width = (
                ((b & 0x1F) << 6, 6) if b < 0xE0 else ((b & 0x0F) << 12, 12) if b < 0xF0 else ((b & 7) << 18, 18)
            )
            ranges.append((low, low + (1 << width) - 1))
    if not ranges:
        return None
    return re.compile("[" + "".join(f"{re.escape(chr(a))}-{re.escape(chr(z))}" for a, z in ranges) + "]")


def tiktoken_encoding(spec: dict[str, Any]) -> Any | None:
    """A ``tiktoken.Encoding`` equal to this ``tokenizer.json``'s encoding, or None if its shape is not one tiktoken
    implements (the reason is logged)."""
    reason = _unsupported(spec)
    if reason:
        log.info("prompts tokenize with the Rust tokenizer (tiktoken's BPE does not apply: %s)", reason)
        return None
    try:
        import tiktoken
    except ImportError:
        log.info("prompts tokenize with the Rust tokenizer (tiktoken is not installed)")
        return None
    decode = _byte_decoder()
    added = {t["content"]: t["id"] for t in spec["added_tokens"]}
    vocab: dict[str, int] = spec["model"]["vocab"]
    ranks = {bytes(decode[c] for c in token): rank for token, rank in vocab.items() if token not in added}
    return tiktoken.Encoding(name="zdyn-bpe", pat_str=_pattern(spec["pre_tokenizer"]), mergeable_ranks=ranks,
                             special_tokens=added)  # fmt: skip


def _pattern(pre: dict[str, Any]) -> str:
    if pre["type"] == "ByteLevel":
        return GPT2_PATTERN
    return str(pre["pretokenizers"][0]["pattern"]["Regex"])


def _unsupported(spec: dict[str, Any]) -> str:
    """Why this tokenizer is not a plain byte-level BPE (empty if it is)."""
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        return f"a {model.get('type')} model"
    if (
        model.get("byte_fallback")
        or model.get("dropout")
        or model.get("continuing_subword_prefix")
        or model.get("end_of_word_suffix")
    ):
        return "byte fallback, dropout or word prefixes"
    if spec.get("normalizer"):
        return "a normalizer"
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel":
        if pre.get("add_prefix_space") or not pre.get("use_regex", True):
            return "a ByteLevel pre-tokenizer with a prefix space or without its regex"
    elif pre.get("type") == "Sequence":
        steps = pre.get("pretokenizers") or []
        if len(steps) != 2 or steps[0].get("type") != "Split" or steps[1].get("type") != "ByteLevel":
            return "a pre-tokenizer other than a Split then ByteLevel"
        split, level = steps
        if "Regex" not in split.get("pattern", {}) or split.get("behavior") != "Isolated" or split.get("invert"):
            return "a Split that is not an isolated regex"
        if level.get("use_regex") or level.get("add_prefix_space"):
            return "a second regex in ByteLevel"
    else:
        return f"a {pre.get('type')} pre-tokenizer"
    decode = _byte_decoder()
    vocab: dict[str, int] = model.get("vocab") or {}
    if any(c not in decode for token in vocab for c in token):
        return "a vocabulary not written in GPT-2's byte alphabet"
    if any(0x80 <= b < 0xC0 for b in missing_bytes(spec)):
        return "a vocabulary without some UTF-8 continuation bytes"
    merges = [m.split(" ") if isinstance(m, str) else m for m in model.get("merges") or []]
    made = [vocab.get(a + b, -1) for a, b in merges]
    if any(x < 0 for x in made) or any(x >= y for x, y in zip(made, made[1:], strict=False)):
        return "merge results not numbered in merge order"
    if any(t.get("lstrip") or t.get("rstrip") or t.get("single_word") for t in spec.get("added_tokens") or []):
        return "added tokens that strip or match whole words"
    return ""


class PromptEncoder:
    """``encode(text, add_special_tokens)`` -> ids, thread-safe; tiktoken when it is the same tokenizer."""

    def __init__(self, backend: Tokenizer, spec: dict[str, Any] | None = None, *, fast: bool = True) -> None:
        self.backend = backend
        spec = spec or json.loads(backend.to_str())  # the tokenizer as loaded, which tiktoken must equal
        self.fast = tiktoken_encoding(spec) if fast else None
        self._unencodable = unencodable(missing_bytes(spec)) if self.fast is not None else None
        self.num_fast = 0  # prompts encoded by tiktoken
        self.num_rust = 0  # prompts encoded by the Rust tokenizer alone
        self.num_verified = 0  # of those, encoded by both and compared
        self.mismatches = 0
        self._lock = threading.Lock()
        self._prefix: list[int] = []
        self._suffix: list[int] = []
        if self.fast is not None and not self._self_test():
            self.fast = None
        if self.fast is not None:
            log.info("prompts tokenize with tiktoken's byte-level BPE (checked against the Rust tokenizer)")

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        ids = self.fast_ids(text)
        if ids is None:
            with self._lock:
                self.num_rust += 1
            return self._slow(text, add_special_tokens)
        with self._lock:
            self.num_fast += 1
            verify = self.num_fast <= VERIFY_FIRST or self.num_fast % VERIFY_EVERY == 0
        if add_special_tokens:
            ids = self._prefix + ids + self._suffix
        if verify:
            reference = self._slow(text, add_special_tokens)
            with self._lock:
                self.num_verified += 1
            if ids != reference:
                self._disable(len(text), ids, reference)
                return reference
        return ids

    def fast_ids(self, text: str) -> list[int] | None:
        """tiktoken's ids for ``text`` (no special tokens added), or None where the Rust tokenizer must encode it."""
        if self.fast is None or (self._unencodable is not None and self._unencodable.search(text)):
            return None
        try:
            ids: list[int] = self.fast.encode(text, allowed_special="all")
        except Exception as e:  # whatever tiktoken refuses, the Rust tokenizer encodes
            log.warning("tiktoken could not encode a prompt (%s); the Rust tokenizer did", e)
            return None
        return ids

    def _slow(self, text: str, add_special_tokens: bool) -> list[int]:
        """The Rust tokenizer: its batch call without offsets is its fastest, and it releases the GIL."""
        [encoding] = self.backend.encode_batch_fast([text], add_special_tokens=add_special_tokens)
        ids: list[int] = encoding.ids
        return ids

    def _self_test(self) -> bool:
        """Find the special tokens the post-processor adds around a prompt, and compare on the built-in corpus."""
        assert self.fast is not None
        plain, marked = self._slow("a", False), self._slow("a", True)
        at = next((i for i in range(len(marked)) if marked[i : i + len(plain)] == plain), None)
        if at is None:
            log.info("prompts tokenize with the Rust tokenizer (its post-processor does not just add tokens)")
            return False
        self._prefix, self._suffix = marked[:at], marked[at + len(plain) :]
        added = [t.content for t in self.backend.get_added_tokens_decoder().values()]
        for text in [*SELF_TEST, "".join(SELF_TEST), "".join(f"{t}x {t} \n" for t in added)]:
            fast = self.fast_ids(text)
            for special in (False, True):
                if fast is None or self._prefix * special + fast + self._suffix * special != self._slow(text, special):
                    log.info("prompts tokenize with the Rust tokenizer (tiktoken's BPE differs on %r)", text[:40])
                    return False
        return True

    def _disable(self, chars: int, fast: list[int], reference: list[int]) -> None:
        pairs = enumerate(zip(fast, reference, strict=False))
        at = next((i for i, (a, b) in pairs if a != b), min(len(fast), len(reference)))
        with self._lock:
            self.mismatches += 1
            self.fast = None
        log.error("tiktoken's BPE and the Rust tokenizer differ on a %d-character prompt (token %d: %s vs %s); "
                  "prompts tokenize with the Rust tokenizer from now on", chars, at, fast[at : at + 3],
                  reference[at : at + 3])  # fmt: skip


class PromptEncoderCollector(Collector):
    """``zdyn_prompts_encoded_total{role, by}`` and ``zdyn_prompt_encoder_mismatches_total{role}``."""

    def __init__(self, encoder: PromptEncoder, role: str) -> None:
        self.encoder = encoder
        self.role = role

    def collect(self) -> Iterator[CounterMetricFamily]:
        encoded = CounterMetricFamily(
            "zdyn_prompts_encoded",
            "Prompts tokenized, by tiktoken's BPE or the Rust tokenizer alone; 'verified': tiktoken's, also "
            "encoded by the Rust tokenizer and compared",
            labels=["role", "by"],
        )
        e = self.encoder
        for by, n in (("tiktoken", e.num_fast), ("rust", e.num_rust), ("verified", e.num_verified)):
            encoded.add_metric([self.role, by], n)
        yield encoded
        mismatches = CounterMetricFamily(
            "zdyn_prompt_encoder_mismatches", "tiktoken's ids differed (its fast path is then off)", labels=["role"]
        )
        mismatches.add_metric([self.role], e.mismatches)
        yield mismatches
