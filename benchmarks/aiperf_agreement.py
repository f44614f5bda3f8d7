"""Do ``zdyn bench`` and NVIDIA's aiperf report the same figures for the same deployment under the same load?

One zdyn deployment (examples/agg, 2 mocker workers, speedup 1: real engine time) under a calm closed-loop load that
neither load generator nor the server is CPU-bound at (concurrency 8, 300 measured requests after 16 warm-ups, 200-token
prompts, 128 output tokens with ``ignore_eos``, streaming chat, fresh prompts per run). ``--rounds`` times
``zdyn bench`` then aiperf, alternating, under the benchmark lock. Reported: each tool's own summary figures (medians,
spread of runs, aiperf vs zdyn bench), CPU per process role over each tool's measured window, and the same figures
recomputed from both tools' per-request records with one definition (which shows how each tool paces a closed loop).

    python -m benchmarks.aiperf_agreement                # ~11 min
    python -m benchmarks.aiperf_agreement --speedup 1e6   # no engine time: the load generators become the bottleneck
    python -m benchmarks.aiperf_agreement --report benchmarks/results/aiperf-agreement.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from zdyn.bench.aiperf_peer import AIPERF_VERSION, run_aiperf
from zdyn.bench.deploy import Deployment, ZdynSpec, start
from zdyn.bench.host import CpuSampler, bench_lock, by_group
from zdyn.bench.inputs import model_or_tiny
from zdyn.bench.results import (
    RESULTS,
    command,
    fmt,
    footer,
    median,
    percentile,
    provenance,
    read_json,
    table,
    write_json,
)
from zdyn.bench.runs import Load, bench_argv, measure

TOOLS = ("zdyn bench", "aiperf")
TOLERANCE_PCT = 3.0  # "a few percent"
FIGURES = (("req/s", "req_s"), ("output tok/s", "out_tok_s"), ("TTFT p50 ms", "ttft_p50"), ("TTFT p99 ms", "ttft_p99"),
           ("E2E p50 ms", "e2e_p50"), ("TPOT p50 ms (aiperf: inter_token_latency)", "tpot_p50"))  # fmt: skip
RECORDS = (
    ("req/s = requests / (last end - first start)", "req_s"),
    ("mean requests in flight (Little)", "mean_in_flight"),
    ("mean time per request, start to stream end, ms", "mean_request_ms"),
    ("pacing gap p50 ms (slot freed -> next request sent)", "pacing_gap_ms_p50"),
    ("pacing gap p90 ms", "pacing_gap_ms_p90"),
    ("ramp ms (first to C-th start)", "ramp_ms"),
    ("drain ms (last start to last end)", "drain_ms"),
    ("TTFT p50 ms", "ttft_ms_p50"),
    ("TTFT p99 ms", "ttft_ms_p99"),
    ("E2E p50 ms (to last content chunk)", "e2e_ms_p50"),
    ("TPOT p50 ms", "tpot_ms_p50"),
    ("prompt tokens / request (server count)", "prompt_tokens"),
    ("output tokens / request", "output_tokens"),
    ("aiperf: credit issued -> request start p50 ms", "credit_ms_p50"),
)


@dataclass(slots=True)
class ReqTimes:
    """One measured request as a load generator saw it: seconds on that run's clock."""

    start: float
    ttft: float
    last_token: float  # last content chunk, from start
    end: float  # stream end ([DONE]), absolute
    prompt_tokens: int
    output_tokens: int


def bench_requests(result_json: Path) -> list[ReqTimes]:
    run = read_json(result_json)["runs"][0]
    return [ReqTimes(r["start_s"], r["ttft_s"], r["ttft_s"] + sum(r["itl_s"]), r["end_s"], r["prompt_tokens"],
                     r["output_tokens"]) for r in run["requests"] if r["success"]]  # fmt: skip


def aiperf_requests(records: Path) -> tuple[list[ReqTimes], list[float], tuple[float, float]]:
    """The profiling-phase records of aiperf's profile_export.jsonl, its credit latencies (credit issued by its
    timing manager -> request start in its worker, ms) and its measured window (wall clock)."""
    out, credit = [], []
    for line in records.read_text().splitlines():
        rec = json.loads(line)
        meta, m = rec["metadata"], rec["metrics"]
        if meta.get("benchmark_phase") != "profiling" or "time_to_first_token" not in m:
            continue
        value = {name: m[name]["value"] for name in m}
        start = meta["request_start_ns"] / 1e9
        out.append(ReqTimes(start, value["time_to_first_token"] / 1e3, value["request_latency"] / 1e3,
                            meta["request_end_ns"] / 1e9, int(value.get("usage_prompt_tokens", 0)),
                            int(value.get("output_sequence_length", 0))))  # fmt: skip
        credit.append((meta["request_start_ns"] - meta["credit_issued_ns"]) / 1e6)
    return out, credit, (min(r.start for r in out), max(r.end for r in out))


