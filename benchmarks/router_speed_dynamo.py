"""The router speed benchmark's inputs, replayed into NVIDIA Dynamo's Rust KV indexer (``RadixTree``).

Runs in Dynamo's venv (``benchmarks/peers/setup.sh``), not zdyn's:

    ~/.cache/zdyn/peers/dynamo-venv/bin/python -m benchmarks.router_speed_dynamo     # from the repo root

Same workload and prompts as ``router_speed.py`` (``zdyn/bench/router_workload.py``, standard library only like
``zdyn/bench/host.py``, whose benchmark lock it holds; same seed). Dynamo's Python
binding takes one JSON-encoded ``KvCacheEvent`` per ``apply_event`` call and applies it on a background thread;
``find_matches`` goes through the same thread, so a ``find_matches`` after a run of events waits for them.
Timed: ``compute_block_hash_for_seq`` (Dynamo's per-block hash, computed worker-side in a real deployment),
``apply_event`` (JSON prepared outside the clock) plus that final sync, and hash + ``find_matches`` per prompt.
If ``results/router_speed.json`` exists, the zdyn/Dynamo ratios are printed too.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from dynamo.llm import RadixTree, compute_block_hash_for_seq  # type: ignore[import-not-found]  # Dynamo's venv

from zdyn.bench.host import bench_lock
from zdyn.bench.router_workload import Stored, Workload

HERE = Path(__file__).resolve().parent

PROMPT_TOKENS = (1024, 8192, 32768)
CHUNK_EVENTS = 64  # events applied between two syncs
RESULTS = HERE / "results" / "router_speed_dynamo.json"
OURS = HERE / "results" / "router_speed.json"


def pct(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def sync(tree: RadixTree) -> None:
    tree.find_matches([])


def stored_json(event_id: int, e: Stored, local: list[int]) -> bytes:
    blocks = [{"block_hash": h, "tokens_hash": t} for h, t in zip(e.hashes, local, strict=True)]
    data = {"stored": {"parent_hash": e.parent, "blocks": blocks}}
    return json.dumps({"event_id": event_id, "data": data, "dp_rank": 0}).encode()


def build(tree: RadixTree, workload: Workload) -> dict[str, float]:
    hash_s = apply_s = 0.0
    blocks = 0
    pending: list[tuple[int, bytes]] = []

    def flush() -> float:
        t0 = time.perf_counter()
        for worker, payload in pending:
            tree.apply_event(worker, payload)
        sync(tree)
        pending.clear()
        return time.perf_counter() - t0

    for event_id, e in enumerate(workload.stored_events(), 1):
        t0 = time.perf_counter()
        local = compute_block_hash_for_seq(e.tokens, workload.block_size)
        hash_s += time.perf_counter() - t0
        pending.append((e.worker, stored_json(event_id, e, local)))
        blocks += len(e.hashes)
        if len(pending) == CHUNK_EVENTS:
            apply_s += flush()
    apply_s += flush()
    return {
        "blocks": blocks,
        "apply_blocks_per_s": blocks / apply_s,
        "hash_blocks_per_s": blocks / hash_s,
        "blocks_per_s": blocks / (apply_s + hash_s),
    }


def time_matches(tree: RadixTree, prompts: list[list[int]], block_size: int) -> dict[str, float]:
    ms, best = [], []
    for tokens in prompts:
        t0 = time.perf_counter_ns()
        scores = tree.find_matches(compute_block_hash_for_seq(tokens, block_size)).scores
        ms.append((time.perf_counter_ns() - t0) / 1e6)
        best.append(max(scores.values(), default=0) / max(1, len(tokens) // block_size))
    return {
        "match_p50_ms": pct(ms, 50),
        "match_p99_ms": pct(ms, 99),
        "mean_best_overlap_fraction": statistics.fmean(best),
    }


def time_removals(tree: RadixTree, workload: Workload, max_blocks: int, parts: int = 5) -> dict[str, float]:
    """One hash per event, in ``parts`` timed slices: the per-call hand-off to Dynamo's thread is bimodal here."""
    payloads: list[tuple[int, bytes]] = []
    for worker, hashes in workload.unique_seqs:
        for h in reversed(hashes):
            event = {"event_id": len(payloads), "data": {"removed": {"block_hashes": [h]}}, "dp_rank": 0}
            payloads.append((worker, json.dumps(event).encode()))
        if len(payloads) >= max_blocks:
            break
    size = -(-len(payloads) // parts)
    rates = []
    for i in range(0, len(payloads), size):
        t0 = time.perf_counter()
        for worker, payload in payloads[i : i + size]:
            tree.apply_event(worker, payload)
        sync(tree)
        rates.append(len(payloads[i : i + size]) / (time.perf_counter() - t0))
    return {"blocks": len(payloads), "blocks_per_s": statistics.median(rates), "best_blocks_per_s": max(rates)}


def run_config(num_workers: int, block_size: int, args: argparse.Namespace) -> dict[str, object]:
    workload = Workload(num_workers, block_size, args.blocks, seed=args.seed)
    tree = RadixTree()
    result: dict[str, object] = {"workers": num_workers, "block_size": block_size}
    result["store"] = build(tree, workload)
    result["routes"] = {}
    for n in PROMPT_TOKENS:
        prompts = workload.prompts(n, args.prompts, seed=n)
        time_matches(tree, prompts[:20], block_size)  # warm-up
        result["routes"][str(n)] = time_matches(tree, prompts, block_size)  # type: ignore[index]
    result["remove"] = time_removals(tree, workload, args.event_blocks)
    del tree
    return result


def table(results: list[dict]) -> str:
    head = "| W | block | " + " | ".join(f"hash+find_matches {n // 1024}k p50 / p99 ms" for n in PROMPT_TOKENS)
    head += " | stored blocks/s (apply only / with hashing) | removed blocks/s, median of 5 |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        routes = " | ".join(
            f"{r['routes'][str(n)]['match_p50_ms']:.3f} / {r['routes'][str(n)]['match_p99_ms']:.3f}"
            for n in PROMPT_TOKENS
        )
        lines.append(
            f"| {r['workers']} | {r['block_size']} | {routes} | {r['store']['apply_blocks_per_s']:,.0f} / "
            f"{r['store']['blocks_per_s']:,.0f} | {r['remove']['blocks_per_s']:,.0f} "
            f"(best {r['remove']['best_blocks_per_s']:,.0f}) |"
        )
    return "\n".join(lines)


