"""How much do the routing modes (kv, kv-load, round-robin, random) differ on real traces, and how does zdyn's kv
router compare with NVIDIA Dynamo 1.6.1's?

For each Mooncake trace (the FAST'25 synthetic trace, then the conversation trace) and mode, examples/agg_route is
started as its run.sh starts it (8 mocker workers, a router process in that mode), the trace's first ``duration x
speed`` seconds are replayed by ``zdyn bench`` (open loop at the trace's timestamps / ``speed``, token-id prompts on
/v1/completions, ``max_tokens`` = the trace's output length with ``ignore_eos``, a new connection per request), and the
deployment is stopped. Every run gets the same requests, mocker settings and cold caches, and holds the benchmark lock.

Per run: TTFT p50/p90/p99, the prefix-hit tokens the server reports (``cached_tokens``), throughput, the load per
worker (requests, prompt and prefilled tokens, max/mean) from the frontend's per-request log lines, the router's
counters and CPU per role. Dynamo (``dynamo.frontend --router-mode kv`` + 8 ``dynamo.mocker``) gets the synthetic
replay too. The two mockers' timing models differ, so a calibration measures both engines' prefill and decode time on
one worker, and zdyn is also run at the speedup that makes its prefill as fast as Dynamo's (``matched``), and Dynamo
at the one that makes its prefill as slow as zdyn's (``scaled``).

    python -m benchmarks.routing_quality                 # ~14 min of runs
    python -m benchmarks.routing_quality --traces synthetic --modes round-robin,kv --dynamo '' --reps 2 --append
    python -m benchmarks.routing_quality --report        # re-print the tables, redraw the plot
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import re
import shutil
import statistics
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import httpx

from zdyn.bench.deploy import Deployment, ZdynSpec, start
from zdyn.bench.dynamo_peer import DYNAMO_VERSION, DynamoSpec, start_dynamo
from zdyn.bench.host import bench_lock
from zdyn.bench.inputs import LONG_MODEL_LEN, TRACES, long_context_model
from zdyn.bench.procs import scrape
from zdyn.bench.results import (
    RESULTS,
    command,
    fmt,
    footer,
    grouped,
    median,
    provenance,
    pyplot,
    quantiles,
    ratio,
    read_json,
    save_figure,
    table,
    write_json,
)
from zdyn.bench.runs import bench_argv, cpu_by_kind, measure

TRACE_FILES = {"synthetic": TRACES["mooncake-synthetic"], "conversation": TRACES["mooncake-conversation"]}
MODES = ("kv", "kv-load", "round-robin", "random")
OUT = RESULTS / "routing-quality.json"
WORKERS = 8
MOCKER = ("--max-model-len", str(LONG_MODEL_LEN))  # Dynamo's mocker defaults come from examples/agg_route/config.yaml
REQUEST_LINE = re.compile(
    r"request \S+: worker=(?P<worker>\S+) \((?P<reason>.*)\) prompt=(?P<prompt>\d+) "
    r"cached=(?P<cached>\d+) "
)
DYNAMO_ROUTE_LINE = re.compile(r"route request completed .*?worker_id=(?P<worker>\d+)")
KEEP = re.compile(r"^zdyn_router_(index_events|event_batches|decisions|malformed_messages|client_failures|workers)")
TARGETS = {"rr_vs_kv_ttft_p90": 3.0, "max_over_mean_load": 1.2}
HIT_TARGETS = {"synthetic": 4.0, "conversation": 2.0}  # prefix-hit tokens, kv / round-robin


@dataclass(frozen=True)
class Replay:
    """The first ``duration_s x speed`` seconds of a trace at its timestamps / ``speed``, mockers at ``speedup``."""

    trace: str
    speed: float
    duration_s: float
    speedup: float

    def flags(self, seed: int) -> list[str]:
        return [
            "--api",
            "completions",
            "--prompt-format",
            "tokens",
            "--dataset",
            "mooncake",
            "--dataset-path",
            str(TRACE_FILES[self.trace]),
            "--speed",
            f"{self.speed:g}",
            "--duration",
            f"{self.duration_s:g}",
            "--ignore-eos",
            "--no-keep-alive",
            "--warmups",
            "0",
            "--seed",
            str(seed),
            "--save-requests",
            "--no-progress",
        ]


def ideal_hits(trace: str, window_s: float, block_size: int = 64) -> dict[str, int]:
    """Prefix-hit tokens if every request saw one infinite cache of every earlier prompt: per request the longest run
    of leading trace blocks (512 tokens) seen before, capped at the last full engine block before the prompt's end."""
    seen: set[tuple[int, ...]] = set()
    requests = prompt = hit = 0
    with open(TRACE_FILES[trace]) as f:
        for line in f:
            e = json.loads(line)
            if e["timestamp"] >= window_s * 1000:
                break
            ids, k = e["hash_ids"], 0
            while k < len(ids) and tuple(ids[: k + 1]) in seen:
                k += 1
            hit += min(k * 512, (e["input_length"] - 1) // block_size * block_size)
            seen.update(tuple(ids[: i + 1]) for i in range(len(ids)))
            requests, prompt = requests + 1, prompt + e["input_length"]
    return {"requests": requests, "prompt_tokens": prompt, "hit_tokens": hit}


def deployment(
    system: str, model: Path, mode: str, speedup: float, logs: Path, workers: int = WORKERS
) -> contextlib.AbstractContextManager[Deployment]:
    if system == "zdyn":
        mocker = ("--speedup", f"{speedup:g}", *MOCKER)
        return start(
            ZdynSpec("agg_route", workers=workers, model=str(model), router_mode=mode, worker_args=mocker), logs
        )
    return start_dynamo(
        DynamoSpec(model, workers=workers, router_mode=mode, speedup=speedup, mocker_args=MOCKER), logs, timeout_s=120
    )


def probe(base_url: str, model: str, tokens: int = 8192, decode: int = 128) -> dict[str, Any]:
    """Prefill time of an uncached ``tokens`` prompt (its TTFT minus that of the same prompt again, fully cached: the
    pipeline's own time cancels) and the decode step of a lone request (ITL)."""
    rng = random.Random(1234)

    def stream(prompt: list[int], max_tokens: int) -> tuple[float, float]:
        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
        t0, first = time.perf_counter(), None
        with httpx.stream("POST", f"{base_url}/v1/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if (
                    first is None
                    and line.startswith("data: {")
                    and any(c.get("text") for c in json.loads(line[6:])["choices"])
                ):
                    first = time.perf_counter() - t0
        end = time.perf_counter() - t0
        return first or end, end

    prefill = []
    for _ in range(3):
        prompt = [rng.randrange(10, 4000) for _ in range(tokens)]
        prefill.append(1000 * (stream(prompt, 1)[0] - stream(prompt, 1)[0]))
    ttft, e2e = stream([rng.randrange(10, 4000) for _ in range(64)], decode + 1)
    return {
        "prompt_tokens": tokens,
        "prefill_ms": round(statistics.median(prefill), 1),
        "itl_ms": round(1000 * (e2e - ttft) / decode, 2),
    }


def calibrate(model: Path, work: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for system in ("zdyn", "dynamo"):
        with bench_lock(), deployment(system, model, "kv", 1.0, work / "logs" / f"calibrate-{system}", 1) as dep:
            out[system] = probe(dep.base_url, dep.model)
        print(f"   calibration {system} (speedup 1, 1 worker): {out[system]}", flush=True)
    z, d = out["zdyn"], out["dynamo"]
    return out | {
        "prefill_ratio": round(z["prefill_ms"] / d["prefill_ms"], 3),
        "itl_ratio": round(z["itl_ms"] / d["itl_ms"], 3),
    }


def worker_loads(system: str, frontend_log: Path) -> dict[str, Any]:
    """Requests, prompt and prefilled tokens per worker, as max/mean over the workers (idle ones count as 0); zdyn's
    routing reasons. Dynamo's frontend logs only the worker of each request."""
    per: dict[str, Counter[str]] = {}
    reasons: Counter[str] = Counter()
    for line in frontend_log.read_text(errors="replace").splitlines():
        if system == "zdyn" and (m := REQUEST_LINE.search(line)):
            per.setdefault(m["worker"], Counter()).update(
                requests=1, prompt=int(m["prompt"]), prefilled=int(m["prompt"]) - int(m["cached"])
            )
            reasons[m["reason"].split(":", 1)[0].split(",", 1)[0]] += 1
        elif system != "zdyn" and (m := DYNAMO_ROUTE_LINE.search(line)):
            per.setdefault(m["worker"], Counter()).update(requests=1)

    def max_over_mean(key: str) -> float | None:
        values = [c[key] for c in per.values()] + [0] * (WORKERS - len(per))
        return (
            round(max(values) * len(values) / sum(values), 3)
            if sum(values) and (system == "zdyn" or key == "requests")
            else None
        )

    return {
        "per_worker": {w: dict(c) for w, c in sorted(per.items())},
        "reasons": dict(reasons.most_common()),
        **{f"load_{k}": max_over_mean(k) for k in ("requests", "prompt", "prefilled")},
    }


def run(model: Path, rp: Replay, system: str, mode: str, seed: int, rep: int, work: Path) -> dict[str, Any]:
    """One replay against a fresh deployment (its raw/ result and logs/ in ``work``, git-ignored)."""
    name = f"{rp.trace}-{system}-{mode}-s{rp.speedup:g}" + (f"-r{rep}" if rep > 1 else "")
    logs, result = work / "logs" / name, work / "raw" / f"{name}.json"
    shutil.rmtree(logs, ignore_errors=True)
    t0 = time.monotonic()
    with bench_lock() as waited, deployment(system, model, mode, rp.speedup, logs) as dep:
        print(f"== {name}: {rp.duration_s:g} s of load ({rp.speed * rp.duration_s:g} s of trace)", flush=True)
        row = measure(
            dep,
            bench_argv(dep.base_url, model, result, name, *rp.flags(seed)),
            logs / "bench.log",
            timeout_s=rp.duration_s + 600,
        )
        metrics = {role: {k: v for k, v in scrape(url).items() if KEEP.match(k)} for role, url in dep.metrics.items()}
        warnings = {
            p.stem: sum(" WARNING " in x or " ERROR " in x for x in p.read_text(errors="replace").splitlines())
            for p in logs.glob("*.log")
            if p.stem != "bench"
        }
    records = read_json(result)["runs"][0]["requests"]
    out = {
        "name": name,
        **asdict(rp),
        "system": system,
        "mode": mode,
        "rep": rep,
        "wall_s": round(time.monotonic() - t0, 1),
        "lock_wait_s": round(waited, 1),
        **{k: v for k, v in row.items() if k != "cpu_s"},
        "cpu": cpu_by_kind(row),
        "ttft_quantiles_ms": quantiles([1000 * r["ttft_s"] for r in records if r["success"]]),
        "client_lag_ms_p99": quantiles([1000 * (r["start_s"] - r["scheduled_s"]) for r in records])[99],
        "metrics": metrics,
        "warnings": {k: v for k, v in warnings.items() if v},
        **worker_loads(system, logs / "frontend.log"),
    }
    print(
        f"   {out['completed']}/{out['num_requests']} ok, TTFT p50/p90/p99 {out['ttft_p50']:.0f}/{out['ttft_p90']:.0f}/"
        f"{out['ttft_p99']:.0f} ms, cached {fmt(out['cached_tokens'], 0)}, load max/mean {out['load_requests']}, "
        f"CPU {out['cpu']}",
        flush=True,
    )
    return out


def label(r: dict[str, Any]) -> str:
    return f"{'zdyn' if r['system'] == 'zdyn' else f'Dynamo {DYNAMO_VERSION}'} {r['mode']} (speedup {r['speedup']:g})"


COLUMNS = [
    ("TTFT p50", "ttft_p50", 0),
    ("TTFT p90", "ttft_p90", 0),
    ("TTFT p99", "ttft_p99", 0),
    ("E2E p50", "e2e_p50", 0),
    ("prefix-hit tokens", "cached_tokens", 0),
    ("req/s", "req_s", 2),
    ("requests/worker max/mean", "load_requests", 2),
    ("prompt tok/worker max/mean", "load_prompt", 2),
    ("prefilled tok/worker max/mean", "load_prefilled", 2),
]


def targets(groups: dict[tuple[Any, ...], list[dict[str, Any]]], trace: str, speedup: float) -> list[str]:
    kv, rr = groups.get((trace, "zdyn", "kv", speedup)), groups.get((trace, "zdyn", "round-robin", speedup))
    if not kv or not rr:
        return []
    hit = ratio(median(r["cached_tokens"] for r in kv), median(r["cached_tokens"] for r in rr))
    p90 = ratio(median(r["ttft_p90"] for r in rr), median(r["ttft_p90"] for r in kv))
    load = max(median(r[k] for r in kv) for k in ("load_requests", "load_prompt", "load_prefilled"))
    return [
        f"- prefix-hit tokens kv / round-robin: **{fmt(hit)}x** (target >= {HIT_TARGETS[trace]:g}x)",
        f"- TTFT p90 round-robin / kv: **{fmt(p90)}x** (target >= {TARGETS['rr_vs_kv_ttft_p90']:g}x)",
        f"- kv's highest max/mean load per worker: {fmt(load)} (target <= {TARGETS['max_over_mean_load']:g})",
    ]


def report(doc: dict[str, Any]) -> str:
    groups = grouped(doc["runs"], lambda r: (r["trace"], r["system"], r["mode"], r["speedup"]))
    parts = ["Commands:", *doc["commands"]]
    for trace, rp in doc["replays"].items():
        mine = {label(rs[0]): rs for key, rs in groups.items() if key[0] == trace}
        ideal = rp["ideal"]
        parts += [
            f"\n### {trace}: the first {rp['speed'] * rp['duration_s']:g} s of the trace ({ideal['requests']} "
            f"requests), ideal prefix hits {fmt(ideal['hit_tokens'], 0)} of {fmt(ideal['prompt_tokens'], 0)} prompt "
            "tokens; ms, median (min-max) over runs",
            table(
                ["system, router mode", "n", *(t for t, _, _ in COLUMNS)],
                [
                    [name, str(len(rs)), *(fmt(median(r[k] for r in rs), d) for _, k, d in COLUMNS)]
                    for name, rs in mine.items()
                ],
            ),
            *targets(groups, trace, rp["speedup"]),
        ]
    if c := doc.get("calibration"):
        parts.append(
            f"\ncalibration, one worker at speedup 1: prefill of {c['zdyn']['prompt_tokens']} tokens zdyn "
            f"{c['zdyn']['prefill_ms']:.0f} ms, Dynamo {c['dynamo']['prefill_ms']:.0f} ms (ratio "
            f"{c['prefill_ratio']:.2f}); decode step zdyn {c['zdyn']['itl_ms']:.1f} ms, Dynamo "
            f"{c['dynamo']['itl_ms']:.1f} ms (ratio {c['itl_ratio']:.2f})"
        )
    return "\n".join(parts)


def plot(doc: dict[str, Any], path: Path) -> Path:
    plt, traces = pyplot(), list(doc["replays"])
    fig, axes = plt.subplots(len(traces), 2, figsize=(14, 5 * len(traces)), squeeze=False)
    colors = {"kv": "tab:blue", "kv-load": "tab:green", "round-robin": "tab:red", "random": "tab:orange"}
    for row, trace in zip(axes, traces, strict=True):
        mine = [r for r in doc["runs"] if r["trace"] == trace]
        for r in mine:
            color = "black" if r["system"] == "dynamo" else colors.get(r["mode"], "gray")
            row[0].plot(
                r["ttft_quantiles_ms"], range(101), color=color, lw=1.5 if r["rep"] == 1 else 0.7, label=label(r)
            )
        row[0].set(xscale="log", xlabel="TTFT (ms)", ylabel="% of requests", title=f"{trace}: TTFT CDF")
        row[0].legend(fontsize="x-small")
        groups = grouped(mine, label)
        row[1].bar(range(len(groups)), [median(r["cached_tokens"] for r in rs) for rs in groups.values()])
        row[1].set_xticks(range(len(groups)), list(groups), rotation=30, ha="right", fontsize="x-small")
        row[1].axhline(doc["replays"][trace]["ideal"]["hit_tokens"], color="0.4", ls="--", label="ideal")
        row[1].set(ylabel="prefix-hit tokens", title=f"{trace}: prefix-hit tokens (median)")
        row[1].legend(fontsize="x-small")
    return save_figure(fig, path, f"Routing quality: Mooncake traces on {WORKERS} mocker workers")


def measure_all(args: argparse.Namespace, doc: dict[str, Any], cmd: str, p: argparse.ArgumentParser) -> None:
    model, traces = long_context_model(), [t for t in args.traces.split(",") if t]
    replays = {t: Replay(t, args.speed, args.duration, args.mocker_speedup) for t in traces}
    for t, rp in replays.items():
        kept = doc["replays"].setdefault(t, asdict(rp) | {"ideal": ideal_hits(t, rp.speed * rp.duration_s)})
        if {k: kept[k] for k in asdict(rp)} != asdict(rp):
            p.error(f"--append: {args.out} replayed {t} with other settings")
    doc["commands"].append(cmd)
    dynamo, work = [d for d in args.dynamo.split(",") if d], args.out.with_suffix("")

    def go(rp: Replay, system: str, mode: str) -> None:
        key = (rp.trace, system, mode, rp.speedup)
        rep = 1 + sum((r["trace"], r["system"], r["mode"], r["speedup"]) == key for r in doc["runs"])
        doc["runs"].append(run(model, rp, system, mode, args.seed, rep, work))
        write_json(args.out, doc)

    if dynamo and "synthetic" in traces and not doc.get("calibration"):
        doc["calibration"] = calibrate(model, work)
    for trace, rp in replays.items():
        for mode in [m for m in args.modes.split(",") if m] * args.reps:
            go(rp, "zdyn", mode)
        prefill = (doc.get("calibration") or {}).get("prefill_ratio", 1.0)
        fast, slow = round(rp.speedup * prefill, 2), round(rp.speedup / prefill, 2)
        peers = (("same", "dynamo", "kv", rp.speedup), ("matched", "zdyn", "kv", fast),
                 ("scaled", "dynamo", "kv", slow), ("scaled-rr", "dynamo", "round-robin", slow))  # fmt: skip
        for key, system, mode, speedup in peers if trace == "synthetic" else ():
            if key in dynamo:
                go(replace(rp, speedup=speedup), system, mode)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m benchmarks.routing_quality", description=__doc__.split("\n\n")[0])
    p.add_argument("--traces", default="synthetic,conversation", help="comma-separated: synthetic, conversation")
    p.add_argument("--modes", default=",".join(MODES), help="zdyn router modes to run")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of sending per run (default 60)")
    p.add_argument("--speed", type=float, default=8.0, help="trace replay speed: timestamps / S (default 8)")
    p.add_argument("--mocker-speedup", type=float, default=4.3, help="both mockers' --speedup (default 4.3)")
    p.add_argument(
        "--dynamo",
        default="same,matched,scaled",
        help="synthetic trace: same (Dynamo kv at the same "
        "speedup), matched (zdyn kv with its prefill as fast as Dynamo's), scaled (Dynamo kv with its "
        "prefill as slow as zdyn's), scaled-rr (Dynamo round-robin there too); '' for none",
    )
    p.add_argument("--reps", type=int, default=1, help="run the list of modes this many times per trace")
    p.add_argument(
        "--append", action="store_true", help="add these runs to --out (same settings) instead of a new file"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--report", action="store_true", help="only re-print the tables and redraw the plot of --out")
    args = p.parse_args(argv)
    cmd = command("benchmarks.routing_quality", argv)
    new = {"benchmark": "routing-quality", **provenance(), "commands": [], "replays": {}, "runs": []}
    doc = read_json(args.out) if args.report or args.append else new
    if not args.report:
        measure_all(args, doc, cmd, p)
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
