"""The pipeline's ceiling against NVIDIA Dynamo 1.6.1: how many requests/s does each serving stack stream with no
engine time, and what latency does it add at the same load?

Each system gets the same closed-loop load from ``zdyn bench`` (streaming chat, 200 prompt tokens, 64 output tokens
with ``ignore_eos``, concurrency 64, 500 measured requests after 32 warm-ups), one system at a time on the same 2
cores, alternating, ``--reps`` times; each repetition of all systems holds the benchmark lock.

* ``zdyn``: examples/agg (frontend with its embedded processor) + 2 mocker workers, started as its run.sh does.
* ``dynamo``: Dynamo's frontend with its round-robin router + 2 ``dynamo.mocker`` processes (``benchmarks/peers``).
* ``zdyn-plain``: ``zdyn`` without CURVE keys (``ZDYN_INSECURE=1``), as every zdyn ran before the security work.
* ``zdyn-tree``: ``zdyn`` with the code of another checkout (``--zdyn-tree DIR``, e.g. a ``git worktree`` of an older
  commit) on ``PYTHONPATH``: the same deployment before and after a change, alternating in one run.

Both mockers run with Dynamo's defaults (block 64, 16384 blocks, 256 seqs, 8192 batched tokens) at speedup 1e6: no
engine time, only the pipeline. CPU per role is read from /proc over the measured window. Later phases, once each:
``kv`` (Dynamo with its KV router), ``rate`` (both at the same offered Poisson load, ``--rate``), ``speedup1`` (both
with engine time, then zdyn with its clock scaled so that its decode step takes as long as Dynamo's).

    python -m benchmarks.ceiling --reps 7                                   # ~6 min
    python -m benchmarks.ceiling --phases main --reps 1 --requests 100      # a quick look
    python -m benchmarks.ceiling --report benchmarks/results/ceiling.json   # re-print a run's tables
    python -m benchmarks.ceiling --phases main --systems zdyn,zdyn-plain,zdyn-tree --zdyn-tree /tmp/old --reps 3
"""

from __future__ import annotations

import argparse
import contextlib
import math
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from zdyn.bench.deploy import Deployment, ZdynSpec, start
from zdyn.bench.dynamo_peer import DYNAMO_VERSION, DynamoSpec, start_dynamo
from zdyn.bench.host import bench_lock
from zdyn.bench.inputs import model_or_tiny
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
    summary_table,
    table,
    write_json,
)
from zdyn.bench.runs import Load, bench_argv, cpu_pct, idle_workers, measure

FAST = 1e6  # "no engine time" (Dynamo's 0 behaves like 1)
PHASES = ("main", "kv", "rate", "speedup1")
SYSTEMS = ("zdyn", "dynamo")
EXTRA_SYSTEMS = ("zdyn-plain", "zdyn-tree")
LABELS = {"zdyn": "zdyn (frontend + 2 mocker procs)", "dynamo": f"Dynamo {DYNAMO_VERSION} round-robin",
          "zdyn-plain": "zdyn without CURVE keys", "zdyn-tree": "zdyn of --zdyn-tree, without CURVE keys",
          "dynamo-kv": f"Dynamo {DYNAMO_VERSION} kv router (info)", "zdyn-rate": "zdyn, open loop",
          "dynamo-rate": f"Dynamo {DYNAMO_VERSION} round-robin, open loop"}  # fmt: skip
COLUMNS = [("req/s", lambda r: r["req_s"], None), ("output tok/s", lambda r: r["out_tok_s"], 0),
           ("TTFT p50 ms", lambda r: r["ttft_p50"], None), ("TTFT p99 ms", lambda r: r["ttft_p99"], None),
           ("E2E p50 ms", lambda r: r["e2e_p50"], None), ("SSE chunks/req", lambda r: r.get("chunks_per_req"), None),
           ("failed", lambda r: r["failed"], 0)]  # fmt: skip
CPU_COLUMNS = [("frontend %", lambda r: cpu_pct(r, "frontend"), 0), ("workers %", lambda r: cpu_pct(r, "worker"), 0),
               ("frontend ms/req", lambda r: cpu_ms(r, "frontend"), 2),
               ("workers ms/req", lambda r: cpu_ms(r, "worker"), 2),
               ("load generator %", lambda r: cpu_pct(r, "load generator"), 0),
               ("other processes %", lambda r: cpu_pct(r, "other"), 0)]  # fmt: skip


def cpu_ms(row: dict[str, Any], prefix: str) -> float:
    return cpu_pct(row, prefix) * row["window_s"] * 10.0 / row["completed"] if row["completed"] else math.nan


@dataclass
class Context:
    model: Path
    load: Load
    work: Path
    rows: list[dict[str, Any]] = field(default_factory=list)
    zdyn_tree: Path | None = None
    max_other_cpu: float | None = None  # % of a core other processes may use during a valid measurement


