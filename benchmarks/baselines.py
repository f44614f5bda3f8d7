"""How close does zdyn's whole pipeline get to its pieces' bare ceilings, under the same load with no engine time?

The load of ``benchmarks/ceiling.py`` (closed loop, concurrency 64, 500 requests of 200 in / 64 out after 32 warm-ups),
one system at a time, alternating, ``--reps`` times, each repetition under the benchmark lock:

* ``zdyn``: examples/agg with 2 mocker workers at speedup 1e6 (as in ceiling.py), driven by ``zdyn bench``.
* ``bare-sse`` / ``bare-sse-1``: one uvicorn process (uvloop + httptools, like zdyn) streaming 64 OpenAI chat chunks per
  request, or the 64 tokens as one chunk (what zdyn's frontend sends when a request's tokens are all queued when it
  gets to them): the HTTP ceiling of one Python process, driven by ``zdyn bench``.
* ``bare-zmq`` / ``bare-zmq-batched`` / ``zdyn-rpc``: the same requests x 64 tokens over ROUTER/DEALER with no HTTP and
  2 server processes (``zdyn.bench.zmq_pair``): a message per token, a message per loop turn for all streams, and
  zdyn's Hub/Spoke. TTFT and E2E are the first and last delta.

    python -m benchmarks.baselines --reps 3
    python -m benchmarks.baselines --reps 1 --requests 100 --systems zdyn,bare-sse-1,zdyn-rpc   # a quick look
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from zdyn.bench.deploy import Deployment, ZdynSpec, start
from zdyn.bench.host import bench_lock
from zdyn.bench.inputs import model_or_tiny
from zdyn.bench.procs import free_port
from zdyn.bench.results import (
    RESULTS,
    command,
    footer,
    median,
    provenance,
    pyplot,
    read_json,
    save_figure,
    summary_table,
    table,
    write_json,
)
from zdyn.bench.runs import Load, bench_argv, cpu_pct, idle_workers, measure
from zdyn.bench.servers import start_bare_sse
from zdyn.bench.zmq_pair import ClientSpec, StreamSpec, run_pair

SYSTEMS = ("zdyn", "bare-sse", "bare-sse-1", "bare-zmq", "bare-zmq-batched", "zdyn-rpc")
ZMQ = {"bare-zmq": "bare", "bare-zmq-batched": "bare-batched", "zdyn-rpc": "zdyn"}
LABELS = {
    "zdyn": "zdyn (frontend + 2 mocker procs)",
    "bare-sse": "bare uvicorn SSE, 64 chunks per request",
    "bare-sse-1": "bare uvicorn SSE, 1 chunk per request",
    "bare-zmq": "bare pyzmq, a message per token",
    "bare-zmq-batched": "bare pyzmq, a message per loop turn",
    "zdyn-rpc": "zdyn Hub/Spoke alone (no HTTP)",
}
COLUMNS = [("req/s", lambda r: r["req_s"], None), ("output tok/s", lambda r: r["out_tok_s"], 0),
           ("TTFT p50 ms", lambda r: r["ttft_p50"], None), ("TTFT p99 ms", lambda r: r["ttft_p99"], None),
           ("E2E p50 ms", lambda r: r["e2e_p50"], None), ("chunks (messages)/req", lambda r: r["chunks_per_req"], None),
           ("server CPU %", lambda r: cpu_pct(r, "frontend") + cpu_pct(r, "worker"), 0),
           ("load generator CPU %", lambda r: cpu_pct(r, "load generator"), 0)]  # fmt: skip


def zmq_row(load: Load, system: str) -> dict[str, Any]:
    """The no-HTTP rows: the bare pair's closed loop with 2 servers, unpinned like the deployments."""
    stream = StreamSpec(concurrency=load.concurrency, requests=load.requests, deltas=load.output_len,
                        prompt_tokens=load.input_len, warmup_requests=load.warmups)  # fmt: skip
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    result = run_pair(ZMQ[system], endpoint, ClientSpec(streams=[stream]), num_servers=2)
    s = result["streams"][0]
    return {"req_s": s["req_per_s"], "out_tok_s": s["deltas_per_s"], "ttft_p50": s["ttft_p50_ms"],
            "ttft_p99": s["ttft_p99_ms"], "e2e_p50": s["latency_p50_ms"], "e2e_p99": s["latency_p99_ms"],
            "chunks_per_req": s["server_messages"] / s["requests"], "completed": s["requests"], "failed": 0,
            "window_s": s["elapsed_s"],
            "cpu_s": {"load generator": s["client_cpu_s"], "worker": s["server_cpu_s"],
                      "other": result["foreign_cpu_s"] * s["elapsed_s"] / result["wall_s"]},  # prorated
            "command": f"zdyn.bench.zmq_pair.run_pair({ZMQ[system]!r}, 2 servers, {asdict(stream)})"}  # fmt: skip


def deployment(system: str, model: Path, logs: Path, output_len: int) -> contextlib.AbstractContextManager[Deployment]:
    if system == "zdyn":
        return start(ZdynSpec("agg", workers=2, model=str(model), worker_args=("--speedup", "1e6")), logs)
    return start_bare_sse(1 if system == "bare-sse-1" else output_len, logs)


