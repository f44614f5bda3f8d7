"""How does a scenario scale with its number of simulated workers? One deployment per worker count N, a sweep of
request rates against each.

For each N the scenario is started as its example's run.sh starts it (``zdyn.bench.deploy``: mocker workers, free
ports, the tiny Llama's tokenizer), ``zdyn bench`` runs one open-loop Poisson point per rate (each after a warm-up and
with its own seed, so no point hits the prefix cache of the one before), and the deployment is stopped and checked to
have left no process. Each deployment holds the benchmark lock from start-up to shutdown. While a point runs, the CPU
of every role, of ``zdyn bench`` and of the whole machine is sampled from /proc: the table shows whether the frontend
or the load generator, rather than the workers, set the limit. For disagg and disagg_route, N = P prefill + N - P
decode workers.

Output in ``--out-dir``: ``raw/w<N>-r<rate>.json`` (each point's ``zdyn bench`` result), ``topology.json``,
``table.md``, ``throughput.png``, ``ttft.png`` and every process's log under ``logs/w<N>/``. Flags this script does not
know go to ``zdyn bench`` (e.g. ``--dataset prefix --prefix-len 512``); for the trace datasets the swept value is
``--speed``.

    python -m benchmarks.topology --scenario agg --workers 1,2,4,8 --rates-per-worker 2,4,5,6,7
    python -m benchmarks.topology --scenario disagg --workers 4 --prefill-workers 3 --rates 2,4
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from zdyn.bench.deploy import SCENARIOS, Deployment, ZdynSpec, start
from zdyn.bench.host import bench_lock, group_members
from zdyn.bench.inputs import model_or_tiny
from zdyn.bench.results import RESULTS, command, fmt, footer, provenance, pyplot, read_json, save_figure, write_json
from zdyn.bench.runs import bench_argv, cpu_by_kind, measure

TRACE_DATASETS = ("mooncake", "azure")  # these replay timestamps: the swept value is zdyn bench's --speed
OWN_FLAGS = (
    "--base-url",
    "--tokenizer",
    "--request-rate",
    "--speed",
    "--concurrency",
    "--duration",
    "--num-requests",
    "--warmups",
    "--result-json",
    "--label",
    "--goodput",
    "--seed",
)


@dataclass
class Point:
    """The key figures of one (workers, rate) point; latencies in ms, CPU in percent of one core."""

    workers: int
    rate: float
    result_json: str
    completed: int
    failed: int
    duration_s: float
    request_throughput: float
    output_throughput: float
    goodput: float | None
    good_fraction: float | None
    ttft_p50: float
    ttft_p99: float
    itl_p50: float
    itl_p99: float
    tpot_p50: float
    tpot_p99: float
    e2el_p50: float
    max_concurrency: int
    sent_rate: float | None = None  # measured requests / sending window: the Poisson rate actually realised
    cpu: dict[str, float] = field(default_factory=dict)
    bench_command: str = ""


def spec_for(args: argparse.Namespace, n: int) -> ZdynSpec:
    """N workers in all; for disagg*, P = --prefill-workers (default N // 2) of them prefill."""
    mocker = [
        *("--speedup", f"{args.speedup:g}", "--block-size", str(args.kv_block_size)),
        *("--num-blocks", str(args.num_blocks), "--max-num-seqs", str(args.max_num_seqs)),
        *("--max-num-batched-tokens", str(args.max_num_batched_tokens), "--max-model-len", str(args.max_model_len)),
        *shlex.split(args.mocker_args),
    ]
    p = (n // 2 if args.prefill_workers is None else args.prefill_workers) if args.scenario.startswith("disagg") else 0
    return ZdynSpec(
        args.scenario,
        workers=n - p,
        prefill_workers=p or 1,
        engine="mocker",
        model=str(args.model),
        worker_args=tuple(mocker),
        router_mode=args.router_mode,
    )


def run_point(
    args: argparse.Namespace, dep: Deployment, n: int, rate: float, seed: int, out_dir: Path, passthrough: list[str]
) -> Point:
    result = out_dir / "raw" / f"w{n}-r{rate:g}.json"
    length = ["--num-requests", str(args.num_requests)] if args.num_requests else ["--duration", str(args.duration)]
    flags = [
        *("--dataset", args.dataset, "--input-len", str(args.input_len), "--output-len", str(args.output_len)),
        *("--range-ratio", str(args.range_ratio), "--ignore-eos", "--seed", str(seed), "--no-progress", *length),
        *("--speed" if args.dataset in TRACE_DATASETS else "--request-rate", f"{rate:g}"),
        *("--warmups", str(args.warmups if args.warmups is not None else max(4, 2 * n))),
        *(["--goodput", *args.slo] if args.slo else []),
    ]
    argv = bench_argv(dep.base_url, args.model, result, f"{n} workers", *flags, *passthrough)
    row = measure(dep, argv, dep.log_dir / f"bench-r{rate:g}.log", timeout_s=600.0 + 4 * (args.duration or 0.0))
    cpu = cpu_by_kind(row)
    m = {k: round(row[k], 2) for k in ("ttft_p50", "ttft_p99", "itl_p50", "itl_p99", "tpot_p50", "tpot_p99")}
    sent = None if args.num_requests else round(row["num_requests"] / args.duration, 2)
    return Point(n, rate, str(result.relative_to(out_dir)), row["completed"], row["failed"], row["duration_s"],
                 round(row["req_s"], 3), round(row["out_tok_s"], 1), row["goodput"], row["good_fraction"], **m,
                 e2el_p50=round(row["e2e_p50"], 1), max_concurrency=row["max_concurrency"], sent_rate=sent, cpu=cpu,
                 bench_command=row["command"])  # fmt: skip


def saturation(points: Sequence[Point], attained: float = 0.9) -> dict[int, dict[str, float | None]]:
    """Per worker count: the highest offered rate (below the first that is not) served within the SLO, meaning at
    least ``attained`` of the requests met it (without an SLO: throughput >= ``attained`` x offered), the first rate
    that was not, and the highest throughput seen."""
    out: dict[int, dict[str, float | None]] = {}
    for n in sorted({p.workers for p in points}):
        mine = sorted((p for p in points if p.workers == n), key=lambda p: p.rate)
        ok = [
            p.good_fraction >= attained if p.good_fraction is not None else p.request_throughput >= attained * p.rate
            for p in mine
        ]
        bad = next((i for i, good in enumerate(ok) if not good), len(mine))
        out[n] = {
            "sustained_rate": mine[bad - 1].rate if bad > 0 else None,
            "first_saturated_rate": mine[bad].rate if bad < len(mine) else None,
            "max_request_throughput": max(p.request_throughput for p in mine),
            "max_output_throughput": max(p.output_throughput for p in mine),
        }
    return out


def format_table(points: Sequence[Point], offered: str = "rate") -> str:
    seen = {k for p in points for k in p.cpu if k not in ("machine", "other")}
    cpus = [k for k in ("frontend", "worker", "bench") if k in seen] + sorted(seen - {"frontend", "worker", "bench"})
    head = [
        "workers",
        offered,
        "sent/s",
        "req/s",
        "out tok/s",
        "TTFT p50",
        "TTFT p99",
        "ITL p50",
        "ITL p99",
        "E2E p50",
        "goodput req/s",
        "good %",
        "failed",
        *(f"CPU {c}" for c in (*cpus, "other", "machine")),
    ]
    rows = [head, ["---:"] * len(head)]
    for p in sorted(points, key=lambda p: (p.workers, p.rate)):
        good = None if p.good_fraction is None else 100 * p.good_fraction
        rows.append(
            [
                str(p.workers),
                f"{p.rate:g}",
                fmt(p.sent_rate, 2),
                fmt(p.request_throughput, 2),
                fmt(p.output_throughput, 0),
                fmt(p.ttft_p50, 0),
                fmt(p.ttft_p99, 0),
                fmt(p.itl_p50, 1),
                fmt(p.itl_p99, 1),
                fmt(p.e2el_p50, 0),
                fmt(p.goodput, 2),
                fmt(good, 0),
                str(p.failed),
                *(fmt(p.cpu.get(c), 0) for c in (*cpus, "other", "machine")),
            ]
        )
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)


def plot(points: Sequence[Point], out_dir: Path, slo_ms: dict[str, float], title: str) -> list[Path]:
    """throughput.png and ttft.png, one colour per worker count, against the offered rate on a log axis: with rates
    scaled by N, good scaling shows as shifted copies."""
    plt = pyplot()
    by_n: dict[int, list[Point]] = {}
    for p in sorted(points, key=lambda p: (p.workers, p.rate)):
        by_n.setdefault(p.workers, []).append(p)
    colors, rates = plt.get_cmap("tab10"), sorted({p.rate for p in points})

    def style(ax: Any, ylabel: str, name: str, log_y: bool) -> None:
        ax.set_xscale("log", base=2)
        ax.set_xticks(rates, [f"{r:g}" for r in rates], fontsize="small")
        ax.set_yscale("log" if log_y else "linear")
        ax.set(xlabel="offered rate (req/s)", ylabel=ylabel, title=name)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small", ncol=2)

    fig, (ax_req, ax_tok) = plt.subplots(1, 2, figsize=(13, 5))
    ax_req.plot(rates, rates, color="0.6", lw=1, ls="-.", label="offered")
    for i, (n, ps) in enumerate(by_n.items()):
        x = [p.rate for p in ps]
        ax_req.plot(x, [p.request_throughput for p in ps], "-o", color=colors(i), label=f"{n} w")
        if all(p.goodput is not None for p in ps):
            ax_req.plot(x, [p.goodput for p in ps], ":x", color=colors(i), label=f"{n} w goodput")
        ax_tok.plot(x, [p.output_throughput for p in ps], "-o", color=colors(i), label=f"{n} w")
    style(ax_req, "completed req/s", "request throughput (dotted: goodput)", False)
    style(ax_tok, "output tok/s", "output token throughput", False)
    paths = [save_figure(fig, out_dir / "throughput.png", title)]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, metric in zip(axes, ("ttft", "tpot"), strict=True):
        for i, (n, ps) in enumerate(by_n.items()):
            ax.plot(
                [p.rate for p in ps],
                [getattr(p, f"{metric}_p50") for p in ps],
                "-o",
                color=colors(i),
                label=f"{n} w p50",
            )
            ax.plot(
                [p.rate for p in ps],
                [getattr(p, f"{metric}_p99") for p in ps],
                "--s",
                color=colors(i),
                label=f"{n} w p99",
            )
        if metric in slo_ms:
            ax.axhline(slo_ms[metric], color="red", lw=1, ls="-.", label=f"SLO {slo_ms[metric]:g} ms")
        style(ax, f"{metric.upper()} (ms)", f"{metric.upper()} p50 (solid) / p99 (dashed)", True)
    return [*paths, save_figure(fig, out_dir / "ttft.png", title)]


def knee(s: dict[str, float | None]) -> str:
    ok, bad = s["sustained_rate"], s["first_saturated_rate"]
    within = "none of the rates" if ok is None else f"up to {ok:g} req/s"
    beyond = "" if bad is None else f", not {bad:g} req/s"
    peak = f"peak {s['max_request_throughput']:.2f} req/s, {s['max_output_throughput']:.0f} output tok/s"
    return f"within the SLO {within}{beyond}; {peak}"


def write_report(out_dir: Path, summary: dict[str, Any]) -> list[Path]:
    points = [Point(**p) for p in summary["points"]]
    if not points:
        return []
    sat = saturation(points)
    summary["saturation"] = {str(n): s for n, s in sat.items()}
    slo = summary["slo_ms"]
    lines = [f"- {n} worker{'s' if n > 1 else ''}: {knee(s)}" for n, s in sat.items()]
    slo_text = " and ".join(f"{k.upper()} <= {v:g} ms" for k, v in slo.items()) or "none"
    legend = (
        f"SLO for goodput: {slo_text}. sent/s: requests sent / sending time; req/s: completed / (first send to last "
        "completion). Latencies in ms. CPU in % of one core during the measured part, summed over a role's processes "
        "(worker = all workers); other = processes outside this benchmark; machine = everything "
        f"({summary['cpus']} cores = {100 * summary['cpus']})."
    )
    offered = "speed" if summary["settings"]["dataset"] in TRACE_DATASETS else "rate"
    knees = "Saturation (the highest rate at which >= 90 % of the requests met the SLO):\n" + "\n".join(lines)
    text = "\n\n".join([f"Command: `{summary['command']}`", legend, format_table(points, offered), knees])
    (out_dir / "table.md").write_text(text + "\n")
    write_json(out_dir / "topology.json", summary)
    print(text, flush=True)
    title = f"{summary['scenario']}: {summary['settings']['workload']}"
    return [out_dir / "table.md", out_dir / "topology.json", *plot(points, out_dir, slo, title)]


def run(args: argparse.Namespace, passthrough: list[str], out_dir: Path, cmd: str) -> dict[str, Any]:
    data = f"random {args.input_len} in / {args.output_len} out" if args.dataset == "random" else args.dataset
    length = f"{args.num_requests} requests" if args.num_requests else f"{args.duration:g} s"
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "report_only"}
    summary: dict[str, Any] = {
        "scenario": args.scenario,
        "command": cmd,
        **provenance(),
        "points": [],
        "deployments": [],
        "settings": settings
        | {
            "workload": f"{data}, mocker speedup {args.speedup:g}, {length} per point",
            "bench_passthrough": passthrough,
        },
        "slo_ms": {k: float(v) for k, _, v in (s.partition(":") for s in args.slo)},
    }
    for n in args.workers:
        rates = args.rates or [round(r * n, 3) for r in args.rates_per_worker]
        spec = spec_for(args, n)
        record: dict[str, Any] = {"workers": n, "rates": rates, "log_dir": f"logs/w{n}"}
        if spec.disagg:
            record |= {"prefill_workers": spec.prefill_workers, "decode_workers": spec.workers}
        summary["deployments"].append(record)
        with bench_lock(), start(spec, out_dir / "logs" / f"w{n}", timeout_s=args.start_timeout) as dep:
            record |= {"start_s": dep.info["start_s"], "roles": dep.roles()}
            print(f"== {args.scenario}, N={n}: ready in {dep.info['start_s']:.1f} s at {dep.base_url}", flush=True)
            for rate in rates:
                point = run_point(args, dep, n, rate, args.seed + len(summary["points"]), out_dir, passthrough)
                summary["points"].append(asdict(point))
                print(
                    f"   rate {rate:g}: {point.request_throughput:.2f} req/s, TTFT p50/p99 {point.ttft_p50:.0f}/"
                    f"{point.ttft_p99:.0f} ms, good {fmt(point.goodput, 2)} req/s, CPU {point.cpu}",
                    flush=True,
                )
        left = group_members(record["roles"].values())
        record["leftovers"] = dep.info["killed_on_stop"] + [f"pid {pid}: {cmd}" for pid, cmd in left.items()]
        write_json(out_dir / "topology.json", summary)
    return summary