INSECURE = {"ZDYN_KEYS_DIR": "", "ZDYN_INSECURE": "1"}


def deployment(ctx: Context, system: str, speedup: float, logs: Path) -> contextlib.AbstractContextManager[Deployment]:
    model = ctx.model
    if system.startswith("zdyn"):
        env = {} if system in ("zdyn", "zdyn-rate") else INSECURE
        if system == "zdyn-tree":
            assert ctx.zdyn_tree is not None, "zdyn-tree needs --zdyn-tree"
            # PYTHONSAFEPATH: `python -m zdyn.cli` must not import zdyn from the working directory (this checkout)
            env = {**env, "PYTHONPATH": str(ctx.zdyn_tree), "PYTHONSAFEPATH": "1"}
        spec = ZdynSpec("agg", workers=2, model=str(model), worker_args=("--speedup", f"{speedup:g}"), env=env)
        return start(spec, logs)
    router = "kv" if system == "dynamo-kv" else "round-robin"
    return start_dynamo(DynamoSpec(model, workers=2, router_mode=router, speedup=speedup), logs)


def run(ctx: Context, system: str, rep: int, speedup: float = FAST, load: Load | None = None) -> dict[str, Any]:
    """Start ``system``, drive it with ``zdyn bench``, stop it. The caller holds the lock."""
    logs = ctx.work / f"{system}-{rep}-{speedup:g}"
    with deployment(ctx, system, speedup, logs) as dep:
        argv = bench_argv(dep.base_url, ctx.model, logs / "bench.json", f"{system} #{rep}", "--model", dep.model,
                          *(load or ctx.load).flags())  # fmt: skip
        row = measure(dep, argv, logs / "bench.log", interval_s=0.02) | {
            "system": system,
            "rep": rep,
            "speedup": speedup,
        }
    if idle := idle_workers(row):
        row["invalid"] = f"idle during the run: {', '.join(idle)}"
    elif ctx.max_other_cpu is not None and cpu_pct(row, "other") > ctx.max_other_cpu:
        row["invalid"] = f"other processes used {cpu_pct(row, 'other'):.0f}% of a core (> --max-other-cpu)"
    ctx.rows.append(row)
    print(f"  {system:12} rep {rep} speedup {speedup:g}: {row['req_s']:7.1f} req/s TTFT p50 {row['ttft_p50']:6.1f} ms "
          f"p99 {row['ttft_p99']:6.1f} ms, chunks/req {row.get('chunks_per_req', 0):.1f}, failed {row['failed']}, "
          f"other CPU {cpu_pct(row, 'other'):.0f}% {row.get('invalid', '')}", file=sys.stderr, flush=True)  # fmt: skip
    return row


def valid(rows: Sequence[dict[str, Any]], system: str, speedup: float | None = FAST) -> list[dict[str, Any]]:
    return [r for r in rows if r["system"] == system and "invalid" not in r and speedup in (None, r["speedup"])]


def ratios(rows: Sequence[dict[str, Any]], a: str, b: str) -> dict[str, Any]:
    za, zb = valid(rows, a), valid(rows, b)
    out: dict[str, Any] = {k: ratio(median(r[k] for r in za), median(r[k] for r in zb))
                           for k in ("req_s", "out_tok_s", "ttft_p50", "ttft_p99", "e2e_p50")}  # fmt: skip
    out["req_s_per_rep"] = [round(x["req_s"] / y["req_s"], 3) for x in za for y in zb if x["rep"] == y["rep"]]
    return out