def run(model: Path, load: Load, work: Path, system: str, rep: int) -> dict[str, Any]:
    if system in ZMQ:
        row = zmq_row(load, system)
    else:
        logs = work / f"{system}-{rep}"
        with deployment(system, model, logs, load.output_len) as dep:
            argv = bench_argv(dep.base_url, model, logs / "bench.json", f"{system} #{rep}", "--model", dep.model,
                              *load.flags())  # fmt: skip
            row = measure(dep, argv, logs / "bench.log", interval_s=0.02)
    row |= {"system": system, "rep": rep}
    if idle := idle_workers(row):
        row["invalid"] = f"idle during the run: {', '.join(idle)}"
    print(f"  {system:17} rep {rep}: {row['req_s']:7.1f} req/s TTFT p50 {row['ttft_p50']:6.1f} ms, "
          f"other CPU {cpu_pct(row, 'other'):.0f}% {row.get('invalid', '')}", file=sys.stderr, flush=True)  # fmt: skip
    return row


def by_system(rows: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    return {s: [r for r in rows if r["system"] == s and "invalid" not in r] for s in SYSTEMS}


def report(doc: dict[str, Any]) -> str:
    groups, load = by_system(doc["rows"]), doc["settings"]["load"]
    out = [f"no engine time: concurrency {load['concurrency']}, {load['requests']} requests after {load['warmups']} "
           f"warm-ups, {load['input_len']} in / {load['output_len']} out; median (range) over repetitions",
           summary_table({LABELS[s]: rs for s, rs in groups.items()}, COLUMNS, "system")]  # fmt: skip
    z = groups["zdyn"]
    refs = [(s, rs) for s, rs in groups.items() if s != "zdyn" and rs]
    if z and refs:
        rows = [
            [
                LABELS[s],
                f"{median(r['ttft_p50'] for r in z) - median(r['ttft_p50'] for r in rs):+.1f}",
                f"{100 * median(r['req_s'] for r in z) / median(r['req_s'] for r in rs):.0f}%",
            ]
            for s, rs in refs
        ]
        out += [
            "\nzdyn against each baseline (medians)",
            table(["baseline", "zdyn TTFT p50 added (ms)", "zdyn req/s as % of the baseline's"], rows),
        ]
    return "\n".join(out)  # fmt: skip


def plot(doc: dict[str, Any], path: Path) -> Path:
    groups = {s: rs for s, rs in by_system(doc["rows"]).items() if rs}
    plt, x = pyplot(), np.arange(len(groups))
    fig, axes = plt.subplots(1, 2, figsize=(14, 5))
    colors = ["C0" if s.startswith("zdyn") else "C7" for s in groups]
    axes[0].bar(x, [median(r["req_s"] for r in rs) for rs in groups.values()], color=colors)
    axes[0].set(ylabel="req/s (median)", title="requests/s")
    for k, key in enumerate(("ttft_p50", "ttft_p99", "e2e_p50")):
        axes[1].bar(x + (k - 1) * 0.27, [median(r[key] for r in rs) for rs in groups.values()], 0.27, label=key)
    axes[1].set(ylabel="ms (median)", title="latency (zmq rows: first / last delta)")
    axes[1].legend()
    for ax in axes:
        ax.set_xticks(x, list(groups), fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path, "zdyn against bare uvicorn SSE and bare pyzmq, same load, no engine time")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m benchmarks.baselines", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="config + tokenizer (default: the tiny Llama)")
    p.add_argument("--reps", type=int, default=3, help="repetitions of every system, alternating")
    p.add_argument("--systems", default=",".join(SYSTEMS), help="default: all")
    p.add_argument("--requests", type=int, default=500)
    p.add_argument("--out", type=Path, default=RESULTS / "baselines.json")
    p.add_argument("--report", type=Path, metavar="JSON", help="only print the tables of a finished run")
    args = p.parse_args(argv)
    if args.report:
        print(report(read_json(args.report)))
        return 0
    cmd, systems = command("benchmarks.baselines", argv), [s for s in args.systems.split(",") if s]
    if unknown := set(systems) - set(SYSTEMS):
        p.error(f"unknown systems: {', '.join(sorted(unknown))}")
    model, load = model_or_tiny(args.model), Load(requests=args.requests)
    work = Path(tempfile.mkdtemp(prefix="zdyn-baselines-"))
    doc: dict[str, Any] = {"benchmark": "baselines", "command": cmd, **provenance(), "rows": [],
                           "settings": {"load": asdict(load), "reps": args.reps, "work_dir": str(work)}}  # fmt: skip
    t0 = time.monotonic()
    for rep in range(args.reps):
        order = systems[rep % len(systems) :] + systems[: rep % len(systems)]  # rotate who goes first
        with bench_lock():
            doc["rows"] += [run(model, load, work, system, rep) for system in order]
    doc["wall_s"] = time.monotonic() - t0
    write_json(args.out, doc)
    print(report(doc))
    print(footer(cmd, args.out, plot(doc, args.out.with_suffix(".png"))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
