"""Micro-benchmark of the KV router's pure logic: decision latency and KV-event throughput.

For W workers and block size B it indexes about 1M blocks (shared documents cached by subsets of workers, unique
tails, unique sequences; see ``zdyn/bench/router_workload.py``), then measures:

- ``KvRouter.route`` latency (hashing, overlap walk, policy, in-flight accounting, prediction) for prompts of
  1k, 8k and 32k tokens, 50-90 % of each a cached document; and ``match`` = ``hash_blocks`` + ``overlaps`` alone;
- block events applied per second: BlockStored while building the index (``apply_batch``), BlockRemoved one
  block per event as vLLM sends them, and the full wire path ``decode_payload`` + ``apply_batch`` of vLLM 0.32
  payloads.

Run: ``python -m benchmarks.router_speed`` (it holds the benchmark lock).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from zdyn.bench.host import bench_lock
from zdyn.bench.results import RESULTS as RESULTS_DIR
from zdyn.bench.results import command as command_line
from zdyn.bench.router_workload import Stored, Workload
from zdyn.kv_events import KvBlockRemoved, KvBlockStored, KvEvent, KvEventBatch, decode_payload, encode_payload
from zdyn.router import KvRouter, WorkerState
from zdyn.router.hashing import hash_blocks

PROMPT_TOKENS = (1024, 8192, 32768)
EVENTS_PER_BATCH = 8  # BlockStored events per batch (one engine step)
REMOVED_PER_BATCH = 64  # BlockRemoved events per batch, one hash each
IN_FLIGHT = 64  # requests kept in flight while timing route()
TARGETS = {"route_p99_ms_8k_64w": 1.0, "block_events_per_s": 200_000}
RESULTS = RESULTS_DIR / "router_speed.json"


def stored_event(e: Stored, block_size: int) -> KvBlockStored:
    return KvBlockStored(e.hashes, e.parent, e.tokens, block_size)


def pct(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def rss_mib() -> float:
    """Resident set size of this process (Linux), 0 elsewhere."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0.0
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def build(router: KvRouter, workload: Workload) -> dict[str, float]:
    """Index the workload; time only ``apply_batch`` (event objects are made outside the clock)."""
    names = [f"w{i}" for i in range(workload.num_workers)]
    elapsed, blocks, pending = 0.0, 0, []
    for e in workload.stored_events():
        pending.append(e)
        if len(pending) == EVENTS_PER_BATCH:
            elapsed += apply_stored(router, names, pending, workload.block_size)
            blocks += sum(len(p.hashes) for p in pending)
            pending = []
    if pending:
        elapsed += apply_stored(router, names, pending, workload.block_size)
        blocks += sum(len(p.hashes) for p in pending)
    return {"blocks": blocks, "seconds": elapsed, "blocks_per_s": blocks / elapsed}


def apply_stored(router: KvRouter, names: list[str], events: list[Stored], block_size: int) -> float:
    by_worker: dict[int, list[KvEvent]] = {}
    for e in events:
        by_worker.setdefault(e.worker, []).append(stored_event(e, block_size))
    batches = [(names[w], KvEventBatch(0, 0.0, evs)) for w, evs in by_worker.items()]
    t0 = time.perf_counter()
    for name, batch in batches:
        router.apply_events(name, batch)
    return time.perf_counter() - t0


