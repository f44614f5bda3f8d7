"""Does zdyn's agg deployment serve as fast as vLLM's own OpenAI server, with the same install, model, engine settings
and load?

Each *session* starts one system on loopback, measures it with ``zdyn bench`` and stops it (every process of it);
sessions alternate (vllm, zdyn, vllm, ...) because 2 cores cannot host both fairly, and each holds the benchmark lock.

- vLLM: ``python -m vllm.entrypoints.openai.api_server --model DIR ... ENGINE_ARGS`` (API server + EngineCore)
- zdyn: examples/agg with one vLLM worker (``zdyn frontend`` + ``zdyn worker ... ENGINE_ARGS``), as its run.sh starts it

Load: chat, streaming, ``ignore_eos``, fixed prompt/output lengths, temperature 0, a closed-loop sweep over
concurrencies and one open-loop rate; every point has its own seed (no point hits another's prefix cache) and both
systems get identical prompts. Reported per system and point, median [min-max] over sessions: req/s, output tok/s,
TTFT and ITL p50/p99, E2E p50, the zdyn/vLLM ratios, and the added TTFT p50 with a 95 % bootstrap interval (sessions,
then requests); CPU per process and memory (RSS, PSS) of each system; points where other processes used > 10 % of a
core are flagged "disturbed".

    python -m benchmarks.vs_vllm          # 6 sessions of ~2.4 min
    python -m benchmarks.vs_vllm --rounds 1 --concurrency 1,4 --requests 2,4 --no-rate --out /tmp/x   # a quick check
    python -m benchmarks.vs_vllm --report benchmarks/results/vs_vllm.json
"""

from __future__ import annotations

import argparse
import contextlib
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from zdyn.bench.deploy import Deployment, ZdynSpec, start, vllm_scratch_env
from zdyn.bench.host import CpuSampler, bench_lock, by_group, memory_mib
from zdyn.bench.results import (
    RESULTS,
    command,
    fmt,
    footer,
    med_range,
    provenance,
    pyplot,
    read_json,
    save_figure,
    table,
    write_json,
)
from zdyn.bench.runs import bench_argv, measure
from zdyn.bench.servers import start_vllm_server
from zdyn.models import SMOLLM2_NAME, ensure_smollm2

SYSTEMS = ("vllm", "zdyn")
ENGINE_ARGS = "--enforce-eager --max-model-len 2048 --dtype float32 --kv-cache-memory-bytes 536870912 --max-num-seqs 32"
TARGET_THROUGHPUT = 0.95  # zdyn/vLLM output tok/s
TARGET_ADDED_TTFT_MS = 5.0
DISTURBED = 0.10  # of one core, used by other processes during a point
METRICS = (
    ("req_s", "req/s"),
    ("out_tok_s", "out tok/s"),
    ("ttft_p50", "TTFT p50 ms"),
    ("ttft_p99", "TTFT p99 ms"),
    ("itl_p50", "ITL p50 ms"),
    ("itl_p99", "ITL p99 ms"),
    ("e2e_p50", "E2E p50 ms"),
)


@dataclass(frozen=True)
class Point:
    """Closed loop at ``concurrency``, or open loop at ``request_rate``."""

    requests: int
    seed: int
    concurrency: int | None = None
    request_rate: float | None = None

    @property
    def label(self) -> str:
        return f"c={self.concurrency}" if self.request_rate is None else f"rate={self.request_rate:g}"

    def flags(self) -> list[str]:
        load = (
            ["--concurrency", str(self.concurrency)]
            if self.concurrency
            else ["--request-rate", f"{self.request_rate:g}"]
        )
        return ["--num-requests", str(self.requests), "--seed", str(self.seed), *load]


def deployment(system: str, args: argparse.Namespace, logs: Path) -> contextlib.AbstractContextManager[Deployment]:
    env = vllm_scratch_env(logs / "scratch")
    if system == "vllm":
        return start_vllm_server(args.model, SMOLLM2_NAME, args.engine_args, logs, env, args.start_timeout)
    spec = ZdynSpec("agg", workers=1, engine="vllm", model=args.model, worker_args=tuple(args.engine_args), env=env)
    return start(spec, logs, timeout_s=args.start_timeout)


