"""Does disaggregated prefill help with the same number of simulated workers, on two prefill-heavy traces?

For each trace (the Azure 2023 code trace, ISL:OSL ~73:1, and the Mooncake FAST'25 conversation trace, ISL ~12k) and
each deployment of N mocker workers in all (agg: N workers, round-robin; disagg: N - P decode + P prefill workers;
disagg_route: the same behind the KV router), the scenario is started as its run.sh starts it, ``zdyn bench`` replays
one time window of the trace (open loop at the trace's timestamps / speed, token-id prompts on /v1/completions,
``max_tokens`` = the traced output length with ``ignore_eos``), and the deployment is stopped. Every deployment gets
the same requests, mocker settings and cold caches; the benchmark lock is held across all deployments of a trace.

Per run: TTFT and ITL p50/p99, TPOT p50, E2E p50, throughput, goodput at the trace's SLO, the prefix-hit share, the
prefill queue's counters, and the decode workers' decisions from their log lines (``request <id>: remote prefill
(...) took Xs`` / ``local prefill (...)`` / ``remote prefill failed (...)``).

    python -m benchmarks.disagg              # ~15 min of deployments: 5 on the Azure window, 6 on the Mooncake one
    python -m benchmarks.disagg --report     # re-print the tables and redraw the plot

Defaults: 4 workers in all, mocker speedup 2, the Azure code trace's 1080-1200 s at speed 2 and the Mooncake
conversation trace's first 90 s at speed 1.5, decode workers' --max-local-prefill-length 1000, KV transfer 128 KiB
per token (Llama-3-8B bf16). Latencies are wall-clock: at speedup 2 the modelled engine times are twice the figures.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import re
import shutil
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from zdyn.bench.deploy import ZdynSpec, start
from zdyn.bench.host import bench_lock
from zdyn.bench.inputs import LONG_MODEL_LEN, TRACES, long_context_model
from zdyn.bench.procs import scrape
from zdyn.bench.results import (
    RESULTS,
    command,
    fmt,
    footer,
    percentile,
    provenance,
    pyplot,
    read_json,
    save_figure,
    table,
    write_json,
)
from zdyn.bench.runs import bench_argv, cpu_by_kind, measure

SLOW_GAP_MS = 100.0  # an inter-token gap longer than this (modelled engine time) counts as a stall
DECISION = re.compile(
    r"request (?P<id>\S+): (?P<kind>remote prefill failed|remote prefill|local prefill) "
    r"\((?P<reason>.*)\)(?: took (?P<took>[\d.]+)s)?"
)
KINDS = {"remote prefill": "remote", "local prefill": "local", "remote prefill failed": "failed"}


@dataclass(frozen=True)
class Trace:
    """A time window [start_s, end_s) of a trace file, replayed at ``speed``; its goodput SLO in modelled ms."""

    name: str
    dataset: str  # zdyn bench --dataset
    start_s: float
    end_s: float
    speed: float
    slo: tuple[tuple[str, float], ...]


@dataclass(frozen=True)
class Layout:
    """A deployment of N workers: a scenario, P prefill workers, the prefill queue's jobs per prefill worker."""

    scenario: str
    prefill: int = 0
    jobs_per_worker: int = 0  # 0: examples/<scenario>/config.yaml's

    def label(self, n: int) -> str:
        if not self.prefill:
            return f"{self.scenario} {n}"
        jobs = f", {self.jobs_per_worker} job/prefill worker" if self.jobs_per_worker else ""
        return f"{self.scenario} {self.prefill}P+{n - self.prefill}D{jobs}"


LAYOUTS = {"agg": Layout("agg"), "disagg-2p": Layout("disagg", 2), "disagg-3p": Layout("disagg", 3),
           "disagg_route-2p": Layout("disagg_route", 2), "disagg_route-3p": Layout("disagg_route", 3),
           # one job per prefill worker at once, as Dynamo's prefill workers take them: jobs then wait in the queue
           "disagg-2p-j1": Layout("disagg", 2, 1), "disagg_route-2p-j1": Layout("disagg_route", 2, 1)}  # fmt: skip
DEFAULT_LAYOUTS = {
    "azure-code": ("agg", "disagg-2p", "disagg-3p", "disagg_route-2p", "disagg-2p-j1"),
    "mooncake-conv": ("agg", "disagg-2p", "disagg-3p", "disagg_route-2p", "disagg_route-3p", "disagg-2p-j1"),
}


