"""Shared reporting of the benchmarks: number formats, medians and ranges, ratios, markdown tables, where a result
came from (commit, host), JSON and plot files, and the command that reproduces them."""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "benchmarks" / "results"

Number = float | int | None


def missing(value: Number) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def fmt(value: Number, digits: int | None = None) -> str:
    """``-`` when missing; else ``digits`` decimals with thousands separators, or by size: 1,234 / 12.3 / 1.23."""
    if missing(value):
        return "-"
    assert value is not None
    if digits is not None:
        return f"{value:,.{digits}f}"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"


def present(values: Iterable[Number]) -> list[float]:
    return [float(v) for v in values if v is not None and not missing(v)]


def med_range(values: Iterable[Number]) -> tuple[float, float, float]:
    """(median, min, max) of the values that are there; NaNs when none is."""
    vals = present(values)
    if not vals:
        return math.nan, math.nan, math.nan
    return statistics.median(vals), min(vals), max(vals)


def median(values: Iterable[Number]) -> float:
    return med_range(values)[0]


def mr(values: Iterable[Number], digits: int | None = None) -> str:
    """``median (min-max)``, or just the value when there is one."""
    vals = present(values)
    m, lo, hi = med_range(vals)
    if len(vals) <= 1:
        return fmt(m, digits)
    return f"{fmt(m, digits)} ({fmt(lo, digits)}-{fmt(hi, digits)})"


def ratio(a: Number, b: Number) -> float:
    return math.nan if missing(a) or missing(b) or not b else float(a) / float(b)  # type: ignore[arg-type]


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); NaN for no values."""
    if not values:
        return math.nan
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100
    lo = math.floor(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def quantiles(values: Sequence[float]) -> list[float]:
    """The 0th..100th percentiles, for a CDF that can be redrawn from the JSON alone."""
    return [round(percentile(values, p), 2) for p in range(101)] if values else []


def table(headers: Sequence[str], rows: Iterable[Sequence[str]], right: bool = True) -> str:
    """A markdown table; columns after the first are right-aligned unless ``right`` is False."""
    body = [list(r) for r in rows]
    align = ["---"] + [("---:" if right else "---")] * (len(headers) - 1)
    return "\n".join("| " + " | ".join(r) + " |" for r in [list(headers), align, *body])


Column = tuple[str, Callable[[Any], Number], int | None]  # title, value of a row, digits (None: by size)


def summary_table(groups: dict[str, list[Any]], columns: Sequence[Column], first: str = "") -> str:
    """One line per group of rows: its name, the number of rows and ``median (min-max)`` of every column."""
    rows = [[name, str(len(rs)), *(mr([value(r) for r in rs], digits) for _, value, digits in columns)]
            for name, rs in groups.items() if rs]  # fmt: skip
    return table([first, "n", *(title for title, _, _ in columns)], rows)


def grouped(rows: Iterable[Any], key: Callable[[Any], Any]) -> dict[Any, list[Any]]:
    """Rows by ``key(row)``, in first-seen order."""
    out: dict[Any, list[Any]] = {}
    for row in rows:
        out.setdefault(key(row), []).append(row)
    return out


# ---------------------------------------------------------------------------------------------- provenance
def git(*args: str) -> str:
    try:
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def provenance() -> dict[str, Any]:
    """When, where and on which code a result was measured (read-only git calls)."""
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "commit": git("rev-parse", "HEAD"),
        "modified": [line for line in git("status", "--porcelain", "zdyn", "benchmarks", "examples").splitlines()],
    }


def command(module: str, argv: Sequence[str]) -> str:
    """How a benchmark was run, from the repo root: ``python -m benchmarks.NAME ARGS``."""
    return shlex.join(["python", "-m", module, *argv])


def write_json(path: Path, doc: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    tmp.replace(path)
    return path


def read_json(path: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(path.read_text())
    return doc


def pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path, title: str = "") -> Path:
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path


def footer(cmd: str, *paths: Path) -> str:
    """The closing lines of a benchmark's output: what it wrote and how to measure it again."""
    wrote = "".join(f"wrote {_short(p)}\n" for p in paths)
    return f"{wrote}reproduce (from the repo root): {cmd}"


def _short(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)