def session(system: str, rnd: int, points: Sequence[Point], args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Start ``system`` under the lock, measure every point, stop it."""
    logs = work / f"{system}-{rnd}"
    asked = time.monotonic()
    with bench_lock(), deployment(system, args, logs) as dep:
        locked = time.monotonic()
        print(f"  {system}: ready in {dep.info['start_s']:.1f}s at {dep.base_url}", flush=True)
        time.sleep(args.settle)
        labels = by_group(dep.roles(), titles=True)
        idle = {"rss_mib": memory_mib(labels), "pss_mib": memory_mib(labels, pss=True)}
        results = []
        with CpuSampler(dep.roles().values(), interval_s=1.0) as whole:
            for i, point in enumerate(points):
                flags = [
                    "--model",
                    SMOLLM2_NAME,
                    "--api",
                    "chat",
                    "--input-len",
                    str(args.input_len),
                    "--output-len",
                    str(args.output_len),
                    "--ignore-eos",
                    "--temperature",
                    "0",
                    "--extra-body",
                    '{"top_p": 1.0}',
                    "--warmups",
                    str(args.warmups if i == 0 else 0),
                    "--no-progress",
                    "--save-requests",
                ]
                argv = bench_argv(
                    dep.base_url, args.model, logs / f"{point.label}.json", system, *flags, *point.flags()
                )
                row = measure(dep, argv, logs / f"{point.label}.log", interval_s=0.5, timeout_s=600.0, titles=True)
                ttfts = [1000 * r["ttft_s"] for r in read_json(Path(row["result_json"]))["runs"][0]["requests"]]
                row |= {
                    "label": point.label,
                    "point": asdict(point),
                    "ttft_ms": ttfts,
                    "disturbed": row["cpu_s"]["other"] > DISTURBED * row["window_s"],
                }
                results.append(row)
                print(
                    f"    {point.label:>9}: {row['req_s']:.3f} req/s, TTFT p50 {row['ttft_p50']:.1f} ms, ITL p50 "
                    f"{row['itl_p50']:.1f} ms{', DISTURBED' if row['disturbed'] else ''}",
                    flush=True,
                )
        loaded = {
            "rss_mib": memory_mib(labels),
            "pss_mib": memory_mib(labels, pss=True),
            "peak_rss_mib": whole.peak_rss_mib(labels),
        }
        wall = time.monotonic() - locked
    return {
        "system": system,
        "round": rnd,
        "lock_wait_s": locked - asked,
        "session_wall_s": wall,
        "startup_s": dep.info["start_s"],
        "memory": {"idle": idle, "after_load": loaded},
        "points": results,
    }


def bootstrap_ci(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]], n: int = 2000) -> list[float] | None:
    """95 % interval of median(a) - median(b) by a two-level bootstrap: sessions drawn with replacement, then
    requests within each drawn session, so that the spread between sessions counts."""
    rng = np.random.default_rng(0)

    def medians(sessions: Sequence[Sequence[float]]) -> Any:
        arrays = [np.asarray(s, dtype=float) for s in sessions if len(s)]
        picks = (rng.integers(len(arrays), size=len(arrays)) for _ in range(n))
        return np.array([np.median(np.concatenate([rng.choice(arrays[j], arrays[j].size) for j in p])) for p in picks])

    if not any(a) or not any(b):
        return None
    diffs = medians(a) - medians(b)
    return [float(np.percentile(diffs, 2.5)), float(np.percentile(diffs, 97.5))]


def summarize(sessions: Sequence[dict[str, Any]], labels: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for label in labels:
        runs = {
            s: [r for x in sessions if x["system"] == s for r in x["points"] if r["label"] == label] for s in SYSTEMS
        }
        entry: dict[str, Any] = {
            s: {k: med_range(r[k] for r in rs) for k, _ in METRICS}
            | {
                "disturbed": sum(r["disturbed"] for r in rs),
                "cpu_ms_per_req": {
                    role: statistics.median(1000 * r["cpu_s"].get(role, 0.0) / r["completed"] for r in rs)
                    for role in rs[0]["cpu_s"]
                },
            }
            for s, rs in runs.items()
            if rs
        }
        if all(s in entry for s in SYSTEMS):
            z, v = entry["zdyn"], entry["vllm"]
            added = z["ttft_p50"][0] - v["ttft_p50"][0]
            ci = bootstrap_ci([r["ttft_ms"] for r in runs["zdyn"]], [r["ttft_ms"] for r in runs["vllm"]])
            low, high = ci or [added, added]
            verdict = (
                "meets" if high < TARGET_ADDED_TTFT_MS else "misses" if low > TARGET_ADDED_TTFT_MS else "unresolved"
            )
            entry |= {
                "zdyn_over_vllm": {k: z[k][0] / v[k][0] for k, _ in METRICS},
                "added_ttft_p50_ms": added,
                "added_ttft_p50_ci95_ms": ci,
                "ttft_verdict": verdict,
            }
        out[label] = entry
    return out


def report(doc: dict[str, Any]) -> str:
    rows, notes = [], []
    for label, e in doc["summary"].items():
        for s in (s for s in SYSTEMS if s in e):
            name = f"{s} ({e[s]['disturbed']} disturbed)" if e[s]["disturbed"] else s
            rows.append(
                [label, name, *(f"{fmt(m)} [{fmt(lo)}-{fmt(hi)}]" for m, lo, hi in (e[s][k] for k, _ in METRICS))]
            )
        if r := e.get("zdyn_over_vllm"):
            rows.append([label, "**zdyn/vLLM**", *(f"{r[k]:.3f}" for k, _ in METRICS)])
            ci = e["added_ttft_p50_ci95_ms"]
            notes.append(
                f"{label}: output tok/s {r['out_tok_s']:.3f} (target >= {TARGET_THROUGHPUT}); added TTFT p50 "
                f"{e['added_ttft_p50_ms']:+.1f} ms"
                + (f", 95% CI [{ci[0]:+.1f}, {ci[1]:+.1f}]" if ci else "")
                + f" ({e['ttft_verdict']} < {TARGET_ADDED_TTFT_MS:g} ms)"
            )
    cpu = [
        [label, s, ", ".join(f"{k} {v:.1f}" for k, v in e[s]["cpu_ms_per_req"].items() if k != "machine")]
        for label, e in doc["summary"].items()
        for s in SYSTEMS
        if s in e
    ]
    mem = [
        [
            x["system"],
            str(x["round"]),
            f"{sum(x['memory']['idle']['rss_mib'].values()):.0f}",
            f"{sum(x['memory']['idle']['pss_mib'].values()):.0f}",
            f"{sum(x['memory']['after_load']['peak_rss_mib'].values()):.0f}",
            ", ".join(f"{k} {v:.0f}" for k, v in x["memory"]["idle"]["rss_mib"].items()),
        ]
        for x in doc["sessions"]
    ]
    return "\n".join(
        [
            table(["point", "system", *(t for _, t in METRICS)], rows),
            "",
            *notes,
            "\nCPU ms per request by process (median over sessions)",
            table(["point", "system", "CPU ms"], cpu),
            "\nmemory of all processes of a system, MiB",
            table(["system", "round", "idle RSS", "idle PSS", "loaded peak RSS", "idle RSS by process"], mem),
        ]
    )


def plot(doc: dict[str, Any], path: Path) -> Path:
    plt, summary = pyplot(), doc["summary"]
    closed = [p for p in doc["config"]["points"] if p["concurrency"] is not None]
    xs, labels = [p["concurrency"] for p in closed], [f"c={p['concurrency']}" for p in closed]
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.6))
    for ax, (key, key99, title) in zip(
        axes,
        (("out_tok_s", None, "output tokens/s"), ("ttft_p50", "ttft_p99", "TTFT ms"), ("itl_p50", "itl_p99", "ITL ms")),
        strict=False,
    ):
        for system, color in (("vllm", "tab:blue"), ("zdyn", "tab:orange")):
            for k, style in ((key, "-o"), (key99, "--s")):
                if k and all(system in summary[lb] for lb in labels):
                    m, lo, hi = zip(*(summary[lb][system][k] for lb in labels), strict=True)
                    err = [np.subtract(m, lo), np.subtract(hi, m)]
                    ax.errorbar(xs, m, yerr=err, fmt=style, color=color, capsize=3, label=f"{system} {k}")
        ax.set(title=title, yscale="linear" if key == "out_tok_s" else "log")
    with_ratios = [(x, lb) for x, lb in zip(xs, labels, strict=True) if "zdyn_over_vllm" in summary[lb]]
    for key in ("out_tok_s", "ttft_p50", "itl_p50"):
        axes[3].plot(
            [x for x, _ in with_ratios], [summary[lb]["zdyn_over_vllm"][key] for _, lb in with_ratios], "-o", label=key
        )
    axes[3].axhline(1.0, color="gray", lw=1)
    axes[3].axhline(TARGET_THROUGHPUT, color="red", lw=1, ls="--", label=f"tok/s target {TARGET_THROUGHPUT}")
    axes[3].set(title="zdyn / vLLM (ratio of medians)")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set(xticks=xs, xticklabels=[str(x) for x in xs], xlabel="concurrency (closed loop)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
    return save_figure(fig, path, "zdyn agg vs vLLM OpenAI server (SmolLM2-135M, CPU): median, bars = min-max")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m benchmarks.vs_vllm", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="HF model folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--engine-args", default=ENGINE_ARGS, help=f"vLLM engine args for both (default: {ENGINE_ARGS})")
    p.add_argument("--rounds", type=int, default=3, help="sessions per system, alternating, vLLM first")
    p.add_argument("--concurrency", default="1,4,16", help="closed-loop points (default 1,4,16)")
    p.add_argument("--requests", default="6,16,32", help="measured requests per closed-loop point (6,16,32)")
    p.add_argument("--request-rate", type=float, default=0.5, help="open-loop point in req/s (default %(default)s)")
    p.add_argument("--rate-requests", type=int, default=12, help="requests at the rate point (default %(default)s)")
    p.add_argument("--no-rate", dest="request_rate", action="store_const", const=None, help="skip the rate point")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--warmups", type=int, default=1, help="unmeasured requests before a session's first point")
    p.add_argument("--settle", type=float, default=3.0, help="idle seconds after start-up before idle memory")
    p.add_argument("--start-timeout", type=float, default=300.0)
    p.add_argument("--out", type=Path, default=RESULTS / "vs_vllm.json")
    p.add_argument("--report", type=Path, metavar="JSON", help="only print the tables of a finished run")
    args = p.parse_args(argv)
    if args.report:
        print(report(read_json(args.report)))
        return 0
    cmd = command("benchmarks.vs_vllm", argv)
    args.model = str(Path(args.model).resolve()) if args.model else str(ensure_smollm2())
    args.engine_args = shlex.split(args.engine_args)
    pairs = list(
        zip((int(c) for c in args.concurrency.split(",")), (int(n) for n in args.requests.split(",")), strict=True)
    )
    points = [Point(n, i, concurrency=c) for i, (c, n) in enumerate(pairs)]
    if args.request_rate:
        points.append(Point(args.rate_requests, len(points), request_rate=args.request_rate))
    work, t0 = Path(tempfile.mkdtemp(prefix="zdyn-vs-vllm-")), time.monotonic()
    sessions = []
    for i in range(2 * args.rounds):
        print(f"session {i + 1}/{2 * args.rounds}: {SYSTEMS[i % 2]}", flush=True)
        sessions.append(session(SYSTEMS[i % 2], i // 2, points, args, work))
    doc = {
        "benchmark": "vs_vllm",
        "command": cmd,
        **provenance(),
        "total_wall_s": time.monotonic() - t0,
        "config": {
            "model": args.model,
            "served_model_name": SMOLLM2_NAME,
            "engine_args": args.engine_args,
            "input_len": args.input_len,
            "output_len": args.output_len,
            "warmups": args.warmups,
            "points": [asdict(p) for p in points],
        },
        "summary": summarize(sessions, [p.label for p in points]),
        "sessions": sessions,
    }
    write_json(args.out, doc)
    print(report(doc))
    print(footer(cmd, args.out, plot(doc, args.out.with_suffix(".png"))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
