"""Arrival schedules: when each request is sent, as offsets in seconds from the start of a run."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np

_BATCH = 1024


def gamma_offsets(rate: float, burstiness: float = 1.0, seed: int = 0) -> Iterator[float]:
    """Endless open-loop schedule: first request at 0, then gaps ~ Gamma(shape=b, scale=1/(rate*b)).

    The mean gap is 1/rate for every b; b = 1 is a Poisson process, b < 1 burstier, b > 1 more regular
    (the squared coefficient of variation of the gaps is 1/b). ``rate = inf`` sends everything at once.
    """
    if rate <= 0 or burstiness <= 0:
        raise ValueError("request rate and burstiness must be positive")
    if math.isinf(rate):
        while True:
            yield 0.0
    rng = np.random.default_rng(seed)
    scale = 1.0 / (rate * burstiness)
    t = 0.0
    while True:
        for gap in rng.gamma(burstiness, scale, _BATCH):
            yield t
            t += float(gap)


def trace_offset(arrival_s: float, speed: float = 1.0) -> float:
    """Trace replay: the trace's own arrival time divided by ``speed`` (2.0 = twice as fast)."""
    if speed <= 0:
        raise ValueError("speed must be positive")
    return arrival_s / speed