def report(doc: dict[str, Any]) -> str:
    rows, load = doc["rows"], doc["settings"]["load"]
    out = [f"{r['system']} rep {r['rep']} left out: {r['invalid']}" for r in rows if "invalid" in r]
    main = {LABELS[s]: valid(rows, s) for s in (*SYSTEMS, *EXTRA_SYSTEMS, "dynamo-kv") if valid(rows, s)}
    out += [f"speedup 1e6: concurrency {load['concurrency']}, {load['requests']} requests after {load['warmups']} "
            f"warm-ups, {load['input_len']} in / {load['output_len']} out; median (range) over repetitions",
            summary_table(main, COLUMNS, "system"), "\nCPU over the measured window (% of one core; 2 cores = 200 %)",
            summary_table(main, CPU_COLUMNS, "system")]  # fmt: skip
    if valid(rows, "zdyn") and valid(rows, "dynamo"):
        r = ratios(rows, "zdyn", "dynamo")
        out += ["\nzdyn / Dynamo (ratios of medians; target: req/s and tok/s >= 1.0, TTFT p50 <= 1.0)",
                table(["req/s", "output tok/s", "TTFT p50", "TTFT p99", "E2E p50", "req/s per repetition"],
                      [[*(fmt(r[k]) for k in ("req_s", "out_tok_s", "ttft_p50", "ttft_p99", "e2e_p50")),
                        ", ".join(f"{x:.2f}" for x in r["req_s_per_rep"])]])]  # fmt: skip
    for a, b in (("zdyn", "zdyn-tree"), ("zdyn-plain", "zdyn-tree")):
        if valid(rows, a) and valid(rows, b):
            r = ratios(rows, a, b)
            out += [f"\n{a} / {b} (ratios of medians; {b}: {doc['settings'].get('zdyn_tree')})",
                    table(["req/s", "output tok/s", "TTFT p50", "TTFT p99", "E2E p50", "req/s per repetition"],
                          [[*(fmt(r[k]) for k in ("req_s", "out_tok_s", "ttft_p50", "ttft_p99", "e2e_p50")),
                            ", ".join(f"{x:.2f}" for x in r["req_s_per_rep"])]])]  # fmt: skip
    if rate := {LABELS[s]: valid(rows, s) for s in ("zdyn-rate", "dynamo-rate") if valid(rows, s)}:
        rl = doc["settings"]["rate_load"]
        out += [f"\nsame offered load: {rl['request_rate']:g} req/s Poisson (at most {rl['concurrency']} in flight), "
                f"{rl['requests']} requests", summary_table(rate, COLUMNS, "system")]  # fmt: skip
        if len(rate) == 2:
            r = ratios(rows, "zdyn-rate", "dynamo-rate")
            out.append(
                f"zdyn/Dynamo TTFT p50 {fmt(r['ttft_p50'])}, p99 {fmt(r['ttft_p99'])}, E2E p50 {fmt(r['e2e_p50'])}"
            )
    if slow := [r for r in rows if r["speedup"] < FAST and "invalid" not in r]:
        out += ["\nwith engine time (each mocker's own timing model), one run each; ms",
                table(["system", "speedup", "req/s", "TTFT p50", "ITL p50", "ITL p99", "TPOT p50", "E2E p50",
                       "chunks/req"], [[r["system"], f"{r['speedup']:g}", *(fmt(r[k]) for k in ("req_s", "ttft_p50",
                       "itl_p50", "itl_p99", "tpot_p50", "e2e_p50", "chunks_per_req"))] for r in slow])]  # fmt: skip
        if m := doc.get("speedup_matched"):
            out.append(f"zdyn at speedup {m['zdyn_speedup']:g} = its ITL p50 at speedup 1 / Dynamo's: both engines "
                       "then take about as long per decode step")  # fmt: skip
    return "\n".join(out)


def plot(doc: dict[str, Any], path: Path) -> Path:
    rows, plt = doc["rows"], pyplot()
    systems = [s for s in (*SYSTEMS, *EXTRA_SYSTEMS, "dynamo-kv") if valid(rows, s)]
    x, colors = np.arange(len(systems)), ["C0" if s.startswith("zdyn") else "C1" for s in systems]
    fig, axes = plt.subplots(1, 3, figsize=(18, 5))
    req = [[r["req_s"] for r in valid(rows, s)] for s in systems]
    med = [median(v) for v in req]
    err = [[m - min(v) for m, v in zip(med, req, strict=True)], [max(v) - m for m, v in zip(med, req, strict=True)]]
    axes[0].bar(x, med, yerr=err, capsize=4, color=colors)
    axes[0].set(xticks=x, xticklabels=systems, ylabel="req/s", title="speedup 1e6: requests/s (median, range)")
    for k, key in enumerate(("ttft_p50", "ttft_p99", "e2e_p50")):
        axes[1].bar(x + (k - 1) * 0.27, [median(r[key] for r in valid(rows, s)) for s in systems], 0.27, label=key)
    axes[1].set(xticks=x, xticklabels=systems, ylabel="ms", title="speedup 1e6: latency (medians)")
    axes[1].legend()
    bottom = np.zeros(len(systems))
    for role, color in (("frontend", "C0"), ("worker", "C2"), ("load generator", "C3"), ("other", "C7")):
        share = np.array([median(cpu_pct(r, role) for r in valid(rows, s)) for s in systems])
        axes[2].bar(x, share, bottom=bottom, label=role, color=color)
        bottom += share
    axes[2].axhline(200, color="k", lw=0.8, ls="--")
    axes[2].set(xticks=x, xticklabels=systems, ylabel="% of one core", title="CPU over the measured window")
    axes[2].legend(fontsize=8)
    load = doc["settings"]["load"]
    title = (f"zdyn vs Dynamo {DYNAMO_VERSION}: concurrency {load['concurrency']}, {load['input_len']} in / "
             f"{load['output_len']} out, 2 mocker workers, no engine time")  # fmt: skip
    return save_figure(fig, path, title)


