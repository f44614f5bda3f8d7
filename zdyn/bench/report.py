"""Printed summary (vLLM's layout) and the result JSON of a run."""

from __future__ import annotations

import datetime as dt
import json
import platform
import shlex
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from zdyn.bench.metrics import BenchMetrics, Stats
from zdyn.bench.runner import PointResult

RESULT_FORMAT = 1
_WIDTH = 50
_MAX_ERROR_SAMPLES = 10
_SECRET_FLAGS = ("--api-key", "--header")
_LATENCIES = (
    ("ttft", "TTFT", "Time to First Token"),
    ("tpot", "TPOT", "Time per Output Token (excl. 1st token)"),
    ("itl", "ITL", "Inter-token Latency"),
    ("e2el", "E2EL", "End-to-end Latency"),
)


def redact(argv: Sequence[str]) -> list[str]:
    """argv with the values of --api-key and --header replaced, so results can be shared."""
    out: list[str] = []
    hide_next = False
    for arg in argv:
        flag, eq, _ = arg.partition("=")
        if hide_next:
            out.append(_redact_value(out[-1], arg))
            hide_next = False
        elif eq and flag in _SECRET_FLAGS:
            out.append(f"{flag}={_redact_value(flag, arg[len(flag) + 1 :])}")
        else:
            out.append(arg)
            hide_next = arg in _SECRET_FLAGS
    return out


def _redact_value(flag: str, value: str) -> str:
    if flag == "--header":
        name, sep, _ = value.partition(":")
        return f"{name}:***" if sep else "***"
    return "***"


def command_line(argv: Sequence[str]) -> str:
    return shlex.join(["zdyn", "bench", *redact(argv)])


def _row(name: str, value: object) -> str:
    text = f"{value:.2f}" if isinstance(value, float) else str(value)
    return f"{name:<40} {text:<10}"


def _section(title: str, fill: str = "-") -> str:
    return f"{title:{fill}^{_WIDTH}}"


def _latency_rows(short: str, stats: Stats) -> list[str]:
    if stats.count == 0:
        return [_row(f"{short} (ms):", "n/a")]
    rows = [
        _row(f"Mean {short} (ms):", stats.mean),
        _row(f"Median {short} (ms):", stats.median),
        _row(f"Std {short} (ms):", stats.std),
    ]
    rows += [_row(f"{key.upper()} {short} (ms):", v) for key, v in stats.percentiles.items() if key != "p50"]
    return rows


def format_summary(metrics: BenchMetrics, title: str = "") -> str:
    m = metrics
    lines = [_section(" Serving Benchmark Result ", "=")]
    if title:
        lines.append(_row("Load point:", title))
    lines += [
        _row("Successful requests:", m.completed),
        _row("Failed requests:", m.failed),
    ]
    lines += [_row(f"  {kind}:", count) for kind, count in sorted(m.errors.items())]
    lines += [
        _row("Benchmark duration (s):", m.duration_s),
        _row("Total input tokens:", m.total_input_tokens),
        _row("Total generated tokens:", m.total_output_tokens),
        _row("Request throughput (req/s):", m.request_throughput),
    ]
    if m.request_goodput is not None:
        slos = " ".join(f"{k}:{v:g}" for k, v in m.goodput_slos_ms.items())
        lines.append(_row("Request goodput (req/s):", m.request_goodput))
        lines.append(_row(f"  good requests ({slos}):", m.good_requests))
    lines += [
        _row("Output token throughput (tok/s):", m.output_throughput),
        _row("Total token throughput (tok/s):", m.total_token_throughput),
        _row("Peak concurrent requests:", m.max_concurrency),
    ]
    if m.cached_fraction is not None:
        lines.append(_row("Cached prompt tokens (%):", 100.0 * m.cached_fraction))
    for key, short, title_text in _LATENCIES:
        lines.append(_section(title_text))
        lines += _latency_rows(short, getattr(m, key))
    lines.append("=" * _WIDTH)
    return "\n".join(lines)


def error_samples(result: PointResult) -> list[dict[str, Any]]:
    failed = [r for r in result.records if not r.success][:_MAX_ERROR_SAMPLES]
    return [{"index": r.index, "error": r.error, "status": r.status, "detail": r.error_detail} for r in failed]


def measured_window(result: PointResult) -> list[float] | None:
    """Wall-clock [first send, last completion] of the measured requests: the window over which others (a
    benchmark's CPU sampler) read what the run cost."""
    if not result.records:
        return None
    to_unix = time.time() - time.perf_counter()
    return [to_unix + min(r.start for r in result.records), to_unix + max(r.end for r in result.records)]


def result_json(
    argv: Sequence[str],
    config: dict[str, Any],
    results: Sequence[PointResult],
    *,
    label: str,
    save_requests: bool,
) -> dict[str, Any]:
    runs = []
    for result in results:
        run: dict[str, Any] = {
            "label": result.point.label(),
            "point": result.point.to_json(),
            "metrics": result.metrics.to_json(),
            "warmup": {
                "requests": len(result.warmup_records),
                "failed": sum(not r.success for r in result.warmup_records),
            },
            "error_samples": error_samples(result),
            "window_unix_s": measured_window(result),
        }
        if save_requests:
            run["requests"] = [r.to_json(result.origin) for r in result.records]
        runs.append(run)
    return {
        "format": RESULT_FORMAT,
        "label": label,
        "command": command_line(argv),
        "argv": redact(argv),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "config": config,
        "runs": runs,
    }


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, allow_nan=False)
        f.write("\n")
