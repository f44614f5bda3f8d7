"""Long prompts against NVIDIA Dynamo 1.6.1: requests/s, TTFT and memory over an input-length sweep, KV router on
and off, and zdyn with 0 (embedded), 1 or 2 separate processors.

The ceiling's deployments (2 mocker workers at speedup 1e6: no engine time, the pipeline is all that is measured;
block 64, 16384 blocks, 256 seqs, 8192 batched tokens) with the long-context copy of tiny-llama's tokenizer, driven
by ``zdyn bench`` (streaming chat, ``--lengths`` prompt tokens, 64 output tokens with ``ignore_eos``, closed loop at
``--concurrency``). For every repetition and length, each system runs once with each router, the order alternating
between repetitions; one length of one repetition holds the benchmark lock (``$ZDYN_BENCH_LOCK``).

Systems: ``zdyn`` (frontend with its embedded processor), ``zdyn-pN`` (N separate processor processes), ``dynamo``.
Routers: ``rr`` (round-robin) and ``kv`` (zdyn: agg_route with the router inside the frontend or processor; Dynamo:
``--router-mode kv``). Memory per in-flight request: (peak RSS of the serving processes during the run - their RSS
before it) / concurrency.

    python -m benchmarks.long_prompts --lengths 200,1000,4000,16000 --routers rr,kv --reps 3 --requests 100
    python -m benchmarks.long_prompts --lengths 4000 --systems zdyn,zdyn-p1,zdyn-p2 --routers rr   # processors
    python -m benchmarks.long_prompts --report benchmarks/results/long_prompts.json
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from zdyn.bench.deploy import Deployment, ZdynSpec, start
from zdyn.bench.dynamo_peer import DYNAMO_VERSION, DynamoSpec, start_dynamo
from zdyn.bench.host import CpuSampler, bench_lock, by_group
from zdyn.bench.inputs import LONG_MODEL_LEN, long_context_model
from zdyn.bench.results import (
    RESULTS,
    command,
    fmt,
    footer,
    median,
    provenance,
    pyplot,
    ratio,
    read_json,
    save_figure,
    table,
    write_json,
)
from zdyn.bench.runs import Load, bench_argv, cpu_by_kind, run_bench

FAST = 1e6  # no engine time


@dataclass
class Context:
    model: Path
    concurrency: int
    requests: dict[int, int]  # measured requests per prompt length
    warmups: int
    work: Path
    rows: list[dict[str, Any]] = field(default_factory=list)


def processors_of(system: str) -> int:
    m = re.fullmatch(r"zdyn-p(\d+)", system)
    return int(m.group(1)) if m else 0


def deployment(system: str, router: str, model: Path, logs: Path) -> contextlib.AbstractContextManager[Deployment]:
    if system.startswith("zdyn"):
        args = ("--speedup", f"{FAST:g}", "--max-model-len", str(LONG_MODEL_LEN))
        procs = processors_of(system)
        if router == "kv":
            # in-process routing: the frontend's embedded processor (or each separate processor) holds the router
            spec = ZdynSpec("agg_route", workers=2, model=str(model), worker_args=args, router_in_process=True)
            if procs:
                raise ValueError("separate processors are measured with --routers rr")
        else:
            spec = ZdynSpec("agg", workers=2, model=str(model), worker_args=args, processors=procs)
        return start(spec, logs)
    mode = "kv" if router == "kv" else "round-robin"
    return start_dynamo(DynamoSpec(model, workers=2, router_mode=mode, speedup=FAST), logs, timeout_s=120.0)


def run(ctx: Context, system: str, router: str, length: int, rep: int) -> dict[str, Any]:
    """Start the system, drive it with ``zdyn bench``, stop it; CPU per role and memory per request in flight."""
    logs = ctx.work / f"{system}-{router}-{length}-{rep}"
    load = Load(
        concurrency=ctx.concurrency, requests=ctx.requests[length], warmups=ctx.warmups, input_len=length, seed=rep
    )
    with deployment(system, router, ctx.model, logs) as dep:
        argv = bench_argv(dep.base_url, ctx.model, logs / "bench.json", f"{system} {router} {length} #{rep}",
                          "--model", dep.model, *load.flags(), "--no-progress")  # fmt: skip
        groups = dep.roles()
        labels = by_group(groups)
        with CpuSampler(groups.values(), interval_s=0.05) as sampler:
            sampler.mark()
            before = sampler.peak_rss_mib(labels)  # only the idle sample so far
            bench = run_bench(argv, logs / "bench.log", 900.0, sampler)
        t0, t1 = bench.window
        cpu = sampler.usage(t0, t1, by_group({**groups, "load generator": bench.pgid}))
        peak = sampler.peak_rss_mib(labels)
    row = {**bench.figures(), "window_s": t1 - t0, "cpu_s": cpu, "command": bench.command, "system": system,
           "router": router, "length": length, "rep": rep, "rss_idle_mib": round(sum(before.values()), 1),
           "rss_peak_mib": round(sum(peak.values()), 1)}  # fmt: skip
    row["kib_per_inflight"] = round(1024 * (row["rss_peak_mib"] - row["rss_idle_mib"]) / ctx.concurrency, 1)
    ctx.rows.append(row)
    cpu_pct = cpu_by_kind(row)
    print(f"  {system:8} {router} {length:6} rep {rep}: {row['req_s']:7.1f} req/s TTFT p50 {row['ttft_p50']:7.1f} "
          f"ms, failed {row['failed']}, CPU % {cpu_pct}, +{row['kib_per_inflight']:.0f} KiB/in-flight",
          file=sys.stderr, flush=True)  # fmt: skip
    return row


def valid(rows: Sequence[dict[str, Any]], system: str, router: str, length: int) -> list[dict[str, Any]]:
    return [r for r in rows if (r["system"], r["router"], r["length"]) == (system, router, length) and not r["failed"]]


def med(rows: Sequence[dict[str, Any]], key: str) -> float:
    return median(r[key] for r in rows) if rows else float("nan")


def cpu_ms_per_req(rows: Sequence[dict[str, Any]], kind: str) -> float:
    return med([{"v": cpu_by_kind(r).get(kind, 0.0) * r["window_s"] * 10.0 / r["completed"]} for r in rows], "v")


def serving_ms(rows: Sequence[dict[str, Any]]) -> float:
    """CPU ms per request of the serving processes (frontend, processors, workers; not the load generator)."""
    return sum(cpu_ms_per_req(rows, kind) for kind in ("frontend", "processor", "worker"))


def report(doc: dict[str, Any]) -> str:
    rows, s = doc["rows"], doc["settings"]
    systems, routers, lengths = s["systems"], s["routers"], s["lengths"]
    counts = s["requests"]
    counts = "/".join(str(n) for n in counts.values()) if isinstance(counts, dict) else counts
    out = [f"concurrency {s['concurrency']}, {counts} requests after {s['warmups']} warm-ups, 64 output tokens, "
           f"2 mocker workers at speedup 1e6; medians over repetitions [per-repetition values]"]  # fmt: skip
    body = []
    for length in lengths:
        for router in routers:
            for system in systems:
                if not (v := valid(rows, system, router, length)):
                    continue
                body.append([str(length), router, system, fmt(med(v, "req_s")),
                             ", ".join(f"{r['req_s']:.0f}" for r in sorted(v, key=lambda r: r["rep"])),
                             fmt(med(v, "ttft_p50")), fmt(med(v, "ttft_p99")), fmt(med(v, "e2e_p50")),
                             fmt(cpu_ms_per_req(v, "frontend"), 2), fmt(cpu_ms_per_req(v, "processor"), 2),
                             fmt(cpu_ms_per_req(v, "worker"), 2), fmt(cpu_ms_per_req(v, "bench"), 2),
                             fmt(med(v, "kib_per_inflight"), 0)])  # fmt: skip
    out.append(table(["prompt", "router", "system", "req/s", "per rep", "TTFT p50", "TTFT p99", "E2E p50",
                      "frontend ms/req", "processors ms/req", "workers ms/req", "client ms/req",
                      "KiB/in-flight"], body))  # fmt: skip
    if "dynamo" in systems:
        out.append("\nzdyn / Dynamo, ratios of medians (targets: req/s >= 1.5 at 200, >= 1.3 at 4k and 16k; "
                   "TTFT p50 <= 0.8); CPU efficiency = Dynamo's serving CPU ms per request / zdyn's (the req/s "
                   "ratio both would reach on cores of their own)")  # fmt: skip
        body = []
        for length in lengths:
            for router in routers:
                d = valid(rows, "dynamo", router, length)
                for system in (x for x in systems if x != "dynamo"):
                    if (z := valid(rows, system, router, length)) and d:
                        per = [round(a["req_s"] / b["req_s"], 2) for a in z for b in d if a["rep"] == b["rep"]]
                        body.append([str(length), router, system, fmt(ratio(med(z, "req_s"), med(d, "req_s"))),
                                     fmt(ratio(med(z, "ttft_p50"), med(d, "ttft_p50"))),
                                     ", ".join(f"{x:.2f}" for x in per),
                                     fmt(ratio(serving_ms(d), serving_ms(z)))])  # fmt: skip
        out.append(table(["prompt", "router", "system", "req/s", "TTFT p50", "req/s per repetition",
                          "CPU efficiency"], body))  # fmt: skip
    return "\n".join(out)


def plot(doc: dict[str, Any], path: Path) -> Path:
    rows, s, plt = doc["rows"], doc["settings"], pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(18, 5))
    for k, system in enumerate(s["systems"]):
        for router, style in (("rr", "-"), ("kv", "--")):
            pts = [(n, valid(rows, system, router, n)) for n in s["lengths"]]
            pts = [(n, v) for n, v in pts if v]
            if not pts:
                continue
            xs, label = [n for n, _ in pts], f"{system} {router}"
            for ax, key in zip(axes, ("req_s", "ttft_p50", "kib_per_inflight"), strict=True):
                ax.plot(xs, [med(v, key) for _, v in pts], style, marker="o", color=f"C{k}", label=label)
    for ax, ylabel in zip(axes, ("req/s", "TTFT p50 ms", "KiB of RSS per request in flight"), strict=True):
        ax.set(xscale="log", xlabel="prompt tokens", ylabel=ylabel)
        ax.legend(fontsize=8)
    axes[1].set_yscale("log")
    title = (f"zdyn vs Dynamo {DYNAMO_VERSION} over prompt length: concurrency {s['concurrency']}, 64 output tokens, "
             "2 mocker workers, no engine time")  # fmt: skip
    return save_figure(fig, path, title)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.long_prompts", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="config + tokenizer (default: tiny-llama with a 262k context)")
    p.add_argument("--lengths", default="200,1000,4000,16000", help="prompt tokens, comma-separated")
    p.add_argument("--systems", default="zdyn,dynamo", help="zdyn, zdyn-pN (N separate processors), dynamo")
    p.add_argument("--routers", default="rr,kv", help="rr and/or kv")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--requests", default="100",
                   help="measured requests: one number, or one per length (short prompts need more for a window "
                   "of a second or more: 1500,800,300,150)")  # fmt: skip
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--warmups", type=int, default=16)
    p.add_argument("--out", type=Path, default=RESULTS / "long_prompts.json")
    p.add_argument("--report", type=Path, metavar="JSON", help="only the tables and plot of a (partial) run's file")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.report:  # the tables (and the plot, next to the file) of a finished or interrupted run
        doc = read_json(args.report)
        print(report(doc))
        print(f"wrote {plot(doc, args.report.with_suffix('.png'))}")
        return 0
    cmd = command("benchmarks.long_prompts", argv)
    systems, routers = args.systems.split(","), args.routers.split(",")
    lengths = [int(x) for x in args.lengths.split(",")]
    counts = [int(x) for x in args.requests.split(",")]
    if len(counts) not in (1, len(lengths)):
        raise SystemExit("--requests: one number, or one per --lengths value")
    requests = dict(zip(lengths, counts * len(lengths) if len(counts) == 1 else counts, strict=True))
    ctx = Context(args.model or long_context_model(), args.concurrency, requests, args.warmups,
                  Path(tempfile.mkdtemp(prefix="zdyn-long-")))  # fmt: skip
    settings = {"systems": systems, "routers": routers, "lengths": lengths, "reps": args.reps,
                "concurrency": args.concurrency, "requests": requests, "warmups": args.warmups,
                "load": asdict(Load()), "dynamo_version": DYNAMO_VERSION, "work_dir": str(ctx.work)}  # fmt: skip
    doc: dict[str, Any] = {"benchmark": "long_prompts", "command": cmd, **provenance(), "rows": ctx.rows,
                           "settings": settings}  # fmt: skip
    t0 = time.monotonic()
    for rep in range(args.reps):
        for length in lengths:
            with bench_lock():  # one length of one repetition: every system and router back to back
                for router in routers:
                    for system in systems if rep % 2 == 0 else systems[::-1]:
                        if router == "kv" and processors_of(system):
                            continue
                        try:
                            run(ctx, system, router, length, rep)
                        except RuntimeError as e:
                            print(f"  {system} {router} {length} rep {rep} failed: {e}", file=sys.stderr)
            write_json(args.out, doc | {"wall_s": time.monotonic() - t0})
    doc["wall_s"] = time.monotonic() - t0
    write_json(args.out, doc)
    print(report(doc))
    print(footer(cmd, args.out, plot(doc, args.out.with_suffix(".png"))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