def _numbers(cast: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    def parse(text: str) -> list[Any]:
        values = sorted({cast(v) for v in text.split(",") if v.strip()})
        if not values or values[0] <= 0:
            raise argparse.ArgumentTypeError(f"expected positive comma-separated numbers, got {text!r}")
        return values

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.topology", description=__doc__.split("\n\n")[0])
    p.add_argument("--scenario", choices=SCENARIOS, default="agg")
    p.add_argument("--workers", type=_numbers(int), default=[1, 2, 4, 8], metavar="N[,N..]")
    p.add_argument("--prefill-workers", type=int, metavar="P", help="disagg*: P of the N are prefill (default N // 2)")
    rates = p.add_mutually_exclusive_group(required=False)
    rates.add_argument("--rates", type=_numbers(float), metavar="R[,R..]", help="offered req/s, the same for every N")
    rates.add_argument("--rates-per-worker", type=_numbers(float), metavar="R[,R..]", help="N workers get R x N")
    p.add_argument("--out-dir", type=Path, help="default benchmarks/results/topology-<scenario>")
    p.add_argument("--report-only", action="store_true", help="redo table and plots from OUT_DIR/topology.json")
    g = p.add_argument_group("load (zdyn bench)")
    g.add_argument("--dataset", choices=("random", "prefix", *TRACE_DATASETS), default="random")
    g.add_argument("--input-len", type=int, default=1536)
    g.add_argument("--output-len", type=int, default=128)
    g.add_argument("--range-ratio", type=float, default=0.0, help="random: lengths uniform in len x (1 +- r)")
    length = g.add_mutually_exclusive_group()
    length.add_argument("--duration", type=float, default=20.0, help="seconds of sending per point (default 20)")
    length.add_argument("--num-requests", type=int, help="measured requests per point instead of --duration")
    g.add_argument("--warmups", type=int, help="warm-up requests before each point (default max(4, 2 x N))")
    g.add_argument("--slo", nargs="+", default=["ttft:1000", "tpot:100"], metavar="NAME:MS", help="goodput SLO")
    g.add_argument("--seed", type=int, default=0, help="seed of the first point; each next point adds 1")
    g = p.add_argument_group("workers (mocker engine, Dynamo's defaults)")
    g.add_argument("--model", type=Path, help="config and tokenizer (default: the tiny Llama)")
    g.add_argument("--speedup", type=float, default=1.0, help="divide simulated durations by this")
    g.add_argument("--kv-block-size", type=int, default=64)
    g.add_argument("--num-blocks", type=int, default=16384)
    g.add_argument("--max-num-seqs", type=int, default=256)
    g.add_argument("--max-num-batched-tokens", type=int, default=8192)
    g.add_argument("--max-model-len", type=int, default=2048, help="must hold prompt + output (tiny Llama: <= 2048)")
    g.add_argument("--mocker-args", default="", help="more worker flags, one shell-quoted string")
    g.add_argument(
        "--router-mode", help="agg_route, disagg_route: the router's mode (kv, kv-load, round-robin, random)"
    )
    g.add_argument("--start-timeout", type=float, default=120.0, help="seconds for the deployment to serve")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, passthrough = parser.parse_known_args(argv)
    if clash := [a for a in passthrough if a.split("=", 1)[0] in OWN_FLAGS]:
        parser.error(f"set by this script, not passed on to zdyn bench: {' '.join(clash)}")
    out_dir: Path = args.out_dir or RESULTS / f"topology-{args.scenario}"
    if args.report_only:
        print("\n".join(f"wrote {p}" for p in write_report(out_dir, read_json(out_dir / "topology.json"))))
        return 0
    if not args.rates and not args.rates_per_worker:
        parser.error("--rates or --rates-per-worker is required")
    if args.prefill_workers is not None and not args.scenario.startswith("disagg"):
        parser.error("--prefill-workers applies to disagg and disagg_route only")
    args.model = model_or_tiny(args.model)
    try:
        specs = [spec_for(args, n) for n in args.workers]
    except ValueError as e:
        parser.error(f"{e} (N workers in all: P prefill + N - P decode)")
    cmd = command("benchmarks.topology", argv)
    print(f"Command: {cmd} ({len(specs)} deployments)", flush=True)
    summary = run(args, passthrough, out_dir, cmd)
    paths = write_report(out_dir, summary)
    print(footer(cmd, *paths))
    return 1 if any(d.get("leftovers") for d in summary["deployments"]) else 0


if __name__ == "__main__":
    sys.exit(main())