def write_window(trace: Trace, source: Path, dest: Path) -> dict[str, Any]:
    """Copy the requests arriving in [start_s, end_s) to ``dest`` (zdyn bench rebases arrivals to the window's first
    request); their statistics."""
    isl, osl = [], []
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(source, encoding="utf-8", newline="") as src, open(dest, "w", encoding="utf-8", newline="") as out:
        if trace.dataset == "azure":
            reader, writer = csv.reader(src), csv.writer(out, lineterminator="\r\n")
            writer.writerow(next(reader))
            origin = None
            for row in reader:
                when = dt.datetime.fromisoformat(row[0].strip())
                origin = origin or when
                if trace.start_s <= (when - origin).total_seconds() < trace.end_s:
                    writer.writerow(row)
                    isl.append(int(row[1]))
                    osl.append(int(row[2]))
        else:
            for line in src:
                entry = json.loads(line)
                if trace.start_s <= entry["timestamp"] / 1000 < trace.end_s:
                    out.write(line)
                    isl.append(entry["input_length"])
                    osl.append(entry["output_length"])
    if not isl:
        raise ValueError(f"{source}: no request in [{trace.start_s:g}, {trace.end_s:g}) s")
    return {
        "requests": len(isl),
        "offered_rps": round(len(isl) / ((trace.end_s - trace.start_s) / trace.speed), 3),
        "isl_mean": round(sum(isl) / len(isl)),
        "isl_p50": sorted(isl)[len(isl) // 2],
        "isl_max": max(isl),
        "osl_mean": round(sum(osl) / len(osl), 1),
    }


def decisions(log_dir: Path) -> dict[str, Any]:
    """The decode workers' choices: counts, local-prefill reasons (their shape) and remote waits."""
    kinds: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    waits = []
    for path in sorted(log_dir.glob("decode*.log")):
        for m in DECISION.finditer(path.read_text(errors="replace")):
            kinds[KINDS[m["kind"]]] += 1
            if m["kind"] == "local prefill":
                reasons[re.sub(r"\d+", "#", m["reason"])] += 1
            if m["took"]:
                waits.append(float(m["took"]))
    return {
        "decisions": dict(kinds),
        "local_reasons": dict(reasons.most_common()),
        "remote_wait_s_p50": round(percentile(waits, 50), 3) if waits else None,
    }


def breakdown(result: Path, threshold: int, slow_ms: float) -> dict[str, Any]:
    """TTFT of prompts up to and above ``threshold`` tokens (those a decode worker prefills itself, those it may send
    away), the share of inter-token gaps longer than ``slow_ms`` (wall clock) and the ITL p99.9."""
    records = [r for r in read_json(result)["runs"][0]["requests"] if r["success"]]
    out: dict[str, Any] = {"threshold": threshold, "slow_gap_ms": round(slow_ms, 1)}
    for name, mine in (
        ("short", [r for r in records if r["prompt_tokens"] <= threshold]),
        ("long", [r for r in records if r["prompt_tokens"] > threshold]),
    ):
        ttfts = [1000 * r["ttft_s"] for r in mine]
        out |= {
            f"{name}_n": len(mine),
            f"{name}_ttft_p50": percentile(ttfts, 50),
            f"{name}_ttft_p99": percentile(ttfts, 99),
        }
    gaps = [1000 * g for r in records for g in r["itl_s"]]
    return out | {
        "slow_gap_pct": 100 * sum(g > slow_ms for g in gaps) / len(gaps) if gaps else None,
        "itl_p999": percentile(gaps, 99.9),
    }


def run_one(args: argparse.Namespace, trace: Trace, name: str, window: Path, requests: int) -> dict[str, Any]:
    layout, n, work = LAYOUTS[name], args.workers, args.out.with_suffix("") / trace.name / name
    shutil.rmtree(work, ignore_errors=True)
    mocker = [
        "--speedup",
        f"{args.speedup:g}",
        "--max-model-len",
        str(LONG_MODEL_LEN),
        "--kv-bytes-per-token",
        str(args.kv_bytes_per_token),
    ]
    if layout.prefill:
        mocker += ["--max-local-prefill-length", str(args.max_local_prefill_length)]
    config = {"PrefillQueue": {"max-jobs-per-worker": layout.jobs_per_worker}} if layout.jobs_per_worker else {}
    spec = ZdynSpec(
        layout.scenario,
        workers=n - layout.prefill,
        prefill_workers=max(1, layout.prefill),
        model=str(args.model),
        worker_args=tuple(mocker),
        config=config,
    )
    flags = [
        "--api",
        "completions",
        "--prompt-format",
        "tokens",
        "--no-keep-alive",
        "--save-requests",
        "--no-progress",
        "--dataset",
        trace.dataset,
        "--dataset-path",
        str(window),
        "--speed",
        f"{trace.speed:g}",
        "--num-requests",
        str(requests),
        "--warmups",
        "0",
        "--seed",
        str(args.seed),
        "--goodput",
        *(f"{k}:{ms / args.speedup:g}" for k, ms in trace.slo),
    ]
    t0 = time.monotonic()
    with start(spec, work / "logs", timeout_s=120) as dep:
        argv = bench_argv(dep.base_url, args.model, work / "raw" / "bench.json", name, *flags)
        row = measure(dep, argv, work / "logs" / "bench.log")
        queue = (
            {k: v for k, v in scrape(dep.metrics["prefill_queue"]).items() if "_jobs" in k} if layout.prefill else {}
        )
    out = {
        "trace": trace.name,
        "layout": name,
        "label": layout.label(n),
        **{k: v for k, v in row.items() if k != "cpu_s"},
        "cpu": cpu_by_kind(row),
        "queue": queue,
        "wall_s": round(time.monotonic() - t0, 1),
        "killed_on_stop": dep.info["killed_on_stop"],
        "per_request": breakdown(Path(row["result_json"]), args.max_local_prefill_length, SLOW_GAP_MS / args.speedup),
    }
    return out | (decisions(work / "logs") if layout.prefill else {"decisions": {}})


MAIN_HEAD = [
    "trace",
    "deployment",
    "req/s",
    "out tok/s",
    "in tok/s",
    "TTFT p50",
    "TTFT p99",
    "ITL p50",
    "ITL p99",
    "TPOT p50",
    "E2E p50",
    "good %",
    "remote prefill",
    "cached %",
    "failed",
    "CPU machine",
]
SPLIT_HEAD = ["trace", "deployment", "short prompts", "TTFT p50 short", "TTFT p99 short", "long prompts",
              "TTFT p50 long", "TTFT p99 long", "gaps > stall", "ITL p99.9"]  # fmt: skip


def main_row(r: dict[str, Any]) -> list[str]:
    total = sum(r["decisions"].values())
    remote = "-" if not total else f"{100 * r['decisions'].get('remote', 0) / total:.0f} %"
    digits = {"req_s": 2, "itl_p50": 1, "itl_p99": 1, "tpot_p50": 1}
    keys = ("req_s", "out_tok_s", "in_tok_s", "ttft_p50", "ttft_p99", "itl_p50", "itl_p99", "tpot_p50", "e2e_p50")
    return [r["trace"], r["label"], *(fmt(r[k], digits.get(k, 0)) for k in keys),
            fmt(100 * (r["good_fraction"] or 0), 0), remote, fmt(100 * (r["cached_fraction"] or 0), 1),
            str(r["failed"]), fmt(r["cpu"].get("machine"), 0)]  # fmt: skip


def split_row(r: dict[str, Any]) -> list[str]:
    b = r["per_request"]
    ttfts = (fmt(b[f"{n}_ttft_{q}"], 0) for n in ("short", "long") for q in ("p50", "p99"))
    short, long_ = f"{b['short_n']} (<= {b['threshold']})", str(b["long_n"])
    slow = f"{fmt(b['slow_gap_pct'], 2)} % (> {b['slow_gap_ms']:g} ms)"
    s50, s99, l50, l99 = ttfts
    return [r["trace"], r["label"], short, s50, s99, long_, l50, l99, slow, fmt(b["itl_p999"], 0)]


def report(doc: dict[str, Any]) -> str:
    windows = [f"- {name}: {w['window']} at speed {w['speed']:g}: {w['requests']} requests, {w['offered_rps']:.2f} "
               f"req/s offered, ISL mean {w['isl_mean']:,} (p50 {w['isl_p50']:,}, max {w['isl_max']:,}), OSL mean "
               f"{w['osl_mean']:g}; SLO (wall ms) {w['slo_wall']}" for name, w in doc["traces"].items()]  # fmt: skip
    runs = doc["runs"]
    return "\n".join([f"Command: `{doc['command']}`", "", *windows, "", table(MAIN_HEAD, map(main_row, runs)), "",
                      table(SPLIT_HEAD, map(split_row, runs))])  # fmt: skip


def plot(doc: dict[str, Any], path: Path) -> Path:
    plt, traces = pyplot(), [t for t in doc["traces"] if any(r["trace"] == t for r in doc["runs"])]
    fig, axes = plt.subplots(len(traces), 3, figsize=(17, 4.6 * len(traces)), squeeze=False)
    for row, name in zip(axes, traces, strict=True):
        runs = [r for r in doc["runs"] if r["trace"] == name]
        x, labels = range(len(runs)), [r["label"].replace(" ", "\n", 1).replace(", 1 job/", "\n1 job/") for r in runs]
        for ax, metric in ((row[0], "ttft"), (row[1], "itl")):
            for i, q in enumerate(("p50", "p99")):
                bars = ax.bar([v + (i - 0.5) * 0.38 for v in x], [r[f"{metric}_{q}"] for r in runs], 0.38, label=q)
                ax.bar_label(bars, fmt="%.0f", fontsize=7)
            ax.set(yscale="log", ylabel=f"{metric.upper()} (wall ms)", title=f"{name}: {metric.upper()} p50 / p99")
            ax.set_xticks(list(x), labels, fontsize=7.5)
            ax.legend(fontsize="small")
        bars = row[2].bar(list(x), [r["out_tok_s"] for r in runs], 0.6, color="C2")
        row[2].bar_label(bars, labels=[f"{r['req_s']:.2f} req/s" for r in runs], fontsize=7)
        row[2].set(ylabel="output tok/s", title=f"{name}: throughput")
        row[2].set_xticks(list(x), labels, fontsize=7.5)
    s = doc["settings"]
    return save_figure(
        fig,
        path,
        f"agg vs disagg vs disagg_route, {s['workers']} mocker workers in all, speedup "
        f"{s['speedup']:g}, max_local_prefill_length {s['max_local_prefill_length']}",
    )


def window(text: str) -> tuple[float, float]:
    start_s, end_s = (float(v) for v in text.split(":"))
    return start_s, end_s


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m benchmarks.disagg", description=__doc__.split("\n\n")[0])
    p.add_argument("--traces", default="azure-code,mooncake-conv", help="comma-separated: azure-code, mooncake-conv")
    p.add_argument("--layouts", help=f"comma-separated, of {', '.join(LAYOUTS)} (default: per trace)")
    p.add_argument("--workers", type=int, default=4, help="workers in all, the same for every deployment")
    p.add_argument("--speedup", type=float, default=2.0, help="mocker speedup (divides every simulated duration)")
    p.add_argument("--azure-window", type=window, default=(1080.0, 1200.0), metavar="START:END", help="seconds")
    p.add_argument("--azure-speed", type=float, default=2.0)
    p.add_argument("--mooncake-window", type=window, default=(0.0, 90.0), metavar="START:END")
    p.add_argument("--mooncake-speed", type=float, default=1.5)
    p.add_argument("--max-local-prefill-length", type=int, default=1000, help="decode workers' threshold")
    p.add_argument("--kv-bytes-per-token", type=int, default=131_072, help="KV moved per prompt token (Llama-3-8B)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS / "disagg.json", help="also OUT.png and the folder OUT/")
    p.add_argument("--report", action="store_true", help="only re-print the tables and redraw the plot of --out")
    args = p.parse_args(argv)
    cmd = command("benchmarks.disagg", argv)
    az, mc = args.azure_window, args.mooncake_window
    traces = {
        "azure-code": Trace("azure-code", "azure", az[0], az[1], args.azure_speed, (("ttft", 1000.0), ("tpot", 100.0))),
        "mooncake-conv": Trace("mooncake-conv", "mooncake", mc[0], mc[1], args.mooncake_speed,
                               (("ttft", 5000.0), ("tpot", 100.0))),
    }  # fmt: skip
    doc = read_json(args.out) if args.report else {"benchmark": "disagg", "command": cmd, **provenance(), "traces": {},
                                                   "runs": [], "settings": {}}  # fmt: skip
    if not args.report:
        args.model = long_context_model()
        keys = ("workers", "speedup", "max_local_prefill_length", "kv_bytes_per_token", "seed")
        doc["settings"] = {k: getattr(args, k) for k in keys} | {"max_model_len": LONG_MODEL_LEN}
    for name in [] if args.report else [t for t in args.traces.split(",") if t]:
        trace = traces[name]
        source = TRACES["azure-code" if trace.dataset == "azure" else "mooncake-conversation"]
        replayed = args.out.with_suffix("") / "logs" / f"{name}-{trace.start_s:g}-{trace.end_s:g}s{source.suffix}"
        stats = write_window(trace, source, replayed)
        doc["traces"][name] = {**asdict(trace), **stats, "window": f"{trace.start_s:g}-{trace.end_s:g} s",
                               "slo_wall": [f"{k}:{ms / args.speedup:g}" for k, ms in trace.slo]}  # fmt: skip
        with bench_lock():  # one lock for all deployments of a trace: they are measured side by side
            for layout in args.layouts.split(",") if args.layouts else DEFAULT_LAYOUTS[name]:
                print(f"== {name}, {LAYOUTS[layout].label(args.workers)}", flush=True)
                r = run_one(args, trace, layout, replayed, stats["requests"])
                doc["runs"].append(r)
                print(
                    f"   {r['req_s']:.2f} req/s, TTFT p50/p99 {r['ttft_p50']:.0f}/{r['ttft_p99']:.0f} ms, ITL "
                    f"p50/p99 {r['itl_p50']:.1f}/{r['itl_p99']:.1f} ms, decisions {r['decisions'] or '-'}"
                )
                write_json(args.out, doc)
    print(report(doc))
    print(
        footer(
            doc["commands"][-1] if "commands" in doc else doc["command"],
            args.out,
            plot(doc, args.out.with_suffix(".png")),
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
