"""The transport alone: zdyn's streaming RPC (``Hub``/``Spoke``) versus bare pyzmq on the same socket types.

Two processes (``zdyn.bench.zmq_pair``: the client binds a ROUTER as zdyn's ``Hub`` does, the server connects a
DEALER as a ``Spoke`` does), uvloop, ``zmq.asyncio``, one I/O thread each. Servers: ``bare`` (msgspec-MessagePack
dicts shaped like zdyn's ``Delta``, one message per delta, a client that is one reader loop), ``bare-batched`` (one
message per event-loop turn with a delta for every active stream, as an engine step) and ``zdyn`` (``Hub.stream`` to
a ``Spoke`` whose handler yields one delta per loop turn).

Measured: (a) round trip of one request -> one reply, p50/p99; (b) N concurrent streams of M deltas each: deltas
(tokens)/s, messages/s, CPU per delta of client and server. Ratios are zdyn / bare. The run holds the benchmark lock.

By default the client is pinned to CPU 0 and the server to CPU 1 (their ZeroMQ I/O threads inherit it). Unpinned,
on this 2-core box, streaming runs flip between two modes: in the slow one every send of the client stalls for ~1 ms
(its thread is descheduled when it wakes its own I/O thread, busy with the incoming stream), so the server sees
requests one at a time. ``--no-pin`` measures that placement.

    python -m benchmarks.transport                      # about 1 minute
    python -m benchmarks.transport --transports tcp --reps 1 --streams 1,64 --rtt-count 1000   # quick look
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import zmq

from zdyn.bench.host import bench_lock, lock_path
from zdyn.bench.results import (
    RESULTS,
    command,
    fmt,
    footer,
    median,
    mr,
    provenance,
    pyplot,
    save_figure,
    table,
    write_json,
)
from zdyn.bench.zmq_pair import ClientSpec, RttSpec, StreamSpec, run_pair
from zdyn.bench.zmq_servers import IMPLS

RTT_IMPLS = ("bare", "zdyn")  # one request -> one reply: batching makes no difference
RTT_COLUMNS = ("p50_us", "p99_us", "round_trips_per_s", "client_cpu_us_per_rt", "server_cpu_us_per_rt")
STREAM_COLUMNS = ("deltas_per_s", "messages_per_s", "deltas_per_message", "ttft_p50_ms", "client_cpu_us_per_delta",
                  "server_cpu_us_per_delta")  # fmt: skip


def endpoint_for(transport: str, tag: str) -> str:
    if transport == "ipc":
        return f"ipc://{tempfile.gettempdir()}/zdyn-transport-{tag}-{time.monotonic_ns()}.sock"
    from zdyn.bench.procs import free_port

    return f"tcp://127.0.0.1:{free_port()}"


def aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Values per repetition, per (transport, impl) for RTT and per (transport, impl, N) for streams."""
    agg: dict[str, Any] = {"rtt": {}, "streams": {}}
    for run in runs:
        key = f"{run['transport']}/{run['impl']}"
        if "rtt" in run:
            slot = agg["rtt"].setdefault(key, {c: [] for c in RTT_COLUMNS})
            for c in RTT_COLUMNS:
                slot[c].append(run["rtt"][c])
        for s in run["streams"]:
            slot = agg["streams"].setdefault(f"{key}/{s['concurrency']}", {c: [] for c in STREAM_COLUMNS})
            for c in STREAM_COLUMNS:
                slot[c].append(s[c])
    return agg


def med(agg: dict[str, Any], section: str, key: str, column: str) -> float:
    return median(agg[section].get(key, {}).get(column, []))