def time_routes(router: KvRouter, prompts: list[list[int]]) -> dict[str, float]:
    route_ms, match_ms, overlaps = [], [], []
    indexer, block_size = router.indexer, router.block_size
    for i, tokens in enumerate(prompts):
        t0 = time.perf_counter_ns()
        overlap = indexer.overlaps(hash_blocks(tokens, block_size), time.monotonic())
        t1 = time.perf_counter_ns()
        d = router.route(f"q{i}", tokens)
        t2 = time.perf_counter_ns()
        match_ms.append((t1 - t0) / 1e6)
        route_ms.append((t2 - t1) / 1e6)
        overlaps.append(d.overlap_blocks / max(1, len(tokens) // block_size))
        assert overlap.get(d.worker, 0) <= d.overlap_blocks
        if i >= IN_FLIGHT:
            router.prefilled(f"q{i - IN_FLIGHT}")
            router.finished(f"q{i - IN_FLIGHT}")
    for i in range(max(0, len(prompts) - IN_FLIGHT), len(prompts)):
        router.finished(f"q{i}")
    return {
        "route_p50_ms": pct(route_ms, 50),
        "route_p99_ms": pct(route_ms, 99),
        "match_p50_ms": pct(match_ms, 50),
        "match_p99_ms": pct(match_ms, 99),
        "mean_overlap_fraction": statistics.fmean(overlaps),
    }


def time_removals(router: KvRouter, workload: Workload, max_blocks: int) -> dict[str, float]:
    """Remove unique sequences' blocks, one hash per BlockRemoved event, leaves first like an LRU would."""
    batches: list[tuple[str, KvEventBatch]] = []
    n = 0
    for worker, hashes in workload.unique_seqs:
        events: list[KvEvent] = [KvBlockRemoved([h]) for h in reversed(hashes)]
        for i in range(0, len(events), REMOVED_PER_BATCH):
            batches.append((f"w{worker}", KvEventBatch(0, 0.0, events[i : i + REMOVED_PER_BATCH])))
        n += len(events)
        if n >= max_blocks:
            break
    t0 = time.perf_counter()
    for name, batch in batches:
        router.apply_events(name, batch)
    elapsed = time.perf_counter() - t0
    assert router.indexer.stats["unknown_block_removed"] == 0
    return {"blocks": n, "blocks_per_s": n / elapsed}


def time_wire(router: KvRouter, workload: Workload, num_blocks: int) -> dict[str, float]:
    """decode_payload + apply_batch of vLLM 0.32 payloads: new sequences stored, then all removed."""
    fresh = workload.fresh_sequences(num_blocks, seed=7)
    stored = [
        (f"w{e.worker}", encode_payload([stored_event(e, workload.block_size)], ts=0.0, data_parallel_rank=0))
        for e in fresh
    ]
    removed = []
    for e in fresh:
        for i in range(0, len(e.hashes), REMOVED_PER_BATCH):
            chunk = [KvBlockRemoved([h]) for h in e.hashes[i : i + REMOVED_PER_BATCH]]
            removed.append((f"w{e.worker}", encode_payload(chunk, ts=0.0, data_parallel_rank=0)))
    out: dict[str, float] = {"blocks": num_blocks}
    for kind, payloads in (("stored", stored), ("removed", removed)):
        t0 = time.perf_counter()
        for seq, (name, payload) in enumerate(payloads):
            router.apply_events(name, decode_payload(payload, seq))
        out[f"{kind}_blocks_per_s"] = num_blocks / (time.perf_counter() - t0)
        out[f"{kind}_payload_bytes"] = sum(len(p) for _, p in payloads)
    return out


def run_config(num_workers: int, block_size: int, args: argparse.Namespace) -> dict[str, Any]:
    workload = Workload(num_workers, block_size, args.blocks, seed=args.seed)
    router = KvRouter(block_size, seed=args.seed)
    for i in range(num_workers):
        router.add_worker(WorkerState(f"w{i}", num_kv_blocks=args.blocks // num_workers * 2, max_num_seqs=256))
    result: dict[str, Any] = {"workers": num_workers, "block_size": block_size}
    rss_before = rss_mib()
    result["store"] = build(router, workload)
    gc.collect()
    gc.freeze()  # the index is long-lived, as in a router process: keep the cyclic GC from rescanning it
    result["indexed_blocks"] = router.indexer.num_blocks()
    result["distinct_blocks"] = router.indexer.num_hashes
    result["index_rss_mib"] = rss_mib() - rss_before  # approximate: what building the index added
    result["routes"] = {}
    for n in PROMPT_TOKENS:
        prompts = workload.prompts(n, args.prompts, seed=n)
        time_routes(router, prompts[: min(20, len(prompts))])  # warm-up
        result["routes"][str(n)] = time_routes(router, prompts)
    result["remove"] = time_removals(router, workload, args.event_blocks)
    result["wire"] = time_wire(router, workload, args.event_blocks)
    result["stats"] = dict(router.indexer.stats)
    del router, workload
    gc.unfreeze()
    gc.collect()
    return result


def table(results: list[dict]) -> str:
    head = "| W | block | indexed blocks (distinct) | index MiB | "
    head += " | ".join(f"route {n // 1024}k p50 / p99 ms" for n in PROMPT_TOKENS)
    head += " | match 8k p50 / p99 ms | stored blocks/s | removed blocks/s | wire stored / removed blocks/s |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        routes = " | ".join(
            f"{r['routes'][str(n)]['route_p50_ms']:.3f} / {r['routes'][str(n)]['route_p99_ms']:.3f}"
            for n in PROMPT_TOKENS
        )
        m = r["routes"]["8192"]
        lines.append(
            f"| {r['workers']} | {r['block_size']} | {r['indexed_blocks']:,} ({r['distinct_blocks']:,}) | "
            f"{r['index_rss_mib']:.0f} | {routes} | "
            f"{m['match_p50_ms']:.3f} / {m['match_p99_ms']:.3f} | {r['store']['blocks_per_s']:,.0f} | "
            f"{r['remove']['blocks_per_s']:,.0f} | "
            f"{r['wire']['stored_blocks_per_s']:,.0f} / {r['wire']['removed_blocks_per_s']:,.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", default="8,64,256", help="comma-separated worker counts")
    p.add_argument("--block-sizes", default="16,64", help="comma-separated block sizes")
    p.add_argument("--blocks", type=int, default=1_000_000, help="blocks indexed (summed over workers)")
    p.add_argument("--prompts", type=int, default=300, help="routed prompts per prompt length")
    p.add_argument("--event-blocks", type=int, default=100_000, help="blocks in the removal and wire runs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    results = []
    with bench_lock():
        for block_size in map(int, args.block_sizes.split(",")):
            for num_workers in map(int, args.workers.split(",")):
                t0 = time.perf_counter()
                results.append(run_config(num_workers, block_size, args))
                print(f"W={num_workers} B={block_size}: done in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    command = command_line("benchmarks.router_speed", sys.argv[1:])
    print(table(results))
    check = next((r for r in results if r["workers"] == 64 and r["block_size"] == 16), None)
    if check is not None:
        p99 = check["routes"]["8192"]["route_p99_ms"]
        rate = min(check["store"]["blocks_per_s"], check["remove"]["blocks_per_s"])
        print(
            f"\ntargets (W=64, B=16): route p99 at 8k tokens {p99:.3f} ms (target < 1 ms); "
            f"slowest block-event rate {rate:,.0f}/s (target >= 200k/s)"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "command": command,
        "python": platform.python_version(),
        "machine": platform.processor() or platform.machine(),
        "loadavg_1m_at_end": os.getloadavg()[0],  # other work on the box skews the timings
    }
    args.out.write_text(json.dumps({"meta": meta, "targets": TARGETS, "results": results}, indent=1) + "\n")
    print(f"\nwrote {args.out}\nreproduce: {command}")


if __name__ == "__main__":
    main()
