"""PNG figures from result JSON files: latency CDFs of all runs, and load curves for sweeps."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

CDF_METRICS = (("ttft", "TTFT"), ("itl", "ITL"), ("e2el", "E2E latency"))
SWEEP_PANELS: tuple[tuple[str, str, tuple[int, ...]], ...] = (
    ("output token throughput (tok/s)", "output_throughput", ()),
    ("TTFT (ms)", "ttft", (50, 99)),
    ("ITL (ms)", "itl", (50, 99)),
)
SWEEP_AXES = (
    ("request_rate", "request rate (req/s)"),
    ("concurrency", "concurrency"),
    ("speed", "trace speed-up"),
)


def load_results(paths: Sequence[str | Path], labels: Sequence[str] | None = None) -> list[tuple[str, dict[str, Any]]]:
    """(label, result) pairs; the label is the given one, else the run's ``--label``, else the file name."""
    out = []
    for i, path in enumerate(paths):
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if not isinstance(data, dict) or not isinstance(data.get("runs"), list):
            raise ValueError(f"{path}: not a zdyn bench result (no 'runs')")
        label = labels[i] if labels and i < len(labels) else data.get("label") or Path(path).stem
        out.append((label, data))
    return out


def _as_float(value: Any) -> float:
    return math.inf if value == "inf" or value is None else float(value)


def sweep_axis(runs: Sequence[dict[str, Any]]) -> tuple[str, str] | None:
    """The load parameter that varies across the runs of one result, if any."""
    for key, title in SWEEP_AXES:
        values = {json.dumps(run["point"].get(key)) for run in runs}
        if len(values) > 1:
            return key, title
    return None


def _quantile(stats: dict[str, Any], q: int) -> float:
    cdf = stats.get("cdf") or []
    return float(cdf[q]) if cdf else math.nan


def _panel_values(metrics: dict[str, Any], metric: str, quantiles: tuple[int, ...]) -> list[float]:
    if not quantiles:
        return [float(metrics[metric])]
    return [_quantile(metrics[metric], q) for q in quantiles]


def plot_results(results: Sequence[tuple[str, dict[str, Any]]], out: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweeps = [(label, data, axis) for label, data in results if (axis := sweep_axis(data["runs"]))]
    rows = 2 if sweeps else 1
    fig, axes = plt.subplots(rows, 3, figsize=(16, 4.8 * rows), squeeze=False)

    for col, (key, title) in enumerate(CDF_METRICS):
        ax = axes[0][col]
        span: list[float] = []
        for label, data in results:
            for run in data["runs"]:
                cdf = run["metrics"][key].get("cdf") or []
                if not cdf:
                    continue
                name = label if len(data["runs"]) == 1 else f"{label} {run['label']}"
                ax.plot(cdf, [i / (len(cdf) - 1) for i in range(len(cdf))], label=name)
                span += [v for v in (cdf[0], cdf[-1]) if v > 0]
        if span and max(span) / min(span) > 100:
            ax.set_xscale("log")
        ax.set_title(f"{title} CDF")
        ax.set_xlabel(f"{title} (ms)")
        ax.set_ylabel("fraction of samples")
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small")

    if sweeps:
        for col, (ylabel, metric, quantiles) in enumerate(SWEEP_PANELS):
            ax = axes[1][col]
            for label, data, (key, axis_title) in sweeps:
                points = sorted(
                    (_as_float(run["point"][key]), _panel_values(run["metrics"], metric, quantiles))
                    for run in data["runs"]
                )
                points = [p for p in points if math.isfinite(p[0])]
                suffixes = [f" p{q}" for q in quantiles] or [""]
                for j, suffix in enumerate(suffixes):
                    style = "-o" if j == 0 else "--s"
                    ax.plot([x for x, _ in points], [v[j] for _, v in points], style, label=f"{label}{suffix}")
                ax.set_xlabel(axis_title)
            ax.set_ylabel(ylabel)
            ax.set_title(f"{ylabel} vs load")
            ax.grid(True, alpha=0.3)
            if ax.lines:
                ax.legend(fontsize="small")

    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
