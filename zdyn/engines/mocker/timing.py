"""How long a simulated engine step takes, from what the step computes."""

from __future__ import annotations

import json
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol


@dataclass(slots=True, frozen=True)
class StepComposition:
    """What one engine step computes."""

    prefill_tokens: tuple[int, ...] = ()  # new (uncached) tokens of each prefill chunk
    prefill_context: tuple[int, ...] = ()  # tokens already in the KV cache before each chunk
    decode_context: tuple[int, ...] = ()  # context length of each decoding request
    kv_usage: float = 0.0  # fraction of KV blocks in use

    @property
    def num_decode(self) -> int:
        return len(self.decode_context)

    @property
    def is_empty(self) -> bool:
        return not self.prefill_tokens and not self.decode_context


class TimingModel(Protocol):
    def __call__(self, step: StepComposition) -> float:
        """Duration of the step in milliseconds (before any speed-up)."""
        ...


@dataclass(slots=True, frozen=True)
class PolynomialTiming:
    """Dynamo mocker's default model: quadratic prefill cost per chunk plus a decode cost rising with KV usage."""

    prefill_coeffs: tuple[float, float, float] = (1.25e-6, 7.41e-2, 26.2)  # a·t² + b·t + c, t = new tokens
    decode_coeffs: tuple[float, float, float] = (-5.47, 43.88, 19.44)  # a·p² + b·p + c, p = KV usage

    def prefill_ms(self, num_tokens: int) -> float:
        a, b, c = self.prefill_coeffs
        return a * num_tokens * num_tokens + b * num_tokens + c

    def decode_ms(self, kv_usage: float) -> float:
        a, b, c = self.decode_coeffs
        return a * kv_usage * kv_usage + b * kv_usage + c

    def __call__(self, step: StepComposition) -> float:
        total = sum(self.prefill_ms(t) for t in step.prefill_tokens)
        if step.decode_context:
            total += self.decode_ms(step.kv_usage)
        return total


def _check_axis(name: str, values: Sequence[float]) -> list[float]:
    axis = [float(v) for v in values]
    if not axis:
        raise ValueError(f"{name} needs at least one point")
    if any(b <= a for a, b in zip(axis, axis[1:], strict=False)):
        raise ValueError(f"{name} must be strictly increasing")
    return axis


def _segment(axis: list[float], x: float) -> tuple[int, float]:
    """Index i and weight w so that x ≈ axis[i]·(1−w) + axis[i+1]·w (w may leave [0, 1] to extrapolate)."""
    if len(axis) == 1:
        return 0, 0.0
    i = min(max(bisect_right(axis, x) - 1, 0), len(axis) - 2)
    return i, (x - axis[i]) / (axis[i + 1] - axis[i])


class InterpolatedTiming:
    """Timings interpolated from profiled points, e.g. measured on a real GPU.

    Prefill: milliseconds of one forward pass vs its total new tokens (linear, extrapolated beyond the
    ends). Decode: milliseconds of one step vs (number of decoding requests, mean context length),
    bilinear and clamped to the grid. Both costs are added when a step mixes them.
    """

    def __init__(
        self,
        prefill_tokens: Sequence[float],
        prefill_ms: Sequence[float],
        decode_batch: Sequence[float],
        decode_context: Sequence[float],
        decode_ms: Sequence[Sequence[float]],
    ) -> None:
        self._prefill_x = _check_axis("prefill_tokens", prefill_tokens)
        self._prefill_y = [float(v) for v in prefill_ms]
        if len(self._prefill_y) != len(self._prefill_x):
            raise ValueError(f"prefill_ms has {len(self._prefill_y)} points, prefill_tokens {len(self._prefill_x)}")
        self._batch = _check_axis("decode_batch", decode_batch)
        self._context = _check_axis("decode_context", decode_context)
        self._decode = [[float(v) for v in row] for row in decode_ms]
        if len(self._decode) != len(self._batch) or any(len(r) != len(self._context) for r in self._decode):
            raise ValueError(f"decode_ms must be a {len(self._batch)}×{len(self._context)} grid (batch × context)")

    @classmethod
    def from_file(cls, path: str | Path) -> InterpolatedTiming:
        """Load ``.json`` or ``.npz`` with keys prefill_tokens, prefill_ms, decode_batch, decode_context, decode_ms."""
        path = Path(path)
        data: dict[str, Any]
        if path.suffix == ".npz":
            import numpy as np  # only needed for this format

            with np.load(path) as npz:
                data = {key: npz[key].tolist() for key in npz.files}
        else:
            data = json.loads(path.read_text())
        keys = ("prefill_tokens", "prefill_ms", "decode_batch", "decode_context", "decode_ms")
        missing = [k for k in keys if k not in data]
        if missing:
            raise ValueError(f"timing file {path} lacks {', '.join(missing)}")
        return cls(*(data[k] for k in keys))

    def prefill_ms(self, num_tokens: float) -> float:
        i, w = _segment(self._prefill_x, num_tokens)
        if len(self._prefill_y) == 1:
            return self._prefill_y[0]
        return max(0.0, self._prefill_y[i] * (1 - w) + self._prefill_y[i + 1] * w)

    def decode_ms(self, batch: float, context: float) -> float:
        i, u = self._clamped(self._batch, batch)
        j, v = self._clamped(self._context, context)
        grid = self._decode
        i2, j2 = min(i + 1, len(self._batch) - 1), min(j + 1, len(self._context) - 1)
        top = grid[i][j] * (1 - v) + grid[i][j2] * v
        bottom = grid[i2][j] * (1 - v) + grid[i2][j2] * v
        return top * (1 - u) + bottom * u

    def __call__(self, step: StepComposition) -> float:
        total = self.prefill_ms(sum(step.prefill_tokens)) if step.prefill_tokens else 0.0
        if step.decode_context:
            total += self.decode_ms(len(step.decode_context), sum(step.decode_context) / len(step.decode_context))
        return total

    @staticmethod
    def _clamped(axis: list[float], x: float) -> tuple[int, float]:
        i, w = _segment(axis, x)
        return i, min(max(w, 0.0), 1.0)