def closed_loop_stats(reqs: Sequence[ReqTimes], concurrency: int) -> dict[str, float]:
    """The same figures for both tools. In a closed loop request k + C starts when an earlier one has ended: the
    pacing gap, (k + C)-th start - k-th end (both sorted), is the load generator's own time between a slot freeing
    and its next request going out. Little's law ties it together: req/s = mean in flight / mean time per request."""
    starts, ends = sorted(r.start for r in reqs), sorted(r.end for r in reqs)
    duration = max(ends) - min(starts)
    gaps = [1e3 * (starts[k + concurrency] - ends[k]) for k in range(len(reqs) - concurrency)]
    tpot = [1e3 * (r.last_token - r.ttft) / (r.output_tokens - 1) for r in reqs if r.output_tokens > 1]
    ttft = [1e3 * r.ttft for r in reqs]
    return {
        "req_s": len(reqs) / duration,
        "mean_in_flight": sum(r.end - r.start for r in reqs) / duration,
        "mean_request_ms": 1e3 * statistics.fmean(r.end - r.start for r in reqs),
        "pacing_gap_ms_p50": percentile(gaps, 50),
        "pacing_gap_ms_p90": percentile(gaps, 90),
        "ramp_ms": 1e3 * (starts[min(concurrency, len(starts)) - 1] - starts[0]),
        "drain_ms": 1e3 * (max(ends) - max(starts)),
        "ttft_ms_p50": percentile(ttft, 50),
        "ttft_ms_p99": percentile(ttft, 99),
        "e2e_ms_p50": percentile([1e3 * r.last_token for r in reqs], 50),
        "tpot_ms_p50": percentile(tpot, 50),
        "prompt_tokens": statistics.fmean(r.prompt_tokens for r in reqs),
        "output_tokens": statistics.fmean(r.output_tokens for r in reqs),
    }


def cpu_pct(cpu_s: dict[str, float], window_s: float) -> dict[str, float]:
    return {k: 100.0 * v / window_s for k, v in cpu_s.items()}


def bench_run(dep: Deployment, model: Path, load: Load, work: Path, rnd: int) -> dict[str, Any]:
    argv = bench_argv(dep.base_url, model, work / f"bench-{rnd}.json", f"agree #{rnd}", *load.flags())
    row = measure(dep, argv, work / f"bench-{rnd}.log", interval_s=0.05)
    stats = closed_loop_stats(bench_requests(Path(row["result_json"])), load.concurrency)
    pct = cpu_pct(row["cpu_s"], row["window_s"])
    return {
        "tool": "zdyn bench",
        "round": rnd,
        "seed": load.seed,
        "command": row["command"],
        "figures": {k: row[k] for _, k in FIGURES},
        "cpu_pct": pct,
        "busiest_load_process_pct": pct["load generator"],
        "records": stats,
    }


def aiperf_run(dep: Deployment, model: Path, load: Load, work: Path, rnd: int) -> dict[str, Any]:
    groups = dep.roles()
    with CpuSampler(groups.values(), match=("aiperf",), interval_s=0.05) as sampler:
        # one distinct prompt per request, as zdyn bench sends (aiperf's default pool of 100 prompts would be reused
        # and hit the mocker's prefix cache)
        res = run_aiperf(dep.base_url, dep.model, model, work / f"aiperf-{rnd}", concurrency=load.concurrency,
                         requests=load.requests, input_len=load.input_len, output_len=load.output_len,
                         warmups=load.warmups, seed=load.seed,
                         extra=["--num-dataset-entries", str(load.requests + load.warmups)])  # fmt: skip
    reqs, credit, (t0, t1) = aiperf_requests(res.records)
    ours = by_group(groups)

    def label(pid: int, pgid: int) -> str:  # the deployment's roles, else one label per aiperf process
        return ours(pid, pgid) or f"{sampler.titles.get(pid, '?')[:48]} #{pid}"

    per_process = sampler.usage(t0, t1, label)
    roles = {k: v for k, v in per_process.items() if k in groups or k in ("machine", "other")}
    roles["load generator"] = sum(v for k, v in per_process.items() if k not in roles)
    load_processes = {k: 100.0 * v / (t1 - t0) for k, v in per_process.items() if k not in roles}
    stats = closed_loop_stats(reqs, load.concurrency) | {"credit_ms_p50": percentile(credit, 50)}
    return {
        "tool": "aiperf",
        "round": rnd,
        "seed": load.seed,
        "command": res.command,
        "figures": res.figures(),
        "cpu_pct": cpu_pct(roles, t1 - t0),
        "busiest_load_process_pct": max(load_processes.values(), default=0.0),
        "load_processes_pct": load_processes,
        "records": stats,
        "artifacts": str(res.artifacts),
    }


