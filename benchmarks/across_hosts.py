"""What an added round-trip time between hosts costs agg and disagg (simulated workers, one machine).

This kernel has no netem, so the "other host" is reached through ``zdyn.bench.delay``, a userspace TCP shim that
holds every chunk for half the RTT each way. One deployment per scenario, on loopback:

- agg: frontend (with its processor) on host A, 2 mocker workers on host B: the workers dial the frontend's hub
  through the shim, so every request's Generate and its outputs cross it.
- disagg (the design sketch's recipe): frontend, prefill queue and 1 decode worker on host A, 1 prefill worker
  on host B: the prefill worker dials the queue's hub through the shim, so every remote prefill's job and result
  cross it (the mocker moves no KV bytes; vLLM's NIXL pull would add its own transfer on top).

The shim's RTT is changed between runs without restarting anything (0 = through the shim, no delay), and the
settings alternate within each repetition, so slow drift of the machine hits all of them alike. Random 512-token
prompts (past the decode worker's --max-local-prefill-length 256: every prefill is remote), 32 output tokens;
throughput from a closed loop at concurrency 8, TTFT from Poisson arrivals at 4 req/s (about half of capacity, so
the added latency does not also show up as queueing).

    python -m benchmarks.across_hosts                 # ~10 min: 2 scenarios x 4 RTTs x 2 repetitions x 2 loads
    python -m benchmarks.across_hosts --rtts 0 50 --reps 1 --requests 60
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from zdyn.bench.host import bench_lock
from zdyn.bench.procs import ProcessGroup, free_ports, wait_for_workers, wait_until
from zdyn.bench.results import RESULTS, command, fmt, footer, table, write_json
from zdyn.bench.runs import Load, bench_argv, run_bench
from zdyn.models import build_tiny_llama, cache_dir

MOCKER = ["--engine", "mocker", "--block-size", "32", "--max-model-len", "2048", "--speedup", "1"]
COMMON = ["--heartbeat-interval", "1", "--no-discover"]


def deploy(scenario: str, group: ProcessGroup, model: Path, delay_file: Path) -> str:
    """Start ``scenario`` with its cross-host link through the delay shim; the frontend's base URL."""
    http, hub, shim, jobs, prefill_hub, status = free_ports(6)
    env: dict[str, str] = {}
    group.start("frontend", ["zdyn", "frontend", "--model", str(model), "--port", str(http),
                             "--workers-endpoint", f"tcp://127.0.0.1:{hub}", *COMMON], env)  # fmt: skip
    target = prefill_hub if scenario == "disagg" else hub
    group.start("shim", [sys.executable, "-m", "zdyn.bench.delay", "--listen", f"127.0.0.1:{shim}", "--target",
                         f"127.0.0.1:{target}", "--delay-file", str(delay_file)])  # fmt: skip
    worker = ["zdyn", "worker", "--model", str(model), *MOCKER, "--no-kv-events", *COMMON]
    if scenario == "agg":
        for i in range(2):
            group.start(f"worker{i}", [*worker, "--connect", f"tcp://127.0.0.1:{shim}", "--worker-id", f"w{i}"], env)
        wait_for_workers(f"http://127.0.0.1:{http}", 2, group, timeout_s=60)
        return f"http://127.0.0.1:{http}"
    group.start("queue", ["zdyn", "prefill-queue", "--jobs-endpoint", f"tcp://127.0.0.1:{jobs}",
                          "--prefill-workers-endpoint", f"tcp://127.0.0.1:{prefill_hub}",
                          "--status-endpoint", f"tcp://127.0.0.1:{status}", *COMMON], env)  # fmt: skip
    group.start("prefill0", [*worker, "--prefill", "--connect", f"tcp://127.0.0.1:{shim}", "--worker-id", "p0"], env)
    group.start("decode0", [*worker, "--connect", f"tcp://127.0.0.1:{hub}", "--worker-id", "d0", "--prefill-queue",
                            f"tcp://127.0.0.1:{jobs}", "--prefill-queue-status", f"tcp://127.0.0.1:{status}",
                            "--max-local-prefill-length", "256"], env)  # fmt: skip
    wait_for_workers(f"http://127.0.0.1:{http}", 1, group, timeout_s=60)
    wait_until(lambda: "prefill worker" in group.log("queue") or "joined at" in group.log("queue"),
               "the prefill worker at the queue", 60, group)  # fmt: skip
    time.sleep(2.0)  # the decode worker hears the queue's status (once a second) before it sends jobs there
    return f"http://127.0.0.1:{http}"