def ratios(results: list[dict]) -> str:
    """zdyn's time over Dynamo's (> 1: zdyn slower) for the p50 match, and Dynamo's rate over zdyn's."""
    ours = {(r["workers"], r["block_size"]): r for r in json.loads(OURS.read_text())["results"]}
    head = "| W | block | " + " | ".join(f"match {n // 1024}k p50 zdyn/Dynamo" for n in PROMPT_TOKENS)
    head += " | stored rate Dynamo/zdyn | removed rate Dynamo/zdyn |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        z = ours.get((r["workers"], r["block_size"]))
        if z is None:
            continue
        cells = [
            f"{z['routes'][str(n)]['match_p50_ms'] / r['routes'][str(n)]['match_p50_ms']:.2f}x" for n in PROMPT_TOKENS
        ]
        cells.append(f"{r['store']['blocks_per_s'] / z['store']['blocks_per_s']:.2f}x")
        cells.append(f"{r['remove']['blocks_per_s'] / z['remove']['blocks_per_s']:.2f}x")
        lines.append(f"| {r['workers']} | {r['block_size']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", default="8,64,256")
    p.add_argument("--block-sizes", default="16,64")
    p.add_argument("--blocks", type=int, default=1_000_000)
    p.add_argument("--prompts", type=int, default=300)
    p.add_argument("--event-blocks", type=int, default=100_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--report", action="store_true", help="print the tables of the saved results, run nothing")
    args = p.parse_args()
    if args.report:
        results = json.loads(args.out.read_text())["results"]
        print(table(results) + "\n\n" + ratios(results))
        return
    results = []
    with bench_lock():
        for block_size in map(int, args.block_sizes.split(",")):
            for num_workers in map(int, args.workers.split(",")):
                t0 = time.perf_counter()
                results.append(run_config(num_workers, block_size, args))
                print(f"W={num_workers} B={block_size}: done in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    command = f"{sys.executable} -m benchmarks.router_speed_dynamo " + " ".join(sys.argv[1:])
    print(table(results))
    if OURS.exists():
        print("\n" + ratios(results))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from importlib.metadata import version

    meta = {
        "command": command,
        "python": platform.python_version(),
        "ai-dynamo": version("ai-dynamo"),
        "loadavg_1m_at_end": os.getloadavg()[0],
    }
    args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    print(f"\nwrote {args.out}\nreproduce: {command}")


if __name__ == "__main__":
    main()