def tree_label(tree: Path | None) -> str | None:
    """``DIR (commit)`` of a --zdyn-tree checkout."""
    if tree is None:
        return None
    head = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return f"{tree} ({head.stdout.strip() or 'not a git checkout'})"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ceiling", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="config + tokenizer (default: the tiny Llama)")
    p.add_argument("--reps", type=int, default=3, help="repetitions of the main systems, alternating")
    p.add_argument("--phases", default=",".join(PHASES), help=f"of {', '.join(PHASES)} (default: all)")
    p.add_argument("--systems", default=",".join(SYSTEMS), help="of the main phase, in the order of even reps, "
                   f"of {', '.join((*SYSTEMS, *EXTRA_SYSTEMS))} (default: %(default)s)")  # fmt: skip
    p.add_argument("--zdyn-tree", type=Path, help="a zdyn checkout, for the zdyn-tree system")
    p.add_argument("--max-other-cpu", type=float, help="leave out runs during which other processes (not the "
                   "deployment or the load generator) used more than this %% of a core: a busy shared box")  # fmt: skip
    p.add_argument("--requests", type=int, default=500)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--warmups", type=int, default=32)
    p.add_argument("--rate", type=float, default=400.0, help="offered load of the 'rate' phase, req/s")
    p.add_argument("--rate-reps", type=int, default=3, help="repetitions of the 'rate' phase")
    p.add_argument("--out", type=Path, default=RESULTS / "ceiling.json")
    p.add_argument("--report", type=Path, metavar="JSON", help="only print the tables of a finished run")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.report:
        print(report(read_json(args.report)))
        return 0
    cmd, phases = command("benchmarks.ceiling", argv), [p for p in args.phases.split(",") if p]
    load = Load(concurrency=args.concurrency, requests=args.requests, warmups=args.warmups)
    systems = tuple(s for s in args.systems.split(",") if s)
    if unknown := set(systems) - {*SYSTEMS, *EXTRA_SYSTEMS}:
        raise SystemExit(f"unknown systems: {', '.join(sorted(unknown))}")
    tree = args.zdyn_tree.resolve() if args.zdyn_tree else None
    ctx = Context(model_or_tiny(args.model), load, Path(tempfile.mkdtemp(prefix="zdyn-ceiling-")), zdyn_tree=tree,
                  max_other_cpu=args.max_other_cpu)  # fmt: skip
    doc: dict[str, Any] = {"benchmark": "ceiling", "command": cmd, **provenance(), "rows": ctx.rows,
                           "settings": {"load": asdict(load), "speedup": FAST, "reps": args.reps,
                                        "dynamo_version": DYNAMO_VERSION, "work_dir": str(ctx.work),
                                        "systems": systems, "zdyn_tree": tree_label(tree)}}  # fmt: skip
    t0 = time.monotonic()
    if "main" in phases:
        for rep in range(args.reps):
            with bench_lock():  # one repetition of every system back to back
                for system in systems if rep % 2 == 0 else systems[::-1]:
                    run(ctx, system, rep)
    if "kv" in phases:
        with bench_lock():
            run(ctx, "dynamo-kv", 0)
    if "rate" in phases:
        rate_load = Load(**{**asdict(load), "requests": 2 * load.requests, "request_rate": args.rate})
        doc["settings"]["rate_load"] = asdict(rate_load)
        for rep in range(args.rate_reps):
            with bench_lock():
                for system in ("zdyn-rate", "dynamo-rate")[:: 1 if rep % 2 == 0 else -1]:
                    run(ctx, system, rep, FAST, rate_load)
    if "speedup1" in phases:
        with bench_lock():
            z, d = run(ctx, "zdyn", 0, 1.0), run(ctx, "dynamo", 0, 1.0)
            matched = round(z["itl_p50"] / d["itl_p50"], 2) if d["itl_p50"] > 0 else 1.0  # the two mockers' decode
            run(ctx, "zdyn", 1, matched)  # steps differ: scale zdyn's clock so that its step takes as long
            doc["speedup_matched"] = {"zdyn_speedup": matched, "zdyn_itl_p50_at_1": z["itl_p50"],
                                      "dynamo_itl_p50_at_1": d["itl_p50"]}  # fmt: skip
    doc["wall_s"] = time.monotonic() - t0
    if valid(ctx.rows, "zdyn") and valid(ctx.rows, "dynamo"):
        doc["zdyn_over_dynamo"] = ratios(ctx.rows, "zdyn", "dynamo")
    write_json(args.out, doc)
    print(report(doc))
    print(footer(cmd, args.out, plot(doc, args.out.with_suffix(".png"))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
