#!/usr/bin/env python3
"""Aggregated versus disaggregated serving with the same number of simulated workers, on two prefill-heavy traces.

For each trace (the Azure 2023 code trace, ISL:OSL ~73:1, and the Mooncake FAST'25 conversation trace, ISL ~12k) and
each deployment of N mocker workers in all (agg: N workers, round-robin; disagg: N - P decode + P prefill workers;
disagg_route: the same behind the KV router), ``benchmarks/topology.py`` starts the scenario from its example script
(``examples/<scenario>/run.sh``, ``ZDYN_ENGINE=mocker``, free ports, waiting until /health lists the decode workers
and the prefill queue's log shows every prefill worker joined), ``zdyn bench`` replays one time window of the trace
(open loop, the trace's timestamps divided by the speed, token-id prompts on /v1/completions, ``max_tokens`` = the
traced output length with ``ignore_eos``), and the deployment is stopped. Every deployment gets the same requests
(same seed, same window), the same mocker settings and cold caches. /tmp/zdyn-bench.lock is held across all
deployments of a trace, so that they are measured side by side.

Per run: TTFT and ITL p50/p99, TPOT p50, E2E p50, throughput, goodput at the trace's SLO, the prefix-hit share the
server reports, and for the disaggregated ones the share of requests prefilled remotely, from the decode workers' log
lines ``request <id>: remote prefill (...)`` / ``local prefill (...)`` / ``remote prefill failed (...)``.

    python benchmarks/disagg.py                  # ~15 min of deployments: 5 on the Azure window, 6 on the Mooncake one
    python benchmarks/disagg.py --report-only    # re-print the tables and redraw the plot from the JSON

Defaults: 4 workers in all, mocker speedup 2 (Dynamo's timing otherwise), the Azure code trace's 1080-1200 s at speed
2 and the Mooncake conversation trace's first 90 s at speed 1.5 (agg near but below saturation), decode workers'
--max-local-prefill-length 1000 (Dynamo's default), KV transfer 128 KiB per token (Llama-3-8B bf16) at 64 GB/s.
Latencies are wall-clock: at speedup 2 the modelled engine times are twice the figures.

Output: ``benchmarks/results/disagg.json`` (settings, every run's figures and decisions), ``disagg.png``, and under
``benchmarks/results/disagg/``: ``<trace>/<deployment>/topology.json``, ``raw/`` (zdyn bench results) and ``logs/``
(run.sh, every role, the bench run, and the trace window that was replayed).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import datetime as dt
import json
import math
import os
import platform
import re
import shlex
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere: import this checkout's zdyn and benchmarks

from benchmarks import topology  # noqa: E402
from benchmarks.routing_quality import LONG_MODEL, LONG_MODEL_LEN, long_context_model  # noqa: E402

DATA = Path("/work/shared/data")
RESULTS = REPO / "benchmarks" / "results"
OUT = RESULTS / "disagg"  # OUT.json, OUT.png and the folder OUT/ (its raw/ and logs/ are git-ignored)
RESULT_FORMAT = 1
SLOW_GAP_MS = 100.0  # an inter-token gap longer than this (modelled engine time) counts as a stall
DECISION = re.compile(
    r"^(?P<date>\S+ \S+) \S+ \S+: request (?P<id>\S+): "
    r"(?P<kind>remote prefill failed|remote prefill|local prefill) \((?P<reason>.*)\)"
    r"(?: took (?P<took>[\d.]+)s|: prefilling locally)?$",
    re.MULTILINE,
)


@dataclass(frozen=True, slots=True)
class Trace:
    """A time window [start_s, end_s) of a trace file, replayed at ``speed`` with a goodput SLO."""

    name: str
    path: Path
    dataset: str  # zdyn bench --dataset
    start_s: float
    end_s: float
    speed: float
    slo: tuple[tuple[str, float], ...]  # goodput SLO in modelled engine time (ms at speedup 1)

    def slo_args(self, speedup: float) -> list[str]:
        """zdyn bench --goodput values: wall-clock ms, i.e. the SLO divided by the mocker's speedup."""
        return [f"{name}:{ms / speedup:g}" for name, ms in self.slo]


