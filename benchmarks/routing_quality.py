#!/usr/bin/env python3
"""Routing quality: Mooncake traces replayed onto 8 simulated workers, once per routing mode, plus NVIDIA Dynamo.

For each trace (the FAST'25 synthetic trace first, then the conversation trace) and each routing mode (kv, kv-load,
round-robin, random) the agg_route scenario is started from its example script (``examples/agg_route/run.sh`` with
``ZDYN_ENGINE=mocker``, 8 workers, a router process with ``ZDYN_ROUTER_MODE``), the first ``duration x speed`` seconds
of the trace are replayed by ``zdyn bench`` (open loop, the trace's own timestamps divided by ``speed``, token-id
prompts on /v1/completions, ``max_tokens`` = the trace's output length with ``ignore_eos``), and the deployment is
stopped. Every mode gets the same requests (same seed), the same mocker settings and a fresh deployment (cold caches).

Per run it reports TTFT p50/p90/p99, the prefix-hit tokens the server reports (``usage.prompt_tokens_details.
cached_tokens``, summed, and as a share of prompt tokens), throughput, and the load per worker (requests, prompt
tokens and prefilled = uncached prompt tokens, as max/mean over the workers) from the frontend's per-request log
lines (``request <id>: worker=<w> (<reason>) prompt=<n> cached=<n> ...``), plus the router's own counters (its
``--metrics-port``: index events such as ``unknown_parent``, event batches, decisions) and round-robin fallbacks.

NVIDIA Dynamo 1.6.1 (``dynamo.frontend --router-mode kv`` + 8 ``dynamo.mocker`` processes, same mocker settings)
gets the same synthetic replay from the same client. The two mockers' timing models differ (Dynamo 1.6.1's prefills
~4-5x and decodes ~3.4x faster at the same ``--speedup``), so a calibration phase measures both engines' prefill and
decode time on one worker, and the comparison is made twice: at the same speedup (Dynamo's engine then has far less
work per second than zdyn's) and with zdyn's speedup scaled so that its prefill takes as long as Dynamo's.

Every deployment holds /tmp/zdyn-bench.lock (fcntl) from start to stop; CPU per role is sampled from /proc.

    python benchmarks/routing_quality.py            # ~14 min of runs (plus any wait for the lock): calibration,
                                                    # 2 traces x 4 modes, Dynamo kv at 2 speedups, zdyn kv matched
    python benchmarks/routing_quality.py --traces synthetic --modes round-robin,kv --dynamo '' --reps 2 --append
                                                    # ~5 min: 2 more kv / round-robin pairs, merged into the JSON
    python benchmarks/routing_quality.py --report-only   # re-print the tables and redraw the plot

Runs of one (trace, system, mode, speedup) are reported as median (min-max); the targets use the medians.

Output: ``benchmarks/results/routing-quality.json`` (settings, every run's figures), ``routing-quality.png``, and
under ``benchmarks/results/routing-quality/``: ``raw/*.json`` (zdyn bench results with per-request records),
``logs/<run>/`` (run.sh, every role, the bench run) and ``table.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import platform
import random
import re
import shlex
import shutil
import statistics
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere: import this checkout's zdyn and benchmarks

from benchmarks.peers.dynamo import DYNAMO_VERSION, DynamoDeployment  # noqa: E402
from benchmarks.topology import (  # noqa: E402
    DEFAULT_MODEL,
    LOCK_PATH,
    SCENARIOS,
    CpuSampler,
    Deployment,
    bench_lock,
    git_state,
    role_label,
    run_bench,
)
from zdyn.launch import free_port  # noqa: E402
from zdyn.models import build_tiny_llama, cache_dir  # noqa: E402

DATA = Path("/work/shared/data")
TRACES = {
    "synthetic": DATA / "mooncake_fast25_synthetic_trace.jsonl",
    "conversation": DATA / "mooncake_fast25_conversation_trace.jsonl",
}
MODES = ("kv", "kv-load", "round-robin", "random")
RESULTS = REPO / "benchmarks" / "results"
OUT_JSON = RESULTS / "routing-quality.json"
OUT_PNG = RESULTS / "routing-quality.png"
WORK = RESULTS / "routing-quality"  # raw/ and logs/ are git-ignored
LONG_MODEL = cache_dir() / "models" / "tiny-llama-262k"
LONG_MODEL_LEN = 262_144  # the synthetic trace's longest prompt is 191,378 tokens
RESULT_FORMAT = 1
REQUEST_LINE = re.compile(
    r"request (?P<id>\S+): worker=(?P<worker>\S+) \((?P<reason>.*)\) prompt=(?P<prompt>\d+) cached=(?P<cached>\d+) "
    r"output=(?P<output>\d+) (?P<outcome>.*) in (?P<seconds>[\d.]+)s$"
)
LABEL = re.compile(r'(\w+)="([^"]*)"')
DYNAMO_ROUTE_LINE = re.compile(r"route request completed .*?worker_id=(?P<worker>\d+)")
# With keep-alive, zdyn bench's aiohttp pool keeps idle connections for 15 s while uvicorn closes them after 5 s:
# after a burst of completions, requests sent ~5 s later on those connections fail at once with "Server
# disconnected" / ECONNRESET (8 of 1,795 in a trial run). A new connection per request avoids the race; it also
# avoids the ~40 ms Nagle delay Dynamo's frontend adds on reused connections (benchmarks/peers/README.md).
KEEP_ALIVE_NOTE = "new connection per request"
# Issue #4 / shared/reference/benchmarks.md section 8: kv >= 4x round-robin's prefix-hit tokens on the synthetic trace
# (>= 2x on the conversation trace), TTFT p90 >= 3x better, max/mean worker load <= 1.2.
TARGETS = {"rr_vs_kv_ttft_p90": 3.0, "max_over_mean_load": 1.2}
HIT_TARGETS = {"synthetic": 4.0, "conversation": 2.0}


# ---------------------------------------------------------------------------------------------------------------------
# Settings


@dataclass(frozen=True, slots=True)
class Engine:
    """Mocker settings every run gets (Dynamo's mocker defaults; a context long enough for the traces)."""

    workers: int = 8
    block_size: int = 64
    num_blocks: int = 16384
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int = LONG_MODEL_LEN

    def zdyn_flags(self, speedup: float) -> list[str]:
        return [
            "--speedup", f"{speedup:g}", "--block-size", str(self.block_size), "--num-blocks", str(self.num_blocks),
            "--max-num-seqs", str(self.max_num_seqs), "--max-num-batched-tokens", str(self.max_num_batched_tokens),
            "--max-model-len", str(self.max_model_len),
        ]  # fmt: skip


@dataclass(frozen=True, slots=True)
class Replay:
    """Which part of a trace is replayed, and how fast: timestamps / ``speed`` for ``duration_s`` seconds."""

    trace: str
    speed: float
    duration_s: float
    mocker_speedup: float

    @property
    def window_s(self) -> float:
        """Seconds of the trace that are replayed."""
        return self.speed * self.duration_s


@dataclass(slots=True)
class Run:
    """One replay against one deployment; latencies in ms, loads as max/mean over the workers."""

    name: str
    trace: str
    system: str  # "zdyn" or "dynamo"
    mode: str
    mocker_speedup: float
    speed: float
    duration_s: float
    window_s: float
    result_json: str
    log_dir: str
    num_requests: int = 0
    completed: int = 0
    failed: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    bench_duration_s: float = 0.0
    ttft_p50: float = math.nan
    ttft_p90: float = math.nan
    ttft_p99: float = math.nan
    ttft_mean: float = math.nan
    itl_p50: float = math.nan
    e2el_p50: float = math.nan
    e2el_p90: float = math.nan
    request_throughput: float = 0.0
    output_throughput: float = 0.0
    prompt_tokens: int = 0
    cached_tokens: int | None = None
    cached_pct: float | None = None
    per_worker: dict[str, dict[str, int]] = field(default_factory=dict)
    load_requests: float | None = None  # max / mean requests per worker
    load_prompt: float | None = None  # max / mean prompt tokens per worker
    load_prefill: float | None = None  # max / mean prefilled (uncached) prompt tokens per worker
    reasons: dict[str, int] = field(default_factory=dict)
    router_metrics: dict[str, float] = field(default_factory=dict)
    frontend_metrics: dict[str, float] = field(default_factory=dict)
    warnings: dict[str, int] = field(default_factory=dict)
    warning_samples: list[str] = field(default_factory=list)
    client_lag_ms: dict[str, float] = field(default_factory=dict)  # request sent after its scheduled time
    cpu: dict[str, float] = field(default_factory=dict)
    ttft_quantiles_ms: list[float] = field(default_factory=list)  # 0, 1, ..., 100th percentile (for the CDF)
    bench_command: str = ""
    wall_s: float = 0.0
    lock_wait_s: float = 0.0
    rep: int = 1


# ---------------------------------------------------------------------------------------------------------------------
# The model: tiny-llama's tokenizer and config with a context long enough for the traces (no weights needed)


def long_context_model(base: Path = DEFAULT_MODEL, dest: Path = LONG_MODEL) -> Path:
    """A copy of tiny-llama's config and tokenizer with ``max_position_embeddings`` = LONG_MODEL_LEN (the mockers
    refuse a ``--max-model-len`` beyond the model's positions). Built once, atomically."""
    if (dest / "config.json").exists() and json.loads((dest / "config.json").read_text()).get(
        "max_position_embeddings"
    ) == LONG_MODEL_LEN:
        return dest
    build_tiny_llama(base)
    tmp = dest.with_name(f"{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in ("tokenizer.json", "chat_template.jinja", "generation_config.json"):
        if (base / name).exists():
            shutil.copy(base / name, tmp / name)
    config = json.loads((base / "config.json").read_text())
    config["max_position_embeddings"] = LONG_MODEL_LEN
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tok_config = json.loads((base / "tokenizer_config.json").read_text())
    tok_config["model_max_length"] = LONG_MODEL_LEN
    (tmp / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


def ideal_hits(trace: str, window_s: float, block_size: int) -> dict[str, int]:
    """Prefix-hit tokens of the replayed requests if every request saw one infinite cache holding every earlier
    prompt (the ceiling for any routing): per request the longest run of leading trace blocks (512 tokens) seen
    before, capped at the last full engine block before the prompt's end (the engine recomputes at least one token)."""
    seen: set[tuple[int, ...]] = set()
    requests = prompt = hit = 0
    with open(TRACES[trace]) as f:
        for line in f:
            e = json.loads(line)
            if e["timestamp"] >= window_s * 1000:
                break
            ids, n = e["hash_ids"], e["input_length"]
            k = 0
            while k < len(ids) and tuple(ids[: k + 1]) in seen:
                k += 1
            hit += min(k * 512, (n - 1) // block_size * block_size)
            seen.update(tuple(ids[: i + 1]) for i in range(len(ids)))
            requests += 1
            prompt += n
    return {"requests": requests, "prompt_tokens": prompt, "hit_tokens": hit}


# ---------------------------------------------------------------------------------------------------------------------
# Deployments


@contextlib.contextmanager
def zdyn_agg_route(
    model: Path, engine: Engine, mode: str, speedup: float, log_dir: Path, workers: int | None = None
) -> Iterator[tuple[Deployment, str]]:
    """examples/agg_route/run.sh with mocker workers and the router's metrics on a free port (through a copy of
    the example's config.yaml with ``Router.metrics-port`` set); yields the deployment and the router's /metrics."""
    scenario = SCENARIOS["agg_route"]
    n = workers or engine.workers
    log_dir.mkdir(parents=True, exist_ok=True)
    metrics_port = free_port()
    config = yaml.safe_load((REPO / "examples" / "agg_route" / "config.yaml").read_text())
    config.setdefault("Router", {})["metrics-port"] = metrics_port
    config_path = log_dir / "config.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    env = {
        "ZDYN_ENGINE": "mocker",
        "ZDYN_NUM_WORKERS": str(n),
        "ZDYN_MODEL": str(model),
        "ZDYN_HOST": "127.0.0.1",
        "ZDYN_PORT": str(free_port()),
        "ZDYN_START_TIMEOUT": "120",
        "ZDYN_LOG_DIR": str(log_dir.resolve()),
        "ZDYN_ROUTER_MODE": mode,
        "ZDYN_CONFIG": str(config_path.resolve()),
        **scenario.env(n),
    }
    dep = Deployment(scenario, n, env, engine.zdyn_flags(speedup), log_dir)
    try:
        dep.start(timeout_s=120.0)
        yield dep, f"http://127.0.0.1:{metrics_port}/metrics"
    finally:
        left = dep.stop()
        if left:
            print(f"   left behind (killed): {left}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def dynamo_kv(
    model: Path, engine: Engine, mode: str, speedup: float, log_dir: Path, workers: int | None = None
) -> Iterator[DynamoDeployment]:
    with DynamoDeployment(
        model,
        model.name,
        num_workers=workers or engine.workers,
        router_mode=mode,
        speedup_ratio=speedup,
        block_size=engine.block_size,
        num_gpu_blocks=engine.num_blocks,
        max_num_seqs=engine.max_num_seqs,
        max_num_batched_tokens=engine.max_num_batched_tokens,
        extra_mocker_args=["--max-model-len", str(engine.max_model_len)],
        log_dir=log_dir,
        ready_timeout=120.0,
    ) as dyn:
        yield dyn


# ---------------------------------------------------------------------------------------------------------------------
# Calibration: how long each mocker takes for a prefill and a decode step at speedup 1


def _stream(base_url: str, model: str, prompt: list[int], max_tokens: int) -> tuple[float, float, dict[str, Any]]:
    """(TTFT s, E2E s, usage) of one streamed token-id completion."""
    body = {
        "model": model, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0.0,
        "stream": True, "stream_options": {"include_usage": True},
    }  # fmt: skip
    req = urllib.request.Request(
        base_url + "/v1/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    t0 = time.perf_counter()
    first: float | None = None
    usage: dict[str, Any] = {}
    with urllib.request.urlopen(req, timeout=120) as resp:
        for raw in resp:
            line = raw.strip()
            if not line.startswith(b"data:") or line[5:].strip() == b"[DONE]":
                continue
            chunk = json.loads(line[5:])
            if first is None and any(c.get("text") for c in chunk.get("choices", [])):
                first = time.perf_counter() - t0
            usage = chunk.get("usage") or usage
    end = time.perf_counter() - t0
    return (first if first is not None else end), end, usage


def probe_engine(base_url: str, model: str, prompt_tokens: int = 8192, decode_tokens: int = 128) -> dict[str, Any]:
    """Prefill time of an uncached ``prompt_tokens`` prompt (its TTFT minus the TTFT of the same prompt again, fully
    cached, which removes the pipeline's own time) and the decode step time of a lone request (ITL)."""
    rng = random.Random(1234)
    prefill = []
    for _ in range(3):
        prompt = [rng.randrange(10, 4000) for _ in range(prompt_tokens)]
        cold, _, usage_cold = _stream(base_url, model, prompt, 1)
        warm, _, usage_warm = _stream(base_url, model, prompt, 1)
        prefill.append((cold - warm) * 1000)
    prompt = [rng.randrange(10, 4000) for _ in range(64)]
    ttft, e2e, _ = _stream(base_url, model, prompt, decode_tokens + 1)
    return {
        "prompt_tokens": prompt_tokens,
        "prefill_ms": round(statistics.median(prefill), 1),
        "prefill_ms_all": [round(p, 1) for p in prefill],
        "itl_ms": round((e2e - ttft) * 1000 / decode_tokens, 2),
        "cached_tokens_cold": (usage_cold.get("prompt_tokens_details") or {}).get("cached_tokens"),
        "cached_tokens_warm": (usage_warm.get("prompt_tokens_details") or {}).get("cached_tokens"),
    }


def calibrate(model: Path, engine: Engine, lock: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for system in ("zdyn", "dynamo"):
        logs = WORK / "logs" / f"calibrate-{system}"
        shutil.rmtree(logs, ignore_errors=True)
        with bench_lock(lock) if lock else contextlib.nullcontext():
            if system == "zdyn":
                with zdyn_agg_route(model, engine, "kv", 1.0, logs, workers=1) as (dep, _):
                    out[system] = probe_engine(dep.base_url, model.name)
            else:
                with dynamo_kv(model, engine, "kv", 1.0, logs, workers=1) as dyn:
                    out[system] = probe_engine(dyn.base_url, model.name)
        print(f"   calibration {system} (speedup 1, 1 worker): {out[system]}", flush=True)
    out["prefill_ratio"] = round(out["zdyn"]["prefill_ms"] / out["dynamo"]["prefill_ms"], 3)
    out["itl_ratio"] = round(out["zdyn"]["itl_ms"] / out["dynamo"]["itl_ms"], 3)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# One replay


def bench_argv(base_url: str, model: Path, replay: Replay, result: Path, label: str, seed: int) -> list[str]:
    return [
        sys.executable, "-m", "zdyn.cli", "bench",
        "--base-url", base_url,
        "--model", model.name,
        "--tokenizer", str(model),
        "--api", "completions", "--prompt-format", "tokens",
        "--dataset", "mooncake", "--dataset-path", str(TRACES[replay.trace]),
        "--speed", f"{replay.speed:g}",
        "--duration", f"{replay.duration_s:g}",
        "--ignore-eos",
        "--no-keep-alive",  # see KEEP_ALIVE_NOTE
        "--warmups", "0",
        "--seed", str(seed),
        "--percentiles", "50,90,99",
        "--save-requests",
        "--result-json", str(result),
        "--label", label,
        "--no-progress",
    ]  # fmt: skip


def scrape(url: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value} (counters and gauges; histograms left out)."""
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            text = resp.read().decode()
    except (OSError, urllib.error.URLError):
        return {}
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#") or "_bucket{" in line or "_created" in line:
            continue
        name, _, value = line.rpartition(" ")
        with contextlib.suppress(ValueError):
            out[name] = float(value)
    return out


def quantiles(values: Sequence[float]) -> list[float]:
    """The 0th..100th percentiles (linear interpolation), for a CDF that survives --report-only."""
    if not values:
        return []
    xs = sorted(values)
    out = []
    for p in range(101):
        k = (len(xs) - 1) * p / 100
        lo, hi = math.floor(k), math.ceil(k)
        out.append(round(xs[lo] + (xs[hi] - xs[lo]) * (k - lo), 2))
    return out


def fill_from_result(run: Run, result: Path) -> list[dict[str, Any]]:
    data = json.loads(result.read_text())
    res = data["runs"][0]
    m = res["metrics"]
    run.num_requests, run.completed, run.failed = m["num_requests"], m["completed"], m["failed"]
    run.errors = m.get("errors", {})
    run.bench_duration_s = round(m["duration_s"], 2)
    pct = m["ttft"]["percentiles"]
    run.ttft_p50, run.ttft_p90, run.ttft_p99 = (round(pct[k], 1) for k in ("p50", "p90", "p99"))
    run.ttft_mean = round(m["ttft"]["mean"], 1)
    run.itl_p50 = round(m["itl"]["percentiles"]["p50"], 2)
    run.e2el_p50 = round(m["e2el"]["percentiles"]["p50"], 1)
    run.e2el_p90 = round(m["e2el"]["percentiles"]["p90"], 1)
    run.request_throughput = round(m["request_throughput"], 3)
    run.output_throughput = round(m["output_throughput"], 1)
    run.prompt_tokens = m["total_input_tokens"]
    run.cached_tokens = m.get("cached_tokens")
    run.cached_pct = None if m.get("cached_fraction") is None else round(100 * m["cached_fraction"], 2)
    records: list[dict[str, Any]] = res.get("requests") or []
    ok = [r for r in records if r["success"]]
    run.ttft_quantiles_ms = quantiles([1000 * r["ttft_s"] for r in ok])
    lags = [1000 * (r["start_s"] - r["scheduled_s"]) for r in records if r.get("scheduled_s") is not None]
    if lags:
        q = quantiles(lags)
        run.client_lag_ms = {"p50": q[50], "p99": q[99], "max": q[100]}
    return records


def max_over_mean(values: Sequence[float]) -> float | None:
    mean = sum(values) / len(values) if values else 0
    return round(max(values) / mean, 3) if mean > 0 else None


def reason_kind(reason: str) -> str:
    """'kv: overlap 3/10 blocks, cost 12.0, tie of 2' -> 'kv'; fallbacks and capacity notes kept apart."""
    if "router unavailable" in reason:
        return "fallback: router unavailable"
    kind = reason.split(":", 1)[0].split(",", 1)[0].strip()
    if "all at capacity" in reason:
        kind += " (all at capacity)"
    elif "at capacity skipped" in reason:
        kind += " (some at capacity)"
    if "tie of" in reason:
        kind += " (tie)"
    return kind


def zdyn_worker_loads(run: Run, frontend_log: Path, workers: int) -> None:
    per: dict[str, dict[str, int]] = {}
    reasons: Counter[str] = Counter()
    for line in frontend_log.read_text(errors="replace").splitlines():
        m = REQUEST_LINE.search(line)
        if m is None:
            continue
        w = per.setdefault(m["worker"], {"requests": 0, "prompt": 0, "cached": 0})
        w["requests"] += 1
        w["prompt"] += int(m["prompt"])
        w["cached"] += int(m["cached"])
        reasons[reason_kind(m["reason"])] += 1
    run.per_worker = dict(sorted(per.items()))
    run.reasons = dict(reasons.most_common())
    set_loads(run, workers)


def dynamo_worker_loads(run: Run, frontend_log: Path, workers: int) -> None:
    """Dynamo's frontend logs one 'route request completed ... worker_id=N' line per request; prompt tokens per
    worker are not in it."""
    counts: Counter[str] = Counter()
    for line in frontend_log.read_text(errors="replace").splitlines():
        m = DYNAMO_ROUTE_LINE.search(line)
        if m is not None:
            counts[m["worker"]] += 1
    run.per_worker = {f"worker{i}": {"requests": n} for i, (_, n) in enumerate(sorted(counts.items()))}
    set_loads(run, workers)


def set_loads(run: Run, workers: int) -> None:
    rows = list(run.per_worker.values()) + [{}] * max(0, workers - len(run.per_worker))  # idle workers count as 0

    def column(key: str) -> list[float] | None:
        if not run.per_worker or any(key not in r for r in run.per_worker.values()):
            return None
        return [float(r.get(key, 0)) for r in rows]

    reqs, prompt = column("requests"), column("prompt")
    cached = column("cached")
    run.load_requests = max_over_mean(reqs) if reqs else None
    run.load_prompt = max_over_mean(prompt) if prompt else None
    if prompt and cached:
        run.load_prefill = max_over_mean([p - c for p, c in zip(prompt, cached, strict=True)])


def log_sizes(log_dir: Path) -> dict[str, int]:
    """Bytes in each role's log now (taken before the deployment stops: shutdown warnings are not counted)."""
    return {p.name: p.stat().st_size for p in log_dir.glob("*.log") if not p.name.startswith("bench")}


def log_warnings(run: Run, log_dir: Path, sizes: dict[str, int]) -> None:
    counts: Counter[str] = Counter()
    samples: list[str] = []
    for name, size in sorted(sizes.items()):
        path = log_dir / name
        with open(path, "rb") as f:
            text = f.read(size).decode(errors="replace")
        for line in text.splitlines():
            if " WARNING " in line or " ERROR " in line or " WARN " in line:
                counts[path.stem] += 1
                if len(samples) < 8:
                    samples.append(f"{path.name}: {line[:300]}")
    run.warnings = dict(counts)
    run.warning_samples = samples


ROUTER_KEEP = re.compile(
    r"^zdyn_router_(index_events_total|event_batches_total|decisions_total|malformed_messages_total|"
    r"indexed_blocks|active_requests|workers|client_failures_total)"
)


def measure(
    model: Path, engine: Engine, replay: Replay, system: str, mode: str, lock: str, seed: int, rep: int = 1
) -> Run:
    """Start a deployment, replay the trace through zdyn bench, collect everything, stop it."""
    name = f"{replay.trace}-{system}-{mode}-s{replay.mocker_speedup:g}" + (f"-r{rep}" if rep > 1 else "")
    log_dir = WORK / "logs" / name
    shutil.rmtree(log_dir, ignore_errors=True)
    log_dir.mkdir(parents=True)
    result = WORK / "raw" / f"{name}.json"
    result.parent.mkdir(parents=True, exist_ok=True)
    result.unlink(missing_ok=True)
    run = Run(
        name, replay.trace, system, mode, replay.mocker_speedup, replay.speed, replay.duration_s, replay.window_s,
        str(result.relative_to(RESULTS)), str(log_dir.relative_to(RESULTS)), rep=rep,
    )  # fmt: skip
    timeout = replay.duration_s + 600.0
    t0 = time.monotonic()
    with bench_lock(lock) if lock else contextlib.nullcontext():
        run.lock_wait_s = round(time.monotonic() - t0, 1)
        print(f"== {name}: {system} {mode}, mocker speedup {replay.mocker_speedup:g}, trace speed {replay.speed:g}, "
              f"{replay.duration_s:g} s ({replay.window_s:g} s of trace)", flush=True)  # fmt: skip
        if system == "zdyn":
            with zdyn_agg_route(model, engine, mode, replay.mocker_speedup, log_dir) as (dep, router_metrics):
                argv = bench_argv(dep.base_url, model, replay, result, name, seed)
                with CpuSampler() as sampler:
                    proc, ended = run_bench(argv, log_dir / "bench.log", timeout)
                labels = {pid: role_label(role) for role, pid in dep.roles().items()}
                run.router_metrics = {k: v for k, v in scrape(router_metrics).items() if ROUTER_KEEP.match(k)}
                run.frontend_metrics = {
                    k: v for k, v in scrape(dep.base_url + "/metrics").items() if ROUTER_KEEP.match(k)
                }
                sizes = log_sizes(log_dir)
        else:
            with dynamo_kv(model, engine, mode, replay.mocker_speedup, log_dir) as dyn:
                argv = bench_argv(dyn.base_url, model, replay, result, name, seed)
                with CpuSampler() as sampler:
                    proc, ended = run_bench(argv, log_dir / "bench.log", timeout)
                labels = {pid: role_label(role.replace("mocker-", "worker")) for role, pid in dyn.pids().items()}
                sizes = log_sizes(log_dir)
    run.wall_s = round(time.monotonic() - t0 - run.lock_wait_s, 1)
    fill_from_result(run, result)
    labels[proc.pid] = "bench"
    run.cpu = sampler.usage(ended - run.bench_duration_s, ended, labels)
    run.bench_command = shlex.join(["zdyn", *argv[3:]])
    if system == "zdyn":
        zdyn_worker_loads(run, log_dir / "frontend.log", engine.workers)
    else:
        dynamo_worker_loads(run, log_dir / "frontend.log", engine.workers)
    log_warnings(run, log_dir, sizes)
    print(
        f"   {run.completed}/{run.num_requests} ok, TTFT p50/p90/p99 {run.ttft_p50:.0f}/{run.ttft_p90:.0f}/"
        f"{run.ttft_p99:.0f} ms, cached {_pct(run.cached_pct)}, load max/mean req {_num(run.load_requests)} "
        f"prompt {_num(run.load_prompt)}, reasons {run.reasons}, lag p99 {run.client_lag_ms.get('p99')} ms, "
        f"CPU {run.cpu}, {run.wall_s:.0f} s",
        flush=True,
    )
    return run


# ---------------------------------------------------------------------------------------------------------------------
# Report


def _num(v: float | None, digits: int = 2) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f} %"


def _int(v: float | None) -> str:
    return "-" if v is None else f"{v:,.0f}"


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not b or math.isnan(a) or math.isnan(b):
        return None
    return round(a / b, 2)


def runs_of(doc: dict[str, Any]) -> list[Run]:
    return [Run(**r) for r in doc["runs"]]


def label(run: Run) -> str:
    who = "zdyn" if run.system == "zdyn" else f"Dynamo {DYNAMO_VERSION}"
    return f"{who} {run.mode} (speedup {run.mocker_speedup:g})"


@dataclass(slots=True)
class Group:
    """The repetitions of one (trace, system, mode, speedup): medians, and ranges when there are several."""

    runs: list[Run]

    @property
    def first(self) -> Run:
        return self.runs[0]

    def values(self, attr: str) -> list[float]:
        out = []
        for r in self.runs:
            v = r.cpu.get(attr[4:]) if attr.startswith("cpu.") else getattr(r, attr)
            if v is not None and not (isinstance(v, float) and math.isnan(v)):
                out.append(float(v))
        return out

    def med(self, attr: str) -> float | None:
        values = self.values(attr)
        return statistics.median(values) if values else None

    def cell(self, attr: str, fmt: Any, spread: bool = False) -> str:
        values = self.values(attr)
        if not values:
            return "-"
        text = fmt(statistics.median(values))
        if spread and len(values) > 1:
            text += f" ({fmt(min(values))}-{fmt(max(values))})"
        return text


def groups_of(runs: Sequence[Run]) -> list[Group]:
    by_key: dict[tuple[str, str, str, float], Group] = {}
    for r in runs:
        by_key.setdefault((r.trace, r.system, r.mode, r.mocker_speedup), Group([])).runs.append(r)
    return list(by_key.values())


def mode_table(groups: Sequence[Group], ideal_tokens: int | None = None) -> str:
    head = [
        "system, router mode", "runs", "requests ok/sent", "TTFT p50", "TTFT p90", "TTFT p99", "E2E p50",
        "prefix-hit tokens", "hit % of prompt", "% of ideal", "req/s", "out tok/s", "requests/worker max/mean",
        "prompt tok/worker max/mean", "prefilled tok/worker max/mean", "CPU frontend", "CPU router", "CPU workers",
        "CPU bench", "CPU other",
    ]  # fmt: skip
    rows = [head, ["---"] + ["---:"] * (len(head) - 1)]
    for g in groups:
        r = g.first
        ok = f"{sum(x.completed for x in g.runs)}/{sum(x.num_requests for x in g.runs)}"
        hits = g.med("cached_tokens")
        of_ideal = None if not ideal_tokens or hits is None else 100 * hits / ideal_tokens
        rows.append([
            label(r), str(len(g.runs)), ok, g.cell("ttft_p50", _int, True), g.cell("ttft_p90", _int, True),
            g.cell("ttft_p99", _int, True), g.cell("e2el_p50", _int), g.cell("cached_tokens", _int, True),
            g.cell("cached_pct", _pct, True), _pct(of_ideal), g.cell("request_throughput", _num),
            g.cell("output_throughput", _int), g.cell("load_requests", _num, True), g.cell("load_prompt", _num, True),
            g.cell("load_prefill", _num, True), g.cell("cpu.frontend", _int), g.cell("cpu.router", _int),
            g.cell("cpu.worker", _int), g.cell("cpu.bench", _int), g.cell("cpu.other", _int),
        ])  # fmt: skip
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def find(groups: Sequence[Group], trace: str, system: str, mode: str, speedup: float | None = None) -> Group | None:
    for g in groups:
        r = g.first
        same_speedup = speedup is None or math.isclose(r.mocker_speedup, speedup, rel_tol=1e-6)
        if r.trace == trace and r.system == system and r.mode == mode and same_speedup:
            return g
    return None


def targets(groups: Sequence[Group], trace: str, speedup: float) -> dict[str, Any]:
    """The issue's targets on medians over repetitions (and per repetition, kv's n-th run against rr's n-th)."""
    kv, rr = find(groups, trace, "zdyn", "kv", speedup), find(groups, trace, "zdyn", "round-robin", speedup)
    if kv is None or rr is None:
        return {}
    hit = _ratio(kv.med("cached_tokens"), rr.med("cached_tokens"))
    hit_target = HIT_TARGETS.get(trace, 4.0)
    ttft = _ratio(rr.med("ttft_p90"), kv.med("ttft_p90"))
    loads = {k: v for k, v in (("requests", kv.med("load_requests")), ("prompt", kv.med("load_prompt")),
                               ("prefilled", kv.med("load_prefill"))) if v is not None}  # fmt: skip
    pairs = list(zip(kv.runs, rr.runs, strict=False))
    return {
        "kv_runs": len(kv.runs),
        "rr_runs": len(rr.runs),
        "kv_vs_rr_hit_tokens": hit,
        "kv_vs_rr_hit_tokens_target": hit_target,
        "kv_vs_rr_hit_tokens_met": hit is not None and hit >= hit_target,
        "rr_vs_kv_ttft_p90": ttft,
        "rr_vs_kv_ttft_p90_met": ttft is not None and ttft >= TARGETS["rr_vs_kv_ttft_p90"],
        "rr_vs_kv_ttft_p50": _ratio(rr.med("ttft_p50"), kv.med("ttft_p50")),
        "per_rep_hit": [_ratio(k.cached_tokens, r.cached_tokens) for k, r in pairs],
        "per_rep_ttft_p90": [_ratio(r.ttft_p90, k.ttft_p90) for k, r in pairs],
        "kv_max_over_mean_load": loads,
        "kv_max_over_mean_load_met": bool(loads) and max(loads.values()) <= TARGETS["max_over_mean_load"],
    }


def format_targets(t: dict[str, Any]) -> str:
    if not t:
        return "(kv and round-robin runs needed)"

    def mark(ok: bool) -> str:
        return "met" if ok else "**not met**"

    def reps(values: list[float | None]) -> str:
        return "" if len(values) < 2 else " (per repetition: " + ", ".join(_num(v) for v in values) + ")"

    loads = ", ".join(f"{k} {v:.2f}" for k, v in t["kv_max_over_mean_load"].items())
    med = "median of " if max(t["kv_runs"], t["rr_runs"]) > 1 else ""
    return "\n".join([
        f"- prefix-hit tokens kv / round-robin ({med}runs): **{_num(t['kv_vs_rr_hit_tokens'])}x** "
        f"(target >= {t['kv_vs_rr_hit_tokens_target']:g}x): {mark(t['kv_vs_rr_hit_tokens_met'])}"
        f"{reps(t['per_rep_hit'])}",
        f"- TTFT p90 round-robin / kv: **{_num(t['rr_vs_kv_ttft_p90'])}x** "
        f"(target >= {TARGETS['rr_vs_kv_ttft_p90']:g}x): {mark(t['rr_vs_kv_ttft_p90_met'])}"
        f"{reps(t['per_rep_ttft_p90'])}; p50: {_num(t['rr_vs_kv_ttft_p50'])}x",
        f"- kv's max/mean load per worker: {loads} (target <= {TARGETS['max_over_mean_load']:g}): "
        f"{mark(t['kv_max_over_mean_load_met'])}",
    ])  # fmt: skip


def dynamo_comparison(groups: Sequence[Group], main_speedups: dict[str, float]) -> list[dict[str, Any]]:
    """zdyn kv / Dynamo kv on the same replay (medians over repetitions): both at the main speedup, or one of them
    at the main speedup and the other scaled to match its engine time."""
    out = []
    for d in (g for g in groups if g.first.system == "dynamo" and g.first.mode == "kv"):
        for z in (g for g in groups if g.first.system == "zdyn" and g.first.mode == "kv"):
            main = main_speedups.get(d.first.trace)
            at_main = main is not None and (
                math.isclose(z.first.mocker_speedup, main) or math.isclose(d.first.mocker_speedup, main)
            )
            if z.first.trace != d.first.trace or not math.isclose(z.first.speed, d.first.speed) or not at_main:
                continue
            out.append({
                "trace": d.first.trace, "zdyn_speedup": z.first.mocker_speedup,
                "dynamo_speedup": d.first.mocker_speedup,
                **{k: _ratio(z.med(k), d.med(k)) for k in ("ttft_p50", "ttft_p90", "ttft_p99", "cached_tokens",
                                                            "request_throughput", "load_requests")},
            })  # fmt: skip
    return out


def format_dynamo(cmp: Sequence[dict[str, Any]], calib: dict[str, Any] | None) -> str:
    lines = []
    if calib:
        z, d = calib["zdyn"], calib["dynamo"]
        lines.append(
            f"Calibration at speedup 1, one worker: prefill of {z['prompt_tokens']} uncached tokens zdyn "
            f"{z['prefill_ms']:.0f} ms, Dynamo {d['prefill_ms']:.0f} ms (ratio {calib['prefill_ratio']:.2f}); decode "
            f"step (ITL of a lone request) zdyn {z['itl_ms']:.1f} ms, Dynamo {d['itl_ms']:.1f} ms (ratio "
            f"{calib['itl_ratio']:.2f})."
        )
    if cmp:
        lines += [
            "",
            "| zdyn kv / Dynamo kv | TTFT p50 | TTFT p90 | TTFT p99 | prefix-hit tokens | req/s "
            "| requests/worker max/mean |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for c in cmp:
            lines.append(
                f"| {c['trace']}: zdyn speedup {c['zdyn_speedup']:g} / Dynamo speedup {c['dynamo_speedup']:g} | "
                f"{_num(c['ttft_p50'])} | {_num(c['ttft_p90'])} | {_num(c['ttft_p99'])} | {_num(c['cached_tokens'])} | "
                f"{_num(c['request_throughput'])} | {_num(c['load_requests'])} |"
            )
    return "\n".join(lines)


def format_routing_notes(runs: Sequence[Run]) -> str:
    lines = []
    for r in runs:
        if r.system != "zdyn":
            continue
        idx: Counter[str] = Counter()
        batches: Counter[str] = Counter()
        for k, v in r.router_metrics.items():
            labels = dict(LABEL.findall(k))
            if k.startswith("zdyn_router_index_events_total"):
                idx[labels.get("kind", "?")] += int(v)
            elif k.startswith("zdyn_router_event_batches_total"):
                batches[labels.get("outcome", "?")] += int(v)
        failures = int(sum(v for k, v in r.frontend_metrics.items() if "client_failures" in k))
        unusual = {k: v for k, v in idx.items() if k not in ("events_applied", "blocks_stored", "blocks_removed")}
        lines.append(
            f"- {r.name}: reasons {r.reasons}; router index {unusual or 'no anomalies'} "
            f"(applied {idx.get('events_applied', 0):,}, stored {idx.get('blocks_stored', 0):,}, removed "
            f"{idx.get('blocks_removed', 0):,}); event batches {dict(batches)}; route-query failures {failures}; "
            f"warnings {r.warnings or 'none'}; client lag p99 {r.client_lag_ms.get('p99', '-')} ms"
        )
    return "\n".join(lines)


def report(doc: dict[str, Any]) -> str:
    runs = runs_of(doc)
    groups = groups_of(runs)
    s = doc["settings"]
    commands = doc.get("commands") or [doc["command"]]
    parts = ["Commands:" if len(commands) > 1 else "Command:", "", "```bash", *commands, "```", ""]
    e = s["engine"]
    parts.append(
        f"{e['workers']} mocker workers: block {e['block_size']}, {e['num_blocks']} blocks, max_num_seqs "
        f"{e['max_num_seqs']}, {e['max_num_batched_tokens']} batched tokens, max_model_len {e['max_model_len']}. "
        "Token-id prompts on /v1/completions, max_tokens = the trace's output length with ignore_eos, a new "
        f"connection per request, seed {s['seed']}. TTFT/E2E in ms, median (min-max) over runs; CPU in % of one "
        f"core ({doc['cpus']} cores)."
    )
    for trace in doc["traces"]:
        rp = doc["replays"][trace]
        mine = [g for g in groups if g.first.trace == trace]
        if not mine:
            continue
        ideal = rp.get("ideal") or {}
        parts += [
            "",
            f"### {trace} trace: first {rp['window_s']:g} s of the trace ({mine[0].first.num_requests} requests) at "
            f"speed {rp['speed']:g} ({rp['duration_s']:g} s), mocker speedup {rp['mocker_speedup']:g}",
            "",
            f"Ideal (one infinite cache that saw every earlier prompt): {_int(ideal.get('hit_tokens'))} prefix-hit "
            f"tokens of {_int(ideal.get('prompt_tokens'))} prompt tokens "
            f"({_pct(100 * ideal['hit_tokens'] / ideal['prompt_tokens'] if ideal else None)}).",
            "",
            mode_table(mine, ideal.get("hit_tokens")),
            "",
            format_targets(doc["targets"].get(trace, {})),
        ]
    cmp = doc.get("dynamo_comparison") or []
    if cmp or doc.get("calibration"):
        parts += ["", "### zdyn / Dynamo (ratios; < 1 = zdyn lower)", "", format_dynamo(cmp, doc.get("calibration"))]
    parts += ["", "### Routing details (zdyn)", "", format_routing_notes(runs)]
    return "\n".join(parts)


def plot(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = runs_of(doc)
    groups = groups_of(runs)
    traces = [t for t in doc["traces"] if any(r.trace == t for r in runs)]
    if not traces:
        return
    fig, axes = plt.subplots(len(traces), 3, figsize=(18, 5 * len(traces)), squeeze=False)
    colors = {"kv": "tab:blue", "kv-load": "tab:green", "round-robin": "tab:red", "random": "tab:orange"}

    def color(r: Run) -> str:
        return "black" if r.system == "dynamo" else colors.get(r.mode, "gray")

    for row, trace in zip(axes, traces, strict=True):
        main_speedup = doc["replays"][trace]["mocker_speedup"]
        mine = [g for g in groups if g.first.trace == trace]
        ax = row[0]
        for g in mine:
            for i, r in enumerate(g.runs):
                if not r.ttft_quantiles_ms:
                    continue
                other_speed = not math.isclose(r.mocker_speedup, main_speedup)
                style = ("--" if r.system == "dynamo" else ":") if other_speed else "-"
                ax.plot(r.ttft_quantiles_ms, range(101), style, color=color(r), lw=1.8 if i == 0 else 0.8,
                        alpha=1.0 if i == 0 else 0.6, label=label(r) if i == 0 else None)  # fmt: skip
        ax.set_xscale("log")
        ax.set(xlabel="TTFT (ms)", ylabel="percent of requests", title=f"{trace}: TTFT CDF (thin: repetitions)")
        ax.axhline(90, color="0.7", lw=0.8)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="x-small")

        ax = row[1]
        names = [label(g.first).replace(" (speedup", "\n(speedup") for g in mine]
        bars = ax.bar(
            range(len(mine)), [g.med("cached_pct") or 0.0 for g in mine], color=[color(g.first) for g in mine]
        )
        for b, g in zip(bars, mine, strict=True):
            ax.annotate(_int(g.med("cached_tokens")), (b.get_x() + b.get_width() / 2, b.get_height()), ha="center",
                        va="bottom", fontsize="x-small")  # fmt: skip
        ideal = doc["replays"][trace].get("ideal")
        if ideal:
            ax.axhline(100 * ideal["hit_tokens"] / ideal["prompt_tokens"], color="0.4", ls="--", lw=1,
                       label="one infinite cache (ideal)")  # fmt: skip
            ax.legend(fontsize="x-small")
        ax.set_xticks(range(len(mine)), names, fontsize="x-small", rotation=30, ha="right")
        ax.set(ylabel="prefix-hit tokens, % of prompt tokens", title=f"{trace}: prefix-hit tokens (labels: tokens)")
        ax.grid(True, axis="y", alpha=0.3)

        ax = row[2]
        zd = [g.first for g in mine if g.first.system == "zdyn" and g.first.per_worker]
        width = 0.8 / max(1, len(zd))
        for i, r in enumerate(zd):
            workers = sorted(r.per_worker)
            total = sum(w.get("prompt", 0) for w in r.per_worker.values()) or 1
            share = [100 * r.per_worker[w].get("prompt", 0) / total for w in workers]
            ax.bar([j + i * width for j in range(len(workers))], share, width, color=colors.get(r.mode, "gray"),
                   alpha=1.0 if math.isclose(r.mocker_speedup, main_speedup) else 0.5,
                   label=f"{r.mode} s{r.mocker_speedup:g} (max/mean {_num(r.load_prompt)})")  # fmt: skip
        n = doc["settings"]["engine"]["workers"]
        ax.axhline(100 / n, color="0.4", lw=1, ls="--", label="even share")
        ax.axhline(120 / n, color="red", lw=0.8, ls=":", label="1.2 x even")
        ax.set_ylim(0, 100 / n * 1.6)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(n)], [f"w{j}" for j in range(n)])
        ax.set(ylabel="% of prompt tokens", title=f"{trace}: prompt tokens per worker (zdyn)")
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize="x-small", loc="upper right", ncol=2)
    fig.suptitle(
        f"Routing quality: Mooncake traces on {doc['settings']['engine']['workers']} mocker workers "
        f"(zdyn agg_route; Dynamo {DYNAMO_VERSION} kv in black)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def finish(doc: dict[str, Any]) -> str:
    groups = groups_of(runs_of(doc))
    doc["targets"] = {t: targets(groups, t, doc["replays"][t]["mocker_speedup"]) for t in doc["replays"]}
    doc["dynamo_comparison"] = dynamo_comparison(groups, {t: rp["mocker_speedup"] for t, rp in doc["replays"].items()})
    text = report(doc)
    OUT_JSON.write_text(json.dumps(doc, indent=1) + "\n")
    WORK.mkdir(parents=True, exist_ok=True)
    (WORK / "table.md").write_text(text + "\n")
    plot(doc, OUT_PNG)
    return text


def merge_into_existing(new: dict[str, Any]) -> dict[str, Any]:
    """The existing results with this invocation's command added; refuses other engine or replay settings."""
    old = json.loads(OUT_JSON.read_text())
    if old["settings"]["engine"] != new["settings"]["engine"] or old["settings"]["seed"] != new["settings"]["seed"]:
        raise SystemExit(f"--append: {OUT_JSON} was made with other engine settings or seed")
    for trace, replay in new["replays"].items():
        if trace in old["replays"] and {k: v for k, v in old["replays"][trace].items() if k != "ideal"} != {
            k: v for k, v in replay.items() if k != "ideal"
        }:
            raise SystemExit(f"--append: {trace} was replayed with other settings in {OUT_JSON}")
        old["replays"].setdefault(trace, replay)
        if trace not in old["traces"]:
            old["traces"].append(trace)
    old["commands"] = [*(old.get("commands") or [old["command"]]), new["command"]]
    return old


# ---------------------------------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--traces", default="synthetic,conversation", help="comma-separated: synthetic, conversation")
    p.add_argument("--modes", default=",".join(MODES), help="zdyn router modes to run")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of sending per run (default 60)")
    p.add_argument("--speed", type=float, default=8.0, help="trace replay speed: timestamps / S (default 8)")
    p.add_argument(
        "--mocker-speedup", type=float, default=4.3, help="both mockers' --speedup for the mode runs (default 4.3)"
    )
    p.add_argument("--conversation-speed", type=float, help="speed for the conversation trace (default --speed)")
    p.add_argument("--conversation-speedup", type=float, help="mocker speedup there (default --mocker-speedup)")
    p.add_argument(
        "--dynamo",
        default="same,matched,scaled",
        help="Dynamo comparison runs on the synthetic trace, comma-separated: same (Dynamo kv at the same speedup), "
        "matched (plus zdyn kv at the speedup whose prefill time equals Dynamo's), scaled (Dynamo kv at the speedup "
        "whose prefill time equals zdyn's), scaled-rr (Dynamo round-robin there too); '' for none",
    )
    p.add_argument("--matched-speedup", type=float, help="override the calibrated zdyn/Dynamo prefill ratio")
    p.add_argument("--reps", type=int, default=1, help="run the list of modes this many times per trace (alternating)")
    p.add_argument(
        "--append",
        action="store_true",
        help=f"add these runs to {OUT_JSON.name} (same settings required) instead of starting a new file",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lock", default=LOCK_PATH, help="shared benchmark lock ('' for none)")
    p.add_argument("--report-only", action="store_true", help=f"re-print tables and redraw from {OUT_JSON.name}")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.report_only:
        print(finish(json.loads(OUT_JSON.read_text())))
        return 0
    traces = [t for t in args.traces.split(",") if t]
    modes = [m for m in args.modes.split(",") if m]
    dynamo_runs = [d for d in args.dynamo.split(",") if d]
    for bad in [t for t in traces if t not in TRACES] + [m for m in modes if m not in MODES]:
        raise SystemExit(f"unknown trace or mode {bad!r}")
    command = shlex.join(["python", "benchmarks/routing_quality.py", *(sys.argv[1:] if argv is None else argv)])
    print(f"Command: {command}", flush=True)
    started = time.monotonic()
    engine = Engine()
    model = long_context_model()
    replays = {
        "synthetic": Replay("synthetic", args.speed, args.duration, args.mocker_speedup),
        "conversation": Replay(
            "conversation",
            args.conversation_speed or args.speed,
            args.duration,
            args.conversation_speedup or args.mocker_speedup,
        ),
    }
    doc: dict[str, Any] = {
        "format": RESULT_FORMAT,
        "command": command,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "git": git_state(),
        "dynamo_version": DYNAMO_VERSION,
        "settings": {"engine": asdict(engine), "seed": args.seed, "model": str(model), "dynamo_runs": dynamo_runs},
        "traces": traces,
        "replays": {
            t: {
                **asdict(replays[t]),
                "window_s": replays[t].window_s,
                "ideal": ideal_hits(t, replays[t].window_s, engine.block_size),
            }
            for t in traces
        },
        "calibration": None,
        "runs": [],
    }
    doc["commands"] = [command]

    if args.append:
        doc = merge_into_existing(doc)

    def save(run: Run) -> None:
        doc["runs"].append(asdict(run))
        OUT_JSON.write_text(json.dumps(doc, indent=1) + "\n")

    def rep_of(replay: Replay, system: str, mode: str) -> int:
        same = [r for r in doc["runs"] if (r["trace"], r["system"], r["mode"]) == (replay.trace, system, mode)
                and math.isclose(r["mocker_speedup"], replay.mocker_speedup)]  # fmt: skip
        return len(same) + 1

    def run(replay: Replay, system: str, mode: str) -> None:
        save(measure(model, engine, replay, system, mode, args.lock, args.seed, rep_of(replay, system, mode)))

    try:
        if dynamo_runs and "synthetic" in traces and not doc.get("calibration"):
            print("== calibration: each mocker's prefill and decode time at speedup 1", flush=True)
            doc["calibration"] = calibrate(model, engine, args.lock)
        for trace in traces:
            rp = replays[trace]
            for _ in range(args.reps):
                for mode in modes:
                    run(rp, "zdyn", mode)
            if trace != "synthetic" or not dynamo_runs:
                continue
            ratio = args.matched_speedup or (doc["calibration"] or {}).get("prefill_ratio") or 1.0
            if "same" in dynamo_runs:
                run(rp, "dynamo", "kv")
            if "matched" in dynamo_runs:
                run(Replay(trace, rp.speed, rp.duration_s, round(rp.mocker_speedup * ratio, 2)), "zdyn", "kv")
            scaled = Replay(trace, rp.speed, rp.duration_s, round(rp.mocker_speedup / ratio, 2))
            for mode, key in (("kv", "scaled"), ("round-robin", "scaled-rr")):
                if key in dynamo_runs:
                    run(scaled, "dynamo", mode)
    except KeyboardInterrupt:
        print("interrupted; writing what was measured", file=sys.stderr)
    doc["total_wall_s"] = round(doc.get("total_wall_s", 0.0) + time.monotonic() - started, 1)
    text = finish(doc)
    print(text)
    print(f"\ntotal {doc['total_wall_s'] / 60:.1f} min\nCommand: {command}")
    print(f"wrote {OUT_JSON}, {OUT_PNG}, {WORK / 'table.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
