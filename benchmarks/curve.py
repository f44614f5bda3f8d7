"""The cost of CurveZMQ: the pipeline's ceiling with every ZeroMQ socket authenticated and encrypted, and without.

Two deployments of examples/agg (frontend with its embedded processor + 2 mocker workers at speedup 1e6, so no
engine time: only the pipeline), started as run.sh does: ``curve`` with the deployment's keys (the default, as
run.sh makes them), ``plain`` with ``ZDYN_KEYS_DIR=`` and ``ZDYN_INSECURE=1``. Each gets the same closed-loop load
from ``zdyn bench`` (streaming chat, 200 prompt tokens, 64 output tokens with ``ignore_eos``, concurrency 64),
alternating, ``--reps`` times; each repetition of both holds the benchmark lock. The target: CURVE costs at most
10 % of requests/s.

    python -m benchmarks.curve --reps 3                          # ~2 min
    python -m benchmarks.curve --report benchmarks/results/curve.json
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from zdyn.bench.deploy import ZdynSpec, start
from zdyn.bench.host import bench_lock
from zdyn.bench.inputs import model_or_tiny
from zdyn.bench.results import (
    RESULTS,
    command,
    fmt,
    footer,
    median,
    provenance,
    ratio,
    read_json,
    summary_table,
    write_json,
)
from zdyn.bench.runs import Load, bench_argv, cpu_pct, measure

FAST = 1e6
SYSTEMS = ("curve", "plain")
ENV = {"curve": {}, "plain": {"ZDYN_KEYS_DIR": "", "ZDYN_INSECURE": "1"}}
COLUMNS = [("req/s", lambda r: r["req_s"], None), ("TTFT p50 ms", lambda r: r["ttft_p50"], None),
           ("TTFT p99 ms", lambda r: r["ttft_p99"], None), ("frontend ms/req", lambda r: cpu_ms(r, "frontend"), 2),
           ("workers ms/req", lambda r: cpu_ms(r, "worker"), 2),
           ("frontend CPU %", lambda r: cpu_pct(r, "frontend"), 0),
           ("other processes %", lambda r: cpu_pct(r, "other"), 0), ("failed", lambda r: r["failed"], 0)]  # fmt: skip


def cpu_ms(row: dict[str, Any], prefix: str) -> float:
    """CPU milliseconds per request of the roles named ``prefix``: less sensitive than req/s to a busy machine."""
    return cpu_pct(row, prefix) * row["window_s"] * 10.0 / row["completed"] if row["completed"] else math.nan


def run(system: str, rep: int, model: Path, load: Load, work: Path) -> dict[str, Any]:
    logs = work / f"{system}-{rep}"
    spec = ZdynSpec("agg", workers=2, model=str(model), worker_args=("--speedup", f"{FAST:g}"), env=ENV[system])
    with start(spec, logs) as dep:
        argv = bench_argv(dep.base_url, model, logs / "bench.json", f"{system} #{rep}", "--model", dep.model,
                          *load.flags())  # fmt: skip
        row = measure(dep, argv, logs / "bench.log", interval_s=0.02) | {"system": system, "rep": rep}
    keyed = "CURVE keys from" in (logs / "frontend.log").read_text()
    assert keyed == (system == "curve"), f"{system}: the frontend {'did' if keyed else 'did not'} use keys"
    print(f"  {system:6} rep {rep}: {row['req_s']:7.1f} req/s TTFT p50 {row['ttft_p50']:6.1f} ms, failed "
          f"{row['failed']}", file=sys.stderr, flush=True)  # fmt: skip
    return row


def report(doc: dict[str, Any]) -> str:
    rows, load = doc["rows"], doc["settings"]["load"]
    groups = {s: [r for r in rows if r["system"] == s] for s in SYSTEMS}
    per_rep = [
        round(c["req_s"] / p["req_s"], 3) for c in groups["curve"] for p in groups["plain"] if c["rep"] == p["rep"]
    ]
    r = ratio(median(x["req_s"] for x in groups["curve"]), median(x["req_s"] for x in groups["plain"]))
    cpu = {k: ratio(median(cpu_ms(x, k) for x in groups["curve"]), median(cpu_ms(x, k) for x in groups["plain"]))
           for k in ("frontend", "worker")}  # fmt: skip
    return "\n".join([
        f"agg, 2 mocker workers at speedup 1e6, concurrency {load['concurrency']}, {load['requests']} requests after "
        f"{load['warmups']} warm-ups, {load['input_len']} in / {load['output_len']} out; median (range) over reps",
        summary_table(groups, COLUMNS, "sockets"),
        f"\ncurve / plain req/s: {fmt(r)} (per repetition: {', '.join(f'{x:.2f}' for x in per_rep)}); target >= 0.90",
        f"curve / plain CPU per request: frontend {fmt(cpu['frontend'])}, workers {fmt(cpu['worker'])}",
    ])  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.curve", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="config + tokenizer (default: the tiny Llama)")
    p.add_argument("--reps", type=int, default=3, help="repetitions of both, alternating")
    p.add_argument("--requests", type=int, default=500)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--warmups", type=int, default=32)
    p.add_argument("--out", type=Path, default=RESULTS / "curve.json")
    p.add_argument("--report", type=Path, metavar="JSON", help="only print the tables of a finished run")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.report:
        print(report(read_json(args.report)))
        return 0
    cmd = command("benchmarks.curve", argv)
    load = Load(concurrency=args.concurrency, requests=args.requests, warmups=args.warmups)
    model, work = model_or_tiny(args.model), Path(tempfile.mkdtemp(prefix="zdyn-curve-"))
    rows: list[dict[str, Any]] = []
    doc: dict[str, Any] = {"benchmark": "curve", "command": cmd, **provenance(), "rows": rows,
                           "settings": {"load": asdict(load), "speedup": FAST, "reps": args.reps,
                                        "work_dir": str(work)}}  # fmt: skip
    t0 = time.monotonic()
    for rep in range(args.reps):
        with bench_lock():
            for system in SYSTEMS if rep % 2 == 0 else SYSTEMS[::-1]:
                rows.append(run(system, rep, model, load, work))
    doc["wall_s"] = time.monotonic() - t0
    write_json(args.out, doc)
    print(report(doc))
    print(footer(cmd, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
