"""Parsing request traces (Mooncake JSONL, Azure LLM inference CSV) with a policy for malformed lines."""

from __future__ import annotations

import csv
import json
import logging
import math
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

log = logging.getLogger("zdyn.bench")

BadLinePolicy = Literal["skip", "stop"]
MOONCAKE_BLOCK_SIZE = 512
AZURE_HEADER = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
_MAX_LOGGED_BAD_LINES = 10


class BadLineError(ValueError):
    """A malformed trace line; carries its 1-based line number."""

    def __init__(self, path: str, line_no: int, reason: str) -> None:
        super().__init__(f"{path}:{line_no}: {reason}")
        self.path = path
        self.line_no = line_no
        self.reason = reason


@dataclass(slots=True, frozen=True)
class TraceEntry:
    arrival_ms: float
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...] = ()


@dataclass(slots=True)
class TraceLoad:
    """Parsed entries, arrival times relative to the first entry, plus the skipped lines."""

    entries: list[TraceEntry] = field(default_factory=list)
    bad_lines: list[tuple[int, str]] = field(default_factory=list)


def _positive_int(obj: dict[str, Any], key: str) -> int:
    value = obj.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{key!r} must be a positive integer, got {value!r}")
    return value


def parse_mooncake_line(text: str, block_size: int = MOONCAKE_BLOCK_SIZE) -> TraceEntry:
    """One JSONL line -> entry; raises ValueError with the reason when malformed."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid JSON ({e.msg})") from None
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    timestamp = obj.get("timestamp")
    if isinstance(timestamp, bool) or not isinstance(timestamp, int | float) or not timestamp >= 0:
        raise ValueError(f"'timestamp' must be a non-negative number of ms, got {timestamp!r}")
    input_length = _positive_int(obj, "input_length")
    output_length = _positive_int(obj, "output_length")
    hash_ids = obj.get("hash_ids")
    if not isinstance(hash_ids, list) or not all(
        isinstance(h, int) and not isinstance(h, bool) and h >= 0 for h in hash_ids
    ):
        raise ValueError("'hash_ids' must be a list of non-negative integers")
    expected = math.ceil(input_length / block_size)
    if len(hash_ids) != expected:
        raise ValueError(
            f"{len(hash_ids)} hash_ids for input_length {input_length}, expected {expected} "
            f"(blocks of {block_size} tokens)"
        )
    return TraceEntry(float(timestamp), input_length, output_length, tuple(hash_ids))


def parse_azure_row(row: list[str]) -> tuple[datetime, int, int]:
    """``[TIMESTAMP, ContextTokens, GeneratedTokens]`` -> (time, input, output); ValueError when malformed."""
    if len(row) != 3:
        raise ValueError(f"expected 3 fields, got {len(row)}")
    try:
        # fromisoformat (3.11+) accepts the trace's 7 fractional digits; strptime's %f does not.
        when = datetime.fromisoformat(row[0].strip())
    except ValueError:
        raise ValueError(f"bad TIMESTAMP {row[0]!r}") from None
    lengths = []
    for name, value in zip(AZURE_HEADER[1:], row[1:], strict=True):
        try:
            n = int(value)
        except ValueError:
            raise ValueError(f"{name} {value!r} is not an integer") from None
        if n < 1:
            raise ValueError(f"{name} must be positive, got {n}")
        lengths.append(n)
    return when, lengths[0], lengths[1]


class _BadLines:
    def __init__(self, path: str, policy: BadLinePolicy) -> None:
        if policy not in ("skip", "stop"):
            raise ValueError(f"on_bad_line must be 'skip' or 'stop', got {policy!r}")
        self.path = path
        self.policy = policy
        self.lines: list[tuple[int, str]] = []

    def report(self, line_no: int, reason: str) -> None:
        if self.policy == "stop":
            raise BadLineError(self.path, line_no, reason)
        self.lines.append((line_no, reason))
        if len(self.lines) <= _MAX_LOGGED_BAD_LINES:
            log.warning("skipping malformed line %s:%d: %s", self.path, line_no, reason)

    def finish(self) -> list[tuple[int, str]]:
        if self.lines:
            log.warning("%s: skipped %d malformed line(s)", self.path, len(self.lines))
        return self.lines


def _rebase(entries: list[TraceEntry]) -> list[TraceEntry]:
    if not entries:
        return entries
    origin = min(e.arrival_ms for e in entries)
    rebased = [TraceEntry(e.arrival_ms - origin, e.input_length, e.output_length, e.hash_ids) for e in entries]
    return sorted(rebased, key=lambda e: e.arrival_ms)


def load_mooncake(
    path: str | Path,
    *,
    block_size: int = MOONCAKE_BLOCK_SIZE,
    on_bad_line: BadLinePolicy = "stop",
    limit: int | None = None,
) -> TraceLoad:
    """Read a Mooncake JSONL trace (at most ``limit`` good entries); blank lines are ignored."""
    bad = _BadLines(str(path), on_bad_line)
    entries: list[TraceEntry] = []
    with open(path, encoding="utf-8") as f:
        for line_no, text in enumerate(f, start=1):
            if limit is not None and len(entries) >= limit:
                break
            if not text.strip():
                continue
            try:
                entries.append(parse_mooncake_line(text, block_size))
            except ValueError as e:
                bad.report(line_no, str(e))
    return TraceLoad(_rebase(entries), bad.finish())


def load_azure(path: str | Path, *, on_bad_line: BadLinePolicy = "stop", limit: int | None = None) -> TraceLoad:
    """Read an Azure LLM inference trace CSV (``TIMESTAMP,ContextTokens,GeneratedTokens``)."""
    bad = _BadLines(str(path), on_bad_line)
    rows: list[tuple[datetime, int, int]] = []
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or tuple(h.strip() for h in header) != AZURE_HEADER:
            raise BadLineError(str(path), 1, f"expected header {','.join(AZURE_HEADER)}, got {header!r}")
        for row in reader:
            if limit is not None and len(rows) >= limit:
                break
            if not row or not "".join(row).strip():
                continue
            try:
                rows.append(parse_azure_row(row))
            except ValueError as e:
                bad.report(reader.line_num, str(e))
    if not rows:
        return TraceLoad([], bad.finish())
    origin = rows[0][0]
    entries = [TraceEntry((when - origin).total_seconds() * 1000.0, isl, osl) for when, isl, osl in rows]
    return TraceLoad(_rebase(entries), bad.finish())