def report(agg: dict[str, Any], transports: Sequence[str], streams: Sequence[int], deltas: int) -> str:
    rows = []
    for t in transports:
        rows += [[t, impl, *(mr(agg["rtt"][f"{t}/{impl}"][c]) for c in RTT_COLUMNS)] for impl in RTT_IMPLS
                 if f"{t}/{impl}" in agg["rtt"]]  # fmt: skip
        rows.append([t, "zdyn/bare", *(fmt(med(agg, "rtt", f"{t}/zdyn", c) / med(agg, "rtt", f"{t}/bare", c))
                                       for c in RTT_COLUMNS)])  # fmt: skip
    out = ["(a) round trip, one request -> one reply (one delta with finish); median (range) over repetitions",
           table(["transport", "impl", "RTT p50 µs", "RTT p99 µs", "rt/s", "client CPU µs/rt", "server CPU µs/rt"],
                 rows)]  # fmt: skip
    rows = [[t, str(n), impl, *(mr(agg["streams"][f"{t}/{impl}/{n}"][c]) for c in STREAM_COLUMNS)]
            for t in transports for n in streams for impl in IMPLS if f"{t}/{impl}/{n}" in agg["streams"]]  # fmt: skip
    out += [f"\n(b) streaming: N concurrent streams x {deltas} deltas; median (range) over repetitions",
            table(["transport", "N", "impl", "deltas/s", "messages/s", "deltas/msg", "TTFT p50 ms",
                   "client CPU µs/delta", "server CPU µs/delta"], rows)]  # fmt: skip
    rows = []
    for t in transports:
        for n in streams:

            def vs(other: str, column: str, t: str = t, n: int = n) -> str:
                zdyn = med(agg, "streams", f"{t}/zdyn/{n}", column)
                return fmt(zdyn / med(agg, "streams", f"{t}/{other}/{n}", column))

            rows.append([t, str(n), vs("bare", "deltas_per_s"), vs("bare", "messages_per_s"),
                         vs("bare-batched", "deltas_per_s"), vs("bare-batched", "messages_per_s")])  # fmt: skip
    out += ["\nratios zdyn / bare (medians): against per-token bare and engine-step bare",
            table(["transport", "N", "deltas/s vs bare", "msgs/s vs bare", "deltas/s vs bare-batched",
                   "msgs/s vs bare-batched"], rows)]  # fmt: skip
    return "\n".join(out)