@dataclass(frozen=True, slots=True)
class Layout:
    """A deployment of N workers: a scenario and, for the disaggregated ones, P prefill workers."""

    name: str
    scenario: str
    prefill: int | None = None
    max_jobs_per_worker: int = 0  # the prefill queue's cap on a prefill worker's jobs at once (0: its max_num_seqs)

    def label(self, n: int) -> str:
        if self.prefill is None:
            return f"{self.scenario} {n}"
        jobs = f", {self.max_jobs_per_worker} job/prefill worker" if self.max_jobs_per_worker else ""
        return f"{self.scenario} {self.prefill}P+{n - self.prefill}D{jobs}"


LAYOUTS = {
    "agg": Layout("agg", "agg"),
    "disagg-2p": Layout("disagg-2p", "disagg", 2),
    "disagg-3p": Layout("disagg-3p", "disagg", 3),
    "disagg_route-2p": Layout("disagg_route-2p", "disagg_route", 2),
    "disagg_route-3p": Layout("disagg_route-3p", "disagg_route", 3),
    # the prefill queue hands each prefill worker one job at a time, as Dynamo's prefill workers take them: jobs then
    # wait in the queue, where the decode workers see them (max-prefill-queue-size)
    "disagg-2p-j1": Layout("disagg-2p-j1", "disagg", 2, max_jobs_per_worker=1),
    "disagg_route-2p-j1": Layout("disagg_route-2p-j1", "disagg_route", 2, max_jobs_per_worker=1),
}
DEFAULT_LAYOUTS = {  # disagg_route with one decode worker differs from disagg only where prompts share prefixes
    "azure-code": ("agg", "disagg-2p", "disagg-3p", "disagg_route-2p", "disagg-2p-j1"),
    "mooncake-conv": ("agg", "disagg-2p", "disagg-3p", "disagg_route-2p", "disagg_route-3p", "disagg-2p-j1"),
}


@dataclass(slots=True)
class Run:
    trace: str
    layout: str
    label: str
    scenario: str
    workers: int
    prefill_workers: int | None
    decode_workers: int | None
    window: str
    speed: float
    requests_in_window: int
    offered_rps: float
    out_dir: str
    completed: int = 0
    failed: int = 0
    duration_s: float = 0.0
    request_throughput: float = 0.0
    output_throughput: float = 0.0
    input_throughput: float = 0.0
    good_fraction: float | None = None
    ttft_p50: float = math.nan
    ttft_p99: float = math.nan
    itl_p50: float = math.nan
    itl_p99: float = math.nan
    tpot_p50: float = math.nan
    tpot_p99: float = math.nan
    e2el_p50: float = math.nan
    cached_fraction: float | None = None
    decisions: dict[str, int] = field(default_factory=dict)  # remote, local, failed (all requests of the run)
    local_reasons: dict[str, int] = field(default_factory=dict)
    remote_prefill_s_p50: float | None = None  # decode worker's wait for its remote prefill
    queue: dict[str, int] = field(default_factory=dict)  # prefill queue log: jobs, expired, redelivered
    per_request: dict[str, Any] = field(default_factory=dict)  # see breakdown()
    cpu: dict[str, float] = field(default_factory=dict)
    bench_command: str = ""
    leftovers: list[str] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def remote_fraction(self) -> float | None:
        total = sum(self.decisions.values())
        return self.decisions.get("remote", 0) / total if total else None


# ---------------------------------------------------------------------------------------------------------------------
# Inputs: the long-context model folder and the trace windows


