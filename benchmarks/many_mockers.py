"""What do 16 simulated workers cost on one box, as 16 processes or as one process with ``--num-workers 16``?

examples/agg with 16 mocker workers (speedup 1, max-model-len 2048), started as run.sh starts it: once as 16 worker
processes, once as one worker process hosting 16 simulated workers. Idle and loaded memory (RSS) of the workers,
and the CPU of workers and frontend under ``zdyn bench`` (random 512 in / 64 out, Poisson 16 req/s for 20 s). Each
layout holds the benchmark lock.

    python -m benchmarks.many_mockers             # ~1.5 min
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from zdyn.bench.deploy import ZdynSpec, start
from zdyn.bench.host import bench_lock, by_group, memory_mib
from zdyn.bench.inputs import model_or_tiny
from zdyn.bench.procs import wait_for_workers
from zdyn.bench.results import RESULTS, command, fmt, footer, provenance, table, write_json
from zdyn.bench.runs import bench_argv, cpu_pct, measure

LAYOUTS = {"16 processes": (16, ()), "1 process, --num-workers 16": (1, ("--num-workers", "16"))}


def worker_rss(groups: dict[str, int]) -> float:
    return sum(v for k, v in memory_mib(by_group(groups)).items() if k.startswith("worker"))


def layout(name: str, model: Path, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    processes, extra = LAYOUTS[name]
    flags = ("--max-model-len", "2048", "--log-level", "warning", *extra)
    spec = ZdynSpec("agg", workers=processes, model=str(model), worker_args=flags)
    logs = work / name.split(",")[0].replace(" ", "-")
    with bench_lock(), start(spec, logs) as dep:
        wait_for_workers(dep.base_url, args.workers, dep.group, timeout_s=60)  # simulated workers, not processes
        idle = worker_rss(dep.roles())
        load = ["--dataset", "random", "--input-len", "512", "--output-len", "64", "--ignore-eos", "--request-rate",
                f"{args.rate:g}", "--duration", f"{args.duration:g}", "--no-progress"]  # fmt: skip
        row = measure(dep, bench_argv(dep.base_url, model, logs / "bench.json", name, *load), logs / "bench.log")
        loaded = worker_rss(dep.roles())
    return {"layout": name, "worker_processes": processes, "idle_rss_mib": idle, "loaded_rss_mib": loaded,
            "workers_cpu_pct": cpu_pct(row, "worker"), "frontend_cpu_pct": cpu_pct(row, "frontend"),
            "workers_cpu_s": sum(v for k, v in row["cpu_s"].items() if k.startswith("worker")),
            "window_s": row["window_s"], "completed": row["completed"], "num_requests": row["num_requests"],
            "ttft_p50": row["ttft_p50"], "command": row["command"]}  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m benchmarks.many_mockers", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="config + tokenizer (default: the tiny Llama)")
    p.add_argument("--rate", type=float, default=16.0, help="offered req/s (default %(default)s)")
    p.add_argument("--duration", type=float, default=20.0, help="seconds of load (default %(default)s)")
    p.add_argument("--out", type=Path, default=RESULTS / "many-mockers.json")
    args = p.parse_args(argv)
    args.workers = 16
    cmd, model, work = command("benchmarks.many_mockers", argv), model_or_tiny(args.model), Path(tempfile.mkdtemp())
    rows = [layout(name, model, args, work) for name in LAYOUTS]
    write_json(args.out, {"benchmark": "many-mockers", "command": cmd, **provenance(), "rows": rows})
    print(table(["layout", "idle RSS MiB (per worker)", "loaded RSS MiB", "workers CPU-s (% of a core)",
                 "frontend CPU %", "ok / sent", "TTFT p50 ms"],
                [[r["layout"], f"{fmt(r['idle_rss_mib'], 0)} ({fmt(r['idle_rss_mib'] / 16, 1)})",
                  fmt(r["loaded_rss_mib"], 0), f"{fmt(r['workers_cpu_s'], 1)} in {fmt(r['window_s'], 0)} s "
                  f"({fmt(r['workers_cpu_pct'], 1)} %)", fmt(r["frontend_cpu_pct"], 0),
                  f"{r['completed']}/{r['num_requests']}", fmt(r["ttft_p50"], 0)] for r in rows]))  # fmt: skip
    print(footer(cmd, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