def measure(base_url: str, model: Path, out: Path, label: str, load: Load) -> dict[str, Any]:
    run = run_bench(bench_argv(base_url, model, out / f"{label}.json", label, *load.flags()), out / f"{label}.log")
    figures = run.figures()
    return {"req_s": figures["req_s"], "ttft_p50": figures["ttft_p50"], "ttft_p99": figures["ttft_p99"],
            "tpot_p50": figures["tpot_p50"], "failed": figures["failed"]}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.across_hosts", description=__doc__)
    parser.add_argument("--rtts", type=float, nargs="+", default=[0.0, 1.0, 10.0, 50.0], help="added RTTs, ms")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--requests", type=int, default=80, help="measured requests per run")
    parser.add_argument("--rate", type=float, default=4.0, help="req/s of the open-loop (TTFT) runs")
    parser.add_argument("--scenarios", nargs="+", default=["agg", "disagg"], choices=["agg", "disagg"])
    args = parser.parse_args(argv)
    cmd = command("benchmarks.across_hosts", sys.argv[1:] if argv is None else argv)
    out = RESULTS / "across_hosts" / "raw"  # git-ignored: every run's result JSON and log, and the roles' logs
    out.mkdir(parents=True, exist_ok=True)
    model = build_tiny_llama(cache_dir() / "models" / "tiny-llama")
    loads = {  # closed loop: throughput; Poisson at half of it: TTFT without queueing behind the added latency
        "closed": Load(concurrency=8, requests=args.requests, warmups=8, input_len=512, output_len=32),
        "open": Load(concurrency=32, requests=args.requests, warmups=8, input_len=512, output_len=32,
                     request_rate=args.rate),
    }  # fmt: skip
    rows: dict[tuple[str, float], list[dict[str, Any]]] = {}
    with bench_lock():
        for scenario in args.scenarios:
            delay_file = out / f"{scenario}.rtt_ms"
            delay_file.write_text("0")
            with ProcessGroup(out / "logs" / scenario) as group:
                base_url = deploy(scenario, group, model, delay_file)
                for rep in range(args.reps):
                    for rtt in args.rtts:
                        delay_file.write_text(f"{rtt:g}")
                        time.sleep(1.5)  # the shim re-reads it once a second
                        closed = measure(base_url, model, out, f"{scenario}-{rtt:g}ms-{rep}", loads["closed"])
                        opened = measure(base_url, model, out, f"{scenario}-{rtt:g}ms-{rep}-open", loads["open"])
                        failed = closed["failed"] + opened["failed"]
                        result = {"req_s": closed["req_s"], "ttft_p50": opened["ttft_p50"],
                                  "ttft_p99": opened["ttft_p99"], "failed": failed}  # fmt: skip
                        rows.setdefault((scenario, rtt), []).append(result)
                        print(f"{scenario} +{rtt:g} ms RTT rep {rep}: {result}", flush=True)
    summary = []
    for (scenario, rtt), runs in rows.items():
        base = rows[(scenario, args.rtts[0])]
        req_s = statistics.median(r["req_s"] for r in runs)
        ttft = statistics.median(r["ttft_p50"] for r in runs)
        summary.append({
            "scenario": scenario, "rtt_ms": rtt, "req_s": req_s, "ttft_p50": ttft, "reps": len(runs),
            "ttft_p99": statistics.median(r["ttft_p99"] for r in runs),
            "req_s_change": req_s / statistics.median(r["req_s"] for r in base) - 1,
            "ttft_added": ttft - statistics.median(r["ttft_p50"] for r in base),
            "failed": sum(r["failed"] for r in runs),
        })  # fmt: skip
    headers = ["scenario", "added RTT", "req/s (closed)", "vs 0 ms", "TTFT p50 (open)", "added", "TTFT p99", "failed"]
    print(table(headers, [
        [s["scenario"], f"{s['rtt_ms']:g} ms", fmt(s["req_s"], 2), f"{100 * s['req_s_change']:+.1f} %",
         fmt(s["ttft_p50"], 1), f"{s['ttft_added']:+.1f} ms", fmt(s["ttft_p99"], 1), str(s["failed"])]
        for s in summary
    ]))  # fmt: skip
    doc = {"command": cmd, "loads": {k: vars(v) for k, v in loads.items()}, "summary": summary}
    path = write_json(RESULTS / "across_hosts.json", doc)
    print(footer(cmd, path))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
