"""``zdyn bench`` as a benchmark's load generator: one run as a child process, and the key figures of its result."""

from __future__ import annotations

import contextlib
import math
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zdyn.bench.deploy import Deployment
from zdyn.bench.host import CpuSampler, Labeller, by_group
from zdyn.bench.procs import log_tail
from zdyn.bench.results import read_json


@dataclass(frozen=True)
class Load:
    """A fixed-length load: closed loop at ``concurrency``, or Poisson at ``request_rate`` capped at it."""

    concurrency: int = 64
    requests: int = 500
    warmups: int = 32
    input_len: int = 200
    output_len: int = 64
    seed: int = 0
    request_rate: float | None = None

    def flags(self) -> list[str]:
        """``zdyn bench`` flags: random prompts, streaming chat, ``ignore_eos``, per-request records."""
        flags = ["--input-len", str(self.input_len), "--output-len", str(self.output_len), "--ignore-eos",
                 "--concurrency", str(self.concurrency), "--num-requests", str(self.requests),
                 "--warmups", str(self.warmups), "--seed", str(self.seed), "--save-requests"]  # fmt: skip
        return flags + (["--request-rate", f"{self.request_rate:g}"] if self.request_rate else [])


def bench_argv(base_url: str, tokenizer: str | Path, result_json: Path, label: str, *flags: str) -> list[str]:
    """``zdyn bench`` against ``base_url`` writing ``result_json``; ``flags`` say what load."""
    return ["zdyn", "bench", "--base-url", base_url, "--tokenizer", str(tokenizer), *flags,
            "--result-json", str(result_json), "--label", label]  # fmt: skip


@dataclass
class BenchRun:
    """One finished ``zdyn bench`` run: how it was started and what it wrote."""

    argv: list[str]
    result_json: Path
    log: Path
    pgid: int
    doc: dict[str, Any]

    @property
    def run(self) -> dict[str, Any]:
        run: dict[str, Any] = self.doc["runs"][0]
        return run

    @property
    def command(self) -> str:
        return shlex.join(self.argv)

    @property
    def window(self) -> tuple[float, float]:
        """Wall-clock [first send, last completion] of the measured requests."""
        t0, t1 = self.run["window_unix_s"]
        return float(t0), float(t1)

    def figures(self) -> dict[str, Any]:
        return figures(self.run)

    def cpu_pct(self, sampler: CpuSampler, labels: Labeller) -> dict[str, float]:
        """Percent of one core each label used over the measured window (plus ``machine`` and ``other``)."""
        t0, t1 = self.window
        return {k: round(100.0 * v / (t1 - t0), 1) for k, v in sampler.usage(t0, t1, labels).items()} if t1 > t0 else {}


def run_bench(argv: list[str], log: Path, timeout_s: float = 600.0, sampler: CpuSampler | None = None) -> BenchRun:
    """Run ``argv`` (``zdyn bench ... --result-json FILE ...``) in its own process group, output to ``log``;
    ``sampler`` also samples it. A failure or a timeout raises with the end of its log."""
    result_json = Path(argv[argv.index("--result-json") + 1])
    result_json.unlink(missing_ok=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "zdyn.cli", *argv[1:]],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            start_new_session=True,
        )
    if sampler is not None:
        sampler.track(proc.pid)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"zdyn bench did not finish in {timeout_s:.0f} s; see {log}") from None
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    if proc.returncode != 0 or not result_json.exists():
        raise RuntimeError(f"zdyn bench failed ({proc.returncode}); {log} ends:\n{log_tail(log, 20)}")
    return BenchRun(argv, result_json, log, proc.pid, read_json(result_json))


def measure(
    dep: Deployment, argv: list[str], log: Path, interval_s: float = 0.5, timeout_s: float = 600.0, titles: bool = False
) -> dict[str, Any]:
    """One ``zdyn bench`` run (``argv``) against ``dep``: its figures, the command, and the CPU seconds each role of
    the deployment (``titles``: vLLM's processes apart) and the load generator used over the measured window (plus
    ``machine`` and ``other``)."""
    groups = dep.roles()
    with CpuSampler(groups.values(), interval_s=interval_s) as sampler:
        run = run_bench(argv, log, timeout_s, sampler)
    t0, t1 = run.window
    cpu = sampler.usage(t0, t1, by_group({**groups, "load generator": run.pgid}, titles))
    return {
        **run.figures(),
        "window_s": t1 - t0,
        "cpu_s": cpu,
        "command": run.command,
        "result_json": str(run.result_json),
    }


def cpu_pct(row: dict[str, Any], prefix: str) -> float:
    """Percent of one core the roles whose names start with ``prefix`` used over a ``measure`` row's window."""
    used = sum(v for k, v in row["cpu_s"].items() if k.startswith(prefix))
    return 100.0 * used / row["window_s"] if row["window_s"] > 0 else math.nan


def cpu_by_kind(row: dict[str, Any]) -> dict[str, float]:
    """Percent of one core per kind of role over a ``measure`` row's window: worker0 and worker1 count as ``worker``,
    the load generator as ``bench``; plus ``machine`` and ``other``."""
    out: dict[str, float] = {}
    for role, seconds in row["cpu_s"].items():
        kind = "bench" if role == "load generator" else re.sub(r"\d+$", "", role)
        out[kind] = round(out.get(kind, 0.0) + 100.0 * seconds / row["window_s"], 1)
    return out


def idle_workers(row: dict[str, Any]) -> list[str]:
    """Workers that did (almost) nothing while another worked: the run did not use every worker."""
    workers = {k: v for k, v in row["cpu_s"].items() if k.startswith("worker")}
    busiest = max(workers.values(), default=0.0)
    return sorted(k for k, v in workers.items() if busiest > 0 and v < 0.1 * busiest)


def _latency(metrics: dict[str, Any], name: str, p: str) -> float:
    stats = metrics[name]
    if not stats["count"]:
        return math.nan
    return float(stats["mean"] if p == "mean" else stats["percentiles"].get(p, math.nan))


def figures(run: dict[str, Any]) -> dict[str, Any]:
    """The key figures of one run of a ``zdyn bench`` result (``runs[i]``), flat; latencies in ms."""
    m = run["metrics"]
    n, good, duration = m["num_requests"], m.get("good_requests"), m["duration_s"]
    out: dict[str, Any] = {
        "num_requests": n,
        "completed": m["completed"],
        "failed": m["failed"],
        "errors": m.get("errors", {}),
        "duration_s": duration,
        "req_s": m["request_throughput"],
        "out_tok_s": m["output_throughput"],
        "in_tok_s": m["total_input_tokens"] / duration if duration > 0 else 0.0,
        "goodput": m.get("request_goodput"),
        "good_fraction": None if good is None or not n else good / n,
        "prompt_tokens": m["total_input_tokens"],
        "cached_tokens": m.get("cached_tokens"),
        "cached_fraction": m.get("cached_fraction"),
        "max_concurrency": m["max_concurrency"],
    }
    for name, short in (("ttft", "ttft"), ("itl", "itl"), ("tpot", "tpot"), ("e2el", "e2e")):
        for p in ("p50", "p90", "p99", "mean"):
            out[f"{short}_{p}"] = _latency(m, name, p)
    ok = [r for r in run.get("requests") or () if r["success"]]
    if ok:
        out["chunks_per_req"] = statistics.fmean(r["num_chunks"] for r in ok)
        out["out_tokens_per_req"] = statistics.fmean(r["output_tokens"] for r in ok)
        out["prompt_tokens_per_req"] = statistics.fmean(r["prompt_tokens"] for r in ok)
    return out