def write_window(trace: Trace, dest: Path) -> dict[str, Any]:
    """Copy the trace's lines with arrival in [start_s, end_s) to ``dest`` (zdyn bench rebases arrivals to the
    window's first request); their statistics."""
    isl: list[int] = []
    osl: list[int] = []
    first: float | None = None
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(trace.path, encoding="utf-8", newline="") as src, open(dest, "w", encoding="utf-8", newline="") as out:
        if trace.dataset == "azure":
            reader = csv.reader(src)
            writer = csv.writer(out, lineterminator="\r\n")
            writer.writerow(next(reader))
            origin = None
            for row in reader:
                when = dt.datetime.fromisoformat(row[0].strip())
                origin = origin or when
                t = (when - origin).total_seconds()
                if trace.start_s <= t < trace.end_s:
                    writer.writerow(row)
                    first = t if first is None else first
                    isl.append(int(row[1]))
                    osl.append(int(row[2]))
        else:
            for line in src:
                entry = json.loads(line)
                t = entry["timestamp"] / 1000
                if trace.start_s <= t < trace.end_s:
                    out.write(line)
                    first = t if first is None else first
                    isl.append(entry["input_length"])
                    osl.append(entry["output_length"])
    if not isl:
        raise ValueError(f"{trace.path}: no request in [{trace.start_s:g}, {trace.end_s:g}) s")
    span = trace.end_s - trace.start_s
    return {
        "requests": len(isl),
        "first_arrival_s": first,
        "rate_rps": round(len(isl) / span, 3),
        "isl_mean": round(sum(isl) / len(isl)),
        "isl_p50": sorted(isl)[len(isl) // 2],
        "isl_max": max(isl),
        "osl_mean": round(sum(osl) / len(osl), 1),
        "osl_p50": sorted(osl)[len(osl) // 2],
        "input_tokens": sum(isl),
        "output_tokens": sum(osl),
    }


# ---------------------------------------------------------------------------------------------------------------------
# One run


def decode_decisions(log_dir: Path) -> tuple[Counter[str], Counter[str], list[float]]:
    """(remote/local/failed counts, local-prefill reasons, remote-prefill waits in s) from the decode workers' logs."""
    kinds: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    waits: list[float] = []
    for path in sorted(log_dir.glob("decode*.log")):
        for m in DECISION.finditer(path.read_text(errors="replace")):
            kind = {"remote prefill": "remote", "local prefill": "local", "remote prefill failed": "failed"}[m["kind"]]
            kinds[kind] += 1
            if kind == "local":  # "1234 new tokens <= max_local_prefill_length 1000" -> its shape, not the numbers
                reasons[re.sub(r"\d+", "#", m["reason"])] += 1
            if m["took"]:
                waits.append(float(m["took"]))
    return kinds, reasons, waits


def queue_counts(log_dir: Path) -> dict[str, int]:
    path = log_dir / "prefill_queue.log"
    text = path.read_text(errors="replace") if path.exists() else ""
    return {
        "jobs_done": len(re.findall(r"prefill job \S+ on \S+: done in", text)),
        "jobs_failed": len(re.findall(r"prefill job \S+ on \S+: (?!done in)", text)),
        "cancelled": len(re.findall(r"prefill job \S+ cancelled", text)),
        "redelivered": len(re.findall(r"queued again", text)),
        "expired": sum(int(n) for n in re.findall(r"(\d+) prefill job\(s\) expired", text)),
    }


def topology_argv(args: argparse.Namespace, trace: Trace, layout: Layout, window: Path, count: int) -> list[str]:
    """benchmarks/topology.py's arguments for one run; the lock is held around all runs of a trace instead."""
    mocker = f"--kv-bytes-per-token {args.kv_bytes_per_token}"
    if layout.scenario != "agg":
        mocker += f" --max-local-prefill-length {args.max_local_prefill_length}"
    argv = [
        "--scenario", layout.scenario, "--workers", str(args.workers), "--rates", f"{trace.speed:g}",
        "--dataset", trace.dataset, "--dataset-path", str(window), "--num-requests", str(count), "--warmups", "0",
        "--seed", str(args.seed), "--slo", *trace.slo_args(args.speedup),
        "--model", str(args.model), "--speedup", f"{args.speedup:g}", "--max-model-len", str(LONG_MODEL_LEN),
        "--mocker-args", mocker, "--lock", "", "--start-timeout", "120",
        # zdyn bench, passed through: token ids (no tokenizing on the frontend), a connection per request (idle
        # keep-alive connections race uvicorn's 5 s timeout in the trace's gaps), per-request records
        "--api", "completions", "--prompt-format", "tokens", "--no-keep-alive", "--save-requests",
    ]  # fmt: skip
    if layout.max_jobs_per_worker:
        argv[1] = register_queue_variant(layout, args.out / "logs")
    elif layout.prefill is not None:
        argv += ["--prefill-workers", str(layout.prefill)]
    return argv


def register_queue_variant(layout: Layout, config_dir: Path) -> str:
    """A scenario (registered in topology.SCENARIOS, in this process only) that runs the layout's example with a copy
    of its config.yaml whose PrefillQueue section sets max-jobs-per-worker; its name."""
    import yaml

    assert layout.prefill is not None
    base = topology.disagg_scenario(layout.scenario, layout.prefill)
    config = yaml.safe_load((REPO / "examples" / layout.scenario / "config.yaml").read_text())
    config.setdefault("PrefillQueue", {})["max-jobs-per-worker"] = layout.max_jobs_per_worker
    config_dir.mkdir(parents=True, exist_ok=True)
    path = (config_dir / f"{layout.name}-config.yaml").resolve()
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    name = f"{layout.scenario}:{layout.name}"
    topology.SCENARIOS[name] = dataclasses.replace(base, env=lambda n: {**base.env(n), "ZDYN_CONFIG": str(path)})
    return name


def run_one(args: argparse.Namespace, trace: Trace, layout: Layout, window: Path, stats: dict[str, Any]) -> Run:
    out_dir = args.out / trace.name / layout.name
    shutil.rmtree(out_dir / "logs", ignore_errors=True)
    argv = topology_argv(args, trace, layout, window, stats["requests"])
    targs, passthrough = topology.build_parser().parse_known_args(argv)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    summary = topology.run(targs, passthrough, out_dir, shlex.join(["python", "benchmarks/topology.py", *argv]))
    [point] = summary["points"]
    [deployment] = summary["deployments"]
    log_dir = out_dir / deployment["log_dir"]
    p = layout.prefill
    span = trace.end_s - trace.start_s
    run = Run(
        trace=trace.name,
        layout=layout.name,
        label=layout.label(args.workers),
        scenario=layout.scenario,
        workers=args.workers,
        prefill_workers=p,
        decode_workers=None if p is None else args.workers - p,
        window=f"{trace.start_s:g}-{trace.end_s:g} s",
        speed=trace.speed,
        requests_in_window=stats["requests"],
        offered_rps=round(stats["requests"] / (span / trace.speed), 3),
        out_dir=os.path.relpath(out_dir, REPO),
        wall_s=round(time.monotonic() - started, 1),
        leftovers=deployment.get("leftovers", []),
    )
    copied = (
        "completed", "failed", "duration_s", "request_throughput", "output_throughput", "ttft_p50", "ttft_p99",
        "itl_p50", "itl_p99", "tpot_p50", "tpot_p99", "e2el_p50", "good_fraction", "cpu", "bench_command",
    )  # fmt: skip
    for key in copied:
        setattr(run, key, point[key])
    raw = json.loads((out_dir / point["result_json"]).read_text())["runs"][0]["metrics"]
    run.cached_fraction = raw.get("cached_fraction")
    run.input_throughput = round(raw["total_input_tokens"] / raw["duration_s"], 1) if raw["duration_s"] else 0.0
    if layout.scenario != "agg":
        kinds, reasons, waits = decode_decisions(log_dir)
        run.decisions = dict(kinds)
        run.local_reasons = dict(reasons.most_common())
        run.remote_prefill_s_p50 = round(sorted(waits)[len(waits) // 2], 3) if waits else None
        run.queue = queue_counts(log_dir)
    slow_ms = SLOW_GAP_MS / args.speedup
    run.per_request = breakdown(out_dir / point["result_json"], args.max_local_prefill_length, slow_ms)
    return run


def _percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def breakdown(raw_path: Path, threshold: int, slow_ms: float) -> dict[str, Any]:
    """From zdyn bench's per-request records: TTFT of prompts up to and above ``threshold`` tokens (the decode
    workers' max_local_prefill_length: those a decode worker prefills itself, and those it may send away), and the
    share of inter-token gaps longer than ``slow_ms`` (wall clock) with the ITL p99.9."""
    records = [r for r in json.loads(raw_path.read_text())["runs"][0]["requests"] if r["success"]]
    out: dict[str, Any] = {"threshold": threshold, "slow_gap_ms": round(slow_ms, 1)}
    for name, mine in (
        ("short", [r for r in records if r["prompt_tokens"] <= threshold]),
        ("long", [r for r in records if r["prompt_tokens"] > threshold]),
    ):
        ttfts = [1000 * r["ttft_s"] for r in mine]
        out[f"{name}_n"] = len(mine)
        for q in (50, 99):
            value = _percentile(ttfts, q)
            out[f"{name}_ttft_p{q}"] = None if value is None else round(value, 1)
    gaps = [1000 * g for r in records for g in r["itl_s"]]
    out["gaps"] = len(gaps)
    out["slow_gap_pct"] = round(100 * sum(g > slow_ms for g in gaps) / len(gaps), 2) if gaps else None
    p999 = _percentile(gaps, 99.9)
    out["itl_p999"] = None if p999 is None else round(p999, 1)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Report


def _fmt(value: float | None, digits: int = 0) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:,.{digits}f}"


def format_table(runs: list[dict[str, Any]]) -> str:
    head = [
        "trace", "deployment", "req/s", "out tok/s", "in tok/s", "TTFT p50", "TTFT p99", "ITL p50", "ITL p99",
        "TPOT p50", "E2E p50", "good %", "remote prefill", "cached %", "failed", "CPU machine",
    ]  # fmt: skip
    rows = [head, ["---"] * 2 + ["---:"] * (len(head) - 2)]
    for r in runs:
        total = sum(r["decisions"].values())
        remote = "-" if not total else f"{100 * r['decisions'].get('remote', 0) / total:.0f} %"
        if r["decisions"].get("failed"):
            remote += f" ({r['decisions']['failed']} failed)"
        rows.append([
            r["trace"], r["label"], _fmt(r["request_throughput"], 2), _fmt(r["output_throughput"]),
            _fmt(r["input_throughput"]), _fmt(r["ttft_p50"]), _fmt(r["ttft_p99"]), _fmt(r["itl_p50"], 1),
            _fmt(r["itl_p99"], 1), _fmt(r["tpot_p50"], 1), _fmt(r["e2el_p50"]),
            _fmt(None if r["good_fraction"] is None else 100 * r["good_fraction"]), remote,
            _fmt(None if r["cached_fraction"] is None else 100 * r["cached_fraction"], 1), str(r["failed"]),
            _fmt(r["cpu"].get("machine")),
        ])  # fmt: skip
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def plot(summary: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    traces = [t for t in summary["traces"] if any(r["trace"] == t for r in summary["runs"])]
    from matplotlib.ticker import FuncFormatter

    fig, axes = plt.subplots(len(traces), 3, figsize=(17, 4.6 * len(traces)), squeeze=False)
    colors = plt.get_cmap("tab10")
    for row, name in zip(axes, traces, strict=True):
        runs = [r for r in summary["runs"] if r["trace"] == name]
        x = range(len(runs))
        labels = [r["label"].replace(" ", "\n", 1).replace(", 1 job/", "\n1 job/") for r in runs]
        for ax, metric, unit in ((row[0], "ttft", "TTFT (wall ms)"), (row[1], "itl", "ITL (wall ms)")):
            for i, q in enumerate(("p50", "p99")):
                values = [r[f"{metric}_{q}"] for r in runs]
                bars = ax.bar([v + (i - 0.5) * 0.38 for v in x], values, 0.38, color=colors(i), label=q)
                ax.bar_label(bars, fmt="%.0f", fontsize=7)
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "25" else ""))
            ax.set(ylabel=unit, title=f"{name}: {metric.upper()} p50 / p99")
            ax.set_xticks(list(x), labels, fontsize=7.5)
            ax.legend(fontsize="small")
            ax.grid(True, axis="y", which="both", alpha=0.3)
        ax = row[2]
        bars = ax.bar(list(x), [r["output_throughput"] for r in runs], 0.6, color=colors(2))
        notes = []
        for r in runs:
            total = sum(r["decisions"].values())
            notes.append(f"{r['request_throughput']:.2f} req/s" + (
                f"\n{100 * r['decisions'].get('remote', 0) / total:.0f} % remote" if total else ""))  # fmt: skip
        ax.bar_label(bars, labels=notes, fontsize=7)
        ax.set(ylabel="output tok/s", title=f"{name}: throughput (offered {runs[0]['offered_rps']:.2f} req/s)")
        ax.set_xticks(list(x), labels, fontsize=7.5)
        ax.set_ylim(top=ax.get_ylim()[1] * 1.2)
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(
        f"agg vs disagg vs disagg_route, {summary['settings']['workers']} mocker workers in all, "
        f"speedup {summary['settings']['speedup']:g}, max_local_prefill_length "
        f"{summary['settings']['max_local_prefill_length']}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def format_breakdown(runs: list[dict[str, Any]]) -> str:
    head = [
        "trace", "deployment", "short prompts", "TTFT p50 short", "TTFT p99 short", "long prompts", "TTFT p50 long",
        "TTFT p99 long", "gaps > stall", "ITL p99.9",
    ]  # fmt: skip
    rows = [head, ["---"] * 2 + ["---:"] * (len(head) - 2)]
    for r in runs:
        b = r.get("per_request") or {}
        if not b:
            continue
        rows.append([
            r["trace"], r["label"], f"{b['short_n']} (<= {b['threshold']})", _fmt(b["short_ttft_p50"]),
            _fmt(b["short_ttft_p99"]), str(b["long_n"]), _fmt(b["long_ttft_p50"]), _fmt(b["long_ttft_p99"]),
            f"{_fmt(b['slow_gap_pct'], 2)} % (> {b['slow_gap_ms']:g} ms)", _fmt(b["itl_p999"]),
        ])  # fmt: skip
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def report(summary: dict[str, Any]) -> str:
    table = format_table(summary["runs"]) + "\n\n" + format_breakdown(summary["runs"])
    windows = "\n".join(
        f"- {name}: {w['window']} of the trace at speed {w['speed']:g}: {w['requests']} requests, "
        f"{w['offered_rps']:.2f} req/s offered, ISL mean {w['isl_mean']:,} (p50 {w['isl_p50']:,}, "
        f"max {w['isl_max']:,}), OSL mean {w['osl_mean']:g}; SLO (wall ms) {' '.join(w['slo_wall'])}"
        for name, w in summary["traces"].items()
    )
    return f"Command: `{summary['command']}`\n\n{windows}\n\n{table}"


# ---------------------------------------------------------------------------------------------------------------------
# Command line


def parse_window(text: str) -> tuple[float, float]:
    try:
        start, end = (float(v) for v in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected START:END in seconds, got {text!r}") from None
    if not 0 <= start < end:
        raise argparse.ArgumentTypeError(f"expected 0 <= START < END, got {text!r}")
    return start, end


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--traces", default="azure-code,mooncake-conv", help="comma-separated: azure-code, mooncake-conv")
    p.add_argument(
        "--layouts", help=f"comma-separated, of {', '.join(LAYOUTS)} (default: per trace, see DEFAULT_LAYOUTS)"
    )
    p.add_argument("--workers", type=int, default=4, help="workers in all, the same for every deployment")
    p.add_argument("--speedup", type=float, default=2.0, help="mocker speedup (divides every simulated duration)")
    p.add_argument("--azure-window", type=parse_window, default=(1080.0, 1200.0), metavar="START:END")
    p.add_argument("--azure-speed", type=float, default=2.0, help="replay speed of the Azure window")
    p.add_argument("--mooncake-window", type=parse_window, default=(0.0, 90.0), metavar="START:END")
    p.add_argument("--mooncake-speed", type=float, default=1.5, help="replay speed of the Mooncake window")
    p.add_argument("--max-local-prefill-length", type=int, default=1000, help="decode workers' threshold")
    p.add_argument("--kv-bytes-per-token", type=int, default=131_072, help="KV moved per prompt token (Llama-3-8B)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", type=Path, default=LONG_MODEL)
    p.add_argument("--lock", default=topology.LOCK_PATH, help="shared benchmark lock, held per trace ('' for none)")
    p.add_argument("--out", type=Path, default=OUT, help="writes OUT.json, OUT.png and OUT/ (default %(default)s)")
    p.add_argument("--report-only", action="store_true", help="re-print the table and redraw the plot")
    return p


def traces_from(args: argparse.Namespace) -> dict[str, Trace]:
    return {
        "azure-code": Trace(
            "azure-code", DATA / "azure_llm_inference_trace_2023_code.csv", "azure", *args.azure_window,
            args.azure_speed, (("ttft", 1000.0), ("tpot", 100.0)),
        ),
        "mooncake-conv": Trace(
            "mooncake-conv", DATA / "mooncake_fast25_conversation_trace.jsonl", "mooncake", *args.mooncake_window,
            args.mooncake_speed, (("ttft", 5000.0), ("tpot", 100.0)),
        ),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    out_json, out_png = args.out.with_suffix(".json"), args.out.with_suffix(".png")
    if args.report_only:
        summary = json.loads(out_json.read_text())
        for run in summary["runs"]:  # refresh the per-request view where the raw results are still there
            raw = REPO / run["out_dir"] / "raw" / f"w{run['workers']}-r{run['speed']:g}.json"
            if raw.exists():
                slow = SLOW_GAP_MS / summary["settings"]["speedup"]
                run["per_request"] = breakdown(raw, summary["settings"]["max_local_prefill_length"], slow)
        out_json.write_text(json.dumps(summary, indent=1) + "\n")
        print(report(summary))
        print(f"wrote {plot(summary, out_png)}")
        return 0
    all_traces = traces_from(args)
    names = [t for t in args.traces.split(",") if t]
    chosen = [t for t in args.layouts.split(",") if t] if args.layouts else None
    if unknown := [t for t in names if t not in all_traces] + [x for x in chosen or () if x not in LAYOUTS]:
        parser.error(f"unknown trace or layout: {', '.join(unknown)}")
    if args.model == LONG_MODEL:
        long_context_model()
    command = shlex.join(["python", "benchmarks/disagg.py", *(sys.argv[1:] if argv is None else argv)])
    print(f"Command: {command}", flush=True)
    summary: dict[str, Any] = {
        "format": RESULT_FORMAT,
        "command": command,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "git": topology.git_state(),
        "settings": {
            "workers": args.workers,
            "speedup": args.speedup,
            "max_local_prefill_length": args.max_local_prefill_length,
            "kv_bytes_per_token": args.kv_bytes_per_token,
            "kv_transfer_bandwidth_gbps": 64.0,
            "mocker": "block 64, 16384 blocks, max_num_seqs 256, max_num_batched_tokens 8192, Dynamo's polynomials",
            "max_model_len": LONG_MODEL_LEN,
            "model": str(args.model),
            "seed": args.seed,
        },
        "traces": {},
        "runs": [],
    }
    started = time.monotonic()
    topology._interrupt_on_sigterm()
    try:
        for name in names:
            trace = all_traces[name]
            window = args.out / "logs" / f"{name}-{trace.start_s:g}-{trace.end_s:g}s{trace.path.suffix}"
            stats = write_window(trace, window)
            span = trace.end_s - trace.start_s
            summary["traces"][name] = {
                "file": str(trace.path),
                "window": f"{trace.start_s:g}-{trace.end_s:g} s",
                "speed": trace.speed,
                "offered_rps": round(stats["requests"] / (span / trace.speed), 3),
                "slo_model_ms": dict(trace.slo),
                "slo_wall": trace.slo_args(args.speedup),
                **stats,
            }
            # one lock for all deployments of a trace, so that they are measured side by side
            waited = time.monotonic()
            with topology.bench_lock(args.lock) if args.lock else contextlib.nullcontext():
                summary["traces"][name]["lock_wait_s"] = round(time.monotonic() - waited, 1)
                for layout_name in chosen or DEFAULT_LAYOUTS[name]:
                    layout = LAYOUTS[layout_name]
                    print(f"== {name}, {layout.label(args.workers)}", flush=True)
                    run = run_one(args, trace, layout, window, stats)
                    summary["runs"].append({k: getattr(run, k) for k in run.__dataclass_fields__})
                    print(
                        f"   {run.request_throughput:.2f} req/s, TTFT p50/p99 {run.ttft_p50:.0f}/{run.ttft_p99:.0f} "
                        f"ms, ITL p50/p99 {run.itl_p50:.1f}/{run.itl_p99:.1f} ms, decisions {run.decisions or '-'}, "
                        f"failed {run.failed}, {run.wall_s:.0f} s",
                        flush=True,
                    )
                    out_json.write_text(json.dumps(summary, indent=1) + "\n")
    except KeyboardInterrupt:
        print("interrupted; the deployment was stopped", file=sys.stderr)
        return 130
    summary["wall_s"] = round(time.monotonic() - started, 1)
    out_json.write_text(json.dumps(summary, indent=1) + "\n")
    print(report(summary))
    print(f"total {summary['wall_s']:.0f} s")
    print(f"Command: {command}")
    print(f"wrote {out_json}\nwrote {plot(summary, out_png)}")
    left = [x for r in summary["runs"] for x in r["leftovers"]]
    return 1 if left else 0


if __name__ == "__main__":
    sys.exit(main())
