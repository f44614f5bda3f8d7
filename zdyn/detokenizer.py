"""Incremental detokenization with stop strings, for one output sequence. No IO."""

from __future__ import annotations

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream


class Detokenizer:
    """Turns streamed token ids into text pieces.

    Pieces never end inside a multi-byte character (tokenizers' DecodeStream waits for the rest) and,
    joined, equal ``tokenizer.decode(all ids)``: ``finish()`` flushes whatever the stream held back.
    Text that could be the start of a stop string is held back until it is known not to be one; when a
    stop string appears the output is cut there and ``stop`` names the string.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        stop: list[str] | None = None,
        include_stop_str_in_output: bool = False,
        skip_special_tokens: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.stops = [s for s in (stop or []) if s]
        self.include_stop = include_stop_str_in_output
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = []
        self.text = ""  # everything decoded so far
        self.emitted = 0  # characters of ``text`` already handed out
        self.stop: str | None = None  # the stop string that ended the output
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        self._scan_from = 0

    def step(self, token_ids: list[int]) -> str:
        """Add tokens; return the text that is now safe to emit (may be empty)."""
        if self.stop is not None:
            return ""
        for token_id in token_ids:
            self.token_ids.append(token_id)
            piece = self._stream.step(self.tokenizer, token_id)
            if piece:
                self.text += piece
        return self._release(final=False)

    def finish(self) -> str:
        """The output ended: return the rest, including bytes the stream was still holding."""
        if self.stop is not None:
            return ""
        full = self.tokenizer.decode(self.token_ids, skip_special_tokens=self.skip_special_tokens)
        if full.startswith(self.text):
            self.text = full
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stops and self._find_stop():
            return self._take(len(self.text))
        hold = 0 if final or not self.stops else self._partial_stop_suffix()
        return self._take(len(self.text) - hold)

    def _find_stop(self) -> bool:
        """Cut ``text`` at the earliest stop string; True if one was found."""
        longest = max(len(s) for s in self.stops)
        start = max(0, self._scan_from - longest + 1)
        found: tuple[int, str] | None = None
        for s in self.stops:
            i = self.text.find(s, start)
            if i != -1 and (found is None or i < found[0]):
                found = (i, s)
        self._scan_from = len(self.text)
        if found is None:
            return False
        i, s = found
        self.text = self.text[: i + len(s) if self.include_stop else i]
        self.stop = s
        return True

    def _partial_stop_suffix(self) -> int:
        """Length of the longest tail of ``text`` that begins some stop string."""
        for k in range(min(len(self.text), max(len(s) for s in self.stops) - 1), 0, -1):
            tail = self.text[-k:]
            if any(s.startswith(tail) for s in self.stops):
                return k
        return 0

    def _take(self, end: int) -> str:
        end = max(end, self.emitted)
        piece = self.text[self.emitted : end]
        self.emitted = end
        return piece