def plot(agg: dict[str, Any], transports: Sequence[str], streams: Sequence[int], deltas: int, out: Path,
         placement: str) -> Path:  # fmt: skip
    plt = pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    ax = axes[0][0]
    labels = [f"{t}\n{impl}" for t in transports for impl in RTT_IMPLS]
    x = np.arange(len(labels))
    for k, (column, name) in enumerate((("p50_us", "p50"), ("p99_us", "p99"))):
        values = [med(agg, "rtt", f"{t}/{impl}", column) for t in transports for impl in RTT_IMPLS]
        ax.bar(x + (k - 0.5) * 0.4, values, 0.4, label=name)
    ax.set(xticks=x, xticklabels=labels, ylabel="round trip (µs)", title="(a) one request -> one reply")
    ax.legend()
    styles = {"bare": "o-", "bare-batched": "s--", "zdyn": "^-"}
    for ax, column, ylabel in ((axes[0][1], "deltas_per_s", "deltas (tokens) / s"),
                               (axes[1][0], "messages_per_s", "messages / s"),
                               (axes[1][1], "server_cpu_us_per_delta", "server CPU µs / delta")):  # fmt: skip
        for t in transports:
            for impl in IMPLS:
                ys = [med(agg, "streams", f"{t}/{impl}/{n}", column) for n in streams]
                ax.plot(streams, ys, styles[impl], label=f"{impl} ({t})", alpha=0.9 if t == "tcp" else 0.5)
        ax.set_xscale("log", base=2)
        if column == "deltas_per_s":
            ax.set_yscale("log")
        ax.set(xlabel="concurrent streams N", ylabel=ylabel, title=f"(b) N streams x {deltas} deltas: {ylabel}")
        ax.grid(alpha=0.3)
    axes[0][1].legend(fontsize=8)
    title = f"zdyn Hub/Spoke vs bare pyzmq (ROUTER binds, DEALER connects; uvloop; {placement}; medians)"
    return save_figure(fig, out, title)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.transport", description=__doc__.split("\n\n")[0])
    p.add_argument("--transports", default="tcp,ipc", help="comma-separated: tcp, ipc (default %(default)s)")
    p.add_argument("--reps", type=int, default=3, help="repetitions of every case, alternating impls")
    p.add_argument("--rtt-count", type=int, default=5000, help="measured round trips (after 10 %% warm-up)")
    p.add_argument("--streams", type=lambda t: [int(v) for v in t.split(",")], default=[1, 8, 64, 256],
                   help="N values (default 1,8,64,256)")  # fmt: skip
    p.add_argument("--deltas", type=int, default=500, help="deltas per stream M (default %(default)s)")
    p.add_argument(
        "--pin",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="client on CPU 0, server on CPU 1 (default); --no-pin leaves placement to the scheduler",
    )
    p.add_argument("--out", type=Path, default=RESULTS / "transport.json")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    cmd = command("benchmarks.transport", argv)
    transports = [t for t in args.transports.split(",") if t]
    streams = [StreamSpec(concurrency=n, requests=n, deltas=args.deltas, warmup_requests=n) for n in args.streams]
    rtt = RttSpec(count=args.rtt_count, warmup=max(1, args.rtt_count // 10))
    cpus = ("0", "1") if args.pin else ("", "")
    runs: list[dict[str, Any]] = []
    with bench_lock() as waited:
        t0 = time.monotonic()
        for rep in range(args.reps):
            for transport in transports:
                for impl in IMPLS if rep % 2 == 0 else tuple(reversed(IMPLS)):  # alternate who goes first
                    spec = ClientSpec(rtt=rtt if impl in RTT_IMPLS else None, streams=streams)
                    result = run_pair(impl, endpoint_for(transport, f"{impl}-{rep}"), spec, client_cpus=cpus[0],
                                      server_cpus=cpus[1])  # fmt: skip
                    runs.append(result | {"transport": transport, "rep": rep})
                    by_n = {x["concurrency"]: round(x["deltas_per_s"]) for x in result["streams"]}
                    rt = f" rtt p50 {result['rtt']['p50_us']:.0f} µs" if "rtt" in result else ""
                    print(f"rep {rep} {transport:3} {impl:12}{rt} deltas/s by N {by_n} "
                          f"(foreign CPU {result['foreign_cpu_s']:.2f} s)", file=sys.stderr, flush=True)  # fmt: skip
        wall = time.monotonic() - t0
    agg = aggregate(runs)
    placement = "client on CPU 0, server on CPU 1" if args.pin else "unpinned"
    foreign = [r["foreign_cpu_s"] for r in runs]
    doc = {
        "benchmark": "transport", "command": cmd, **provenance(),
        "versions": {"pyzmq": zmq.__version__, "libzmq": zmq.zmq_version(), "msgspec": msgspec.__version__},
        "settings": {"transports": transports, "reps": args.reps, "rtt": asdict(rtt),
                     "streams": [asdict(s) for s in streams], "loop": "uvloop",
                     "pinning": {"client": cpus[0] or None, "server": cpus[1] or None}, "lock": lock_path(),
                     "lock_wait_s": waited},
        "wall_s": wall,
        "foreign_cpu_s": {"median": statistics.median(foreign), "max": max(foreign)},
        "aggregate": agg,
        "runs": runs,
    }  # fmt: skip
    write_json(args.out, doc)
    png = plot(agg, transports, args.streams, args.deltas, args.out.with_suffix(".png"), placement)
    print(report(agg, transports, args.streams, args.deltas))
    print(f"\nplacement: {placement}; foreign CPU during a case (other processes on the box): median "
          f"{statistics.median(foreign):.2f} s, max {max(foreign):.2f} s")  # fmt: skip
    print(footer(cmd, args.out, png))
    return 0


if __name__ == "__main__":
    sys.exit(main())