def summary(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for _, key in FIGURES:
        per_tool = {t: [r["figures"][key] for r in runs if r["tool"] == t] for t in TOOLS}
        med = {t: statistics.median(v) if v else math.nan for t, v in per_tool.items()}
        b, a = med["zdyn bench"], med["aiperf"]
        spread = {t: 100.0 * (max(v) - min(v)) / med[t] if v else math.nan for t, v in per_tool.items()}
        out[key] = {"runs": per_tool, "median": med, "spread_pct": spread, "aiperf_vs_bench_pct": 100.0 * (a - b) / b}
    return out


def report(doc: dict[str, Any]) -> str:
    s, runs, summ = doc["settings"], doc["runs"], doc["summary"]
    load = s["load"]
    rows = [[label, fmt(x["median"]["zdyn bench"]), fmt(x["median"]["aiperf"]), f"{x['aiperf_vs_bench_pct']:+.1f}%",
             f"{x['spread_pct']['zdyn bench']:.1f}% / {x['spread_pct']['aiperf']:.1f}%"]
            for label, key in FIGURES for x in [summ[key]]]  # fmt: skip
    worst = max(abs(summ[k]["aiperf_vs_bench_pct"]) for _, k in FIGURES)
    cpu = [
        [
            f"{r['tool']} #{r['round']}",
            *(
                fmt(r["cpu_pct"].get(k, 0.0), 0)
                for k in ("frontend", "worker0", "worker1", "load generator", "other", "machine")
            ),
            fmt(r["busiest_load_process_pct"], 0),
        ]
        for r in runs
    ]
    rec = []
    for label, key in RECORDS:
        b, a = (median(r["records"].get(key) for r in runs if r["tool"] == t) for t in TOOLS)
        rec.append(
            [label, fmt(b), fmt(a), "" if math.isnan(a) or math.isnan(b) or not b else f"{100 * (a / b - 1):+.1f}%"]
        )
    figure_head = [
        "figure (each tool's own summary)",
        "zdyn bench",
        "aiperf",
        "aiperf vs bench",
        "spread bench / aiperf",
    ]
    cpu_head = ["run", "frontend", "worker0", "worker1", "load generator", "other", "machine", "busiest load process"]
    return "\n".join([
        f"aiperf {AIPERF_VERSION} vs zdyn bench on one zdyn deployment (frontend + 2 mocker workers at speedup "
        f"{s['speedup']:g}): closed loop, concurrency {load['concurrency']}, {load['requests']} requests after "
        f"{load['warmups']} warm-ups, {load['input_len']} in / {load['output_len']} out; {s['rounds']} runs each",
        table(figure_head, rows),
        f"largest difference of medians: {worst:.1f}% ({'agree' if worst <= TOLERANCE_PCT else 'DISAGREE'} within "
        f"{TOLERANCE_PCT:g}%)",
        "\nCPU over each measured window, % of one core (2 cores = 200%)",
        table(cpu_head, cpu),
        "\nrecomputed from each tool's per-request records, one definition for both (medians of runs)",
        table(["from per-request records", "zdyn bench", "aiperf", "aiperf vs bench"], rec),
        *(f"{t}: {next(r['command'] for r in runs if r['tool'] == t)}" for t in TOOLS),
    ])  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m benchmarks.aiperf_agreement", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="config + tokenizer (default: the tiny Llama)")
    p.add_argument("--speedup", type=float, default=1.0, help="mocker speedup (default 1: real time)")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--warmups", type=int, default=16)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3, help="runs of each tool, alternating (zdyn bench first)")
    p.add_argument("--out", type=Path, default=RESULTS / "aiperf-agreement.json")
    p.add_argument("--report", type=Path, metavar="JSON", help="only print the tables of a finished run")
    args = p.parse_args(argv)
    if args.report:
        print(report(read_json(args.report)))
        return 0
    cmd, model = command("benchmarks.aiperf_agreement", argv), model_or_tiny(args.model)
    load = Load(concurrency=args.concurrency, requests=args.requests, warmups=args.warmups, output_len=args.output_len)
    work = Path(tempfile.mkdtemp(prefix="zdyn-agree-"))
    doc: dict[str, Any] = {"benchmark": "aiperf-agreement", "command": cmd, **provenance(), "runs": [],
                           "settings": {"load": asdict(load), "speedup": args.speedup, "rounds": args.rounds,
                                        "seeds": "round k: zdyn bench --seed k+1, aiperf --random-seed k+101",
                                        "work_dir": str(work)}}  # fmt: skip
    t0 = time.monotonic()
    spec = ZdynSpec("agg", workers=2, model=str(model), worker_args=("--speedup", f"{args.speedup:g}"))
    with bench_lock(), start(spec, work / "logs") as dep:
        for rnd in range(args.rounds):
            doc["runs"].append(bench_run(dep, model, replace(load, seed=rnd + 1), work, rnd))
            doc["runs"].append(aiperf_run(dep, model, replace(load, seed=rnd + 101), work, rnd))
            for r in doc["runs"][-2:]:
                f = r["figures"]
                print(f"  {r['tool']:10} #{rnd}: {f['req_s']:.2f} req/s TTFT p50 {f['ttft_p50']:.1f} p99 "
                      f"{f['ttft_p99']:.1f} TPOT p50 {f['tpot_p50']:.2f} ms", file=sys.stderr, flush=True)  # fmt: skip
    doc["wall_s"], doc["summary"] = time.monotonic() - t0, summary(doc["runs"])
    write_json(args.out, doc)
    print(report(doc))
    print(footer(cmd, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
