#!/usr/bin/env python3
"""Topology sweep: a scenario with N simulated workers (the mocker engine) over a range of request rates.

For each worker count N the scenario is started from its example script (``examples/<scenario>/run.sh``, with
``ZDYN_ENGINE=mocker``), ``zdyn bench`` runs one open-loop Poisson load point per rate (each after a warm-up), and the
deployment is stopped: SIGTERM to run.sh's process group, after which no process of run.sh or of the roles it started
may be left. The shared lock ``/tmp/zdyn-bench.lock`` is held from start-up to shutdown of each deployment, so no other
benchmark shares the cores with a measurement.

While each point runs, the CPU time of every role, of the load generator and of the whole machine is sampled from
/proc: the table shows whether the frontend or ``zdyn bench`` (rather than the workers) limited the throughput.

Output in ``--out-dir``: ``raw/w<N>-r<rate>.json`` (the ``zdyn bench`` result of each point), ``topology.json``
(settings, every point's key figures and CPU use, each deployment's processes), ``table.md``, ``throughput.png``,
``ttft.png`` and the logs of every process under ``logs/``.

    python benchmarks/topology.py --scenario agg --workers 1,2,4,8 --rates-per-worker 2,4,5,6,7
    python benchmarks/topology.py --scenario disagg --workers 4 --prefill-workers 3 --rates 2,4  # N = P + decode

Another scenario plugs in with one ``SCENARIOS`` entry: its run.sh and the environment it needs for N workers.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import fcntl
import json
import math
import os
import platform
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere: import this checkout's zdyn

from zdyn.launch import free_port, free_ports, get_json, wait_for_workers  # noqa: E402
from zdyn.models import build_tiny_llama, cache_dir  # noqa: E402

LOCK_PATH = "/tmp/zdyn-bench.lock"
DEFAULT_MODEL = cache_dir() / "models" / "tiny-llama"
TRACE_DATASETS = ("mooncake", "azure")  # these replay timestamps: the swept value is zdyn bench's --speed
# zdyn bench flags this script sets itself; everything else unknown to it is passed on to zdyn bench
OWN_BENCH_FLAGS = (
    "--base-url", "--tokenizer", "--request-rate", "--speed", "--concurrency", "--duration", "--num-requests",
    "--warmups", "--result-json", "--label", "--goodput", "--seed",
)  # fmt: skip
RESULT_FORMAT = 1
CLK_TCK = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------------------------------------------------
# Scenarios


@dataclass(frozen=True)
class Scenario:
    """How to start a scenario with N workers from its example script, and how many workers /health must list."""

    script: str  # relative to the repo root; started as ``script MOCKER_FLAGS...`` (the flags go to every worker)
    env: Callable[[int], dict[str, str]]  # scenario-specific environment for N workers (ports, role counts)
    expected_workers: Callable[[int], int] = lambda n: n
    about: str = ""
    # readiness beyond /health (e.g. prefill workers, which /health does not list): None when ready, else what is
    # still missing; checked once /health lists expected_workers
    ready: Callable[[Deployment], str | None] | None = None
    settle_s: float = 0.0  # wait this long once ready (e.g. until every decode worker heard the prefill queue's status)
    split: Callable[[int], dict[str, int]] | None = None  # role counts of N workers, recorded with each deployment


def _agg_env(n: int) -> dict[str, str]:
    port = free_port()  # the embedded processor's hub, instead of config.yaml's fixed 5555
    return {"ZDYN_WORKERS_ENDPOINT": f"tcp://*:{port}", "ZDYN_CONNECT": f"tcp://127.0.0.1:{port}"}


def _agg_route_env(n: int) -> dict[str, str]:
    hub, router, router_hub = free_ports(3)
    return {
        "ZDYN_WORKERS_PORT": str(hub),
        "ZDYN_ROUTER_PORT": str(router),
        "ZDYN_ROUTER_WORKERS_PORT": str(router_hub),
        "ZDYN_CONNECT": f"tcp://127.0.0.1:{hub},tcp://127.0.0.1:{router_hub}",
    }


SCENARIOS: dict[str, Scenario] = {
    "agg": Scenario(
        "examples/agg/run.sh", _agg_env, about="frontend with its embedded processor (round-robin) -> N workers"
    ),
    "agg_route": Scenario(
        "examples/agg_route/run.sh", _agg_route_env, about="frontend -> KV router process -> N workers"
    ),
}


def free_port_run(n: int, attempts: int = 100) -> int:
    """The first of ``n`` consecutive ports free on this host right now (run.sh derives ports as base + i)."""
    for _ in range(attempts):
        base = free_port()
        if base + n > 65536:
            continue
        socks = [socket.socket() for _ in range(n)]
        try:
            for port, sock in zip(range(base, base + n), socks, strict=True):
                sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError(f"found no {n} consecutive free ports in {attempts} attempts")


def prefill_split(n: int, prefill: int | None = None) -> tuple[int, int]:
    """(prefill, decode) workers of a disaggregated deployment of N workers in all: ``prefill`` of them, else N // 2."""
    p = n // 2 if prefill is None else prefill
    if n < 2 or not 1 <= p <= n - 1:
        raise ValueError(f"{n} workers cannot be split into {p} prefill and {n - p} decode workers (each needs >= 1)")
    return p, n - p


PREFILL_PEER = re.compile(r" prefill (\S+) (joined at|dropped:) ")  # the prefill queue's hub logs both


def prefill_workers_joined(log_dir: Path) -> int:
    """Prefill workers the prefill queue currently lists, from its log (``prefill_queue.log``)."""
    path = log_dir / "prefill_queue.log"
    text = path.read_text(errors="replace") if path.exists() else ""
    live: set[str] = set()
    for worker, event in PREFILL_PEER.findall(text):
        (live.add if event == "joined at" else live.discard)(worker)
    return len(live)


def disagg_scenario(name: str, prefill: int | None = None) -> Scenario:
    """``disagg`` or ``disagg_route`` with N workers in all: ``prefill`` (default N // 2) prefill workers, the rest
    decode workers. /health lists the decode workers only, so readiness also waits until the prefill queue's log
    shows every prefill worker joined, then 1.5 s more: the queue publishes its status (with the number of prefill
    workers) at least once a second, and a decode worker that has not heard it yet prefills locally."""
    if name not in ("disagg", "disagg_route"):
        raise ValueError(f"not a disaggregated scenario: {name}")

    def env(n: int) -> dict[str, str]:
        p, d = prefill_split(n, prefill)
        queue = free_port_run(3)  # jobs, +1 prefill workers, +2 status
        taken = set(range(queue, queue + 3))
        ports = [port for port in free_ports(8) if port not in taken][:3]
        hub, router, router_hub = ports
        out = {
            "ZDYN_NUM_WORKERS": str(d),  # run.sh: decode workers
            "ZDYN_NUM_PREFILL_WORKERS": str(p),
            "ZDYN_WORKERS_PORT": str(hub),
            "ZDYN_QUEUE_PORT": str(queue),
            "ZDYN_CONNECT": f"tcp://127.0.0.1:{hub}",
        }
        if name == "disagg_route":
            out |= {
                "ZDYN_ROUTER_PORT": str(router),
                "ZDYN_ROUTER_WORKERS_PORT": str(router_hub),
                "ZDYN_CONNECT": f"tcp://127.0.0.1:{hub},tcp://127.0.0.1:{router_hub}",
            }
        return out

    def ready(dep: Deployment) -> str | None:
        want = prefill_split(dep.workers, prefill)[0]
        have = prefill_workers_joined(Path(dep.env.get("ZDYN_LOG_DIR", dep.log_dir)))
        return None if have >= want else f"{have}/{want} prefill workers joined the prefill queue"

    def split(n: int) -> dict[str, int]:
        p, d = prefill_split(n, prefill)
        return {"prefill_workers": p, "decode_workers": d}

    share = "N // 2" if prefill is None else str(prefill)
    router = "KV router process -> " if name == "disagg_route" else ""
    return Scenario(
        f"examples/{name}/run.sh",
        env,
        expected_workers=lambda n: prefill_split(n, prefill)[1],
        about=f"frontend -> {router}N - P decode workers -> prefill queue -> P = {share} prefill workers",
        ready=ready,
        settle_s=1.5,
        split=split,
    )


SCENARIOS["disagg"] = disagg_scenario("disagg")
SCENARIOS["disagg_route"] = disagg_scenario("disagg_route")


def scenario_for(name: str, prefill: int | None = None) -> Scenario:
    """The scenario, with ``prefill`` of the N workers prefilling (disaggregated scenarios only)."""
    if prefill is None:
        return SCENARIOS[name]
    return disagg_scenario(name, prefill)


# ---------------------------------------------------------------------------------------------------------------------
# Processes and CPU accounting


def _read_stat(pid: str) -> tuple[int, str, float] | None:
    """(process group, state, CPU seconds) of a process, None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rfind(b")") + 2 :].split()  # fields from "state" on; the command name may hold spaces
    return int(fields[2]), fields[0].decode(), (int(fields[11]) + int(fields[12])) / CLK_TCK


def process_table() -> dict[int, tuple[int, str, float]]:
    """pid -> (process group, state, CPU seconds) of every process."""
    table = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (stat := _read_stat(name)) is not None:
            table[int(name)] = stat
    return table


def machine_busy_s() -> float:
    """CPU seconds all cores spent busy since boot."""
    with open("/proc/stat", encoding="ascii") as f:
        ticks = [int(v) for v in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
    return (sum(ticks) - ticks[3] - ticks[4]) / CLK_TCK


def group_members(pgids: set[int]) -> dict[int, str]:
    """pid -> command line of the live (non-zombie) processes in these process groups."""
    out = {}
    for pid, (pgid, state, _) in process_table().items():
        if pgid in pgids and state != "Z":
            with contextlib.suppress(OSError):
                out[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    return out


@dataclass
class CpuSample:
    t: float
    busy_s: float
    procs: dict[int, tuple[int, str, float]]


class CpuSampler:
    """Samples the CPU time of every process (twice a second) while a load point runs."""

    def __init__(self, interval_s: float = 0.5) -> None:
        self.interval_s = interval_s
        self.samples: list[CpuSample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            self.samples.append(CpuSample(time.monotonic(), machine_busy_s(), process_table()))
            if self._stop.wait(self.interval_s):
                return

    def __enter__(self) -> CpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def usage(self, start: float, end: float, labels: dict[int, str]) -> dict[str, float]:
        """Percent of one core used between ``start`` and ``end`` by each label (process group -> label), by the
        whole machine ("machine", up to 100 x cores) and by everything else ("other"). A process counts from the
        first to the last sample it appears in (the load generator exits at ``end``)."""
        inside = [s for s in self.samples if start - self.interval_s <= s.t <= end + self.interval_s]
        if len(inside) < 2 or inside[-1].t <= inside[0].t:
            return {}
        span = inside[-1].t - inside[0].t
        first: dict[int, float] = {}  # pid -> CPU seconds at the first and the last sample it appears in
        last: dict[int, tuple[str, float]] = {}
        for sample in inside:
            for pid, (pgid, _, cpu_s) in sample.procs.items():
                if pgid in labels:
                    first.setdefault(pid, cpu_s)
                    last[pid] = (labels[pgid], cpu_s)
        used: dict[str, float] = dict.fromkeys(labels.values(), 0.0)
        for pid, (label, cpu_s) in last.items():
            used[label] += cpu_s - first[pid]
        out = {label: 100.0 * s / span for label, s in used.items()}
        out["machine"] = 100.0 * (inside[-1].busy_s - inside[0].busy_s) / span
        out["other"] = max(0.0, out["machine"] - sum(v for k, v in out.items() if k != "machine"))
        return {k: round(v, 1) for k, v in out.items()}


def role_label(name: str) -> str:
    """'worker3' -> 'worker', 'frontend' -> 'frontend': roles of one kind share a CPU column."""
    return re.sub(r"\d+$", "", name) or name


@contextlib.contextmanager
def bench_lock(path: str) -> Iterator[None]:
    """Hold the shared benchmark lock (waiting for it, with a note, if another benchmark has it)."""
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for {path}: another benchmark holds it", flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class Deployment:
    """The scenario's run.sh in its own process group, the roles it started, and their clean shutdown."""

    STARTED = re.compile(r"^started (\S+) \(pid (\d+),", re.MULTILINE)  # common.sh's start() announces each role

    def __init__(self, scenario: Scenario, workers: int, env: dict[str, str], args: list[str], log_dir: Path) -> None:
        self.scenario = scenario
        self.workers = workers
        self.env = env
        self.argv = [str(REPO / scenario.script), *args]
        self.log_dir = log_dir
        self.proc: subprocess.Popen[bytes] | None = None
        self.leftovers: list[str] = []

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.env['ZDYN_PORT']}"

    @property
    def run_log(self) -> Path:
        return self.log_dir / "run.sh.log"

    def roles(self) -> dict[str, int]:
        """Role name -> pid (= its process group: run.sh starts each role with setsid)."""
        text = self.run_log.read_text(errors="replace") if self.run_log.exists() else ""
        return {name: int(pid) for name, pid in self.STARTED.findall(text)}

    def start(self, timeout_s: float) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_log, "wb") as log:
            self.proc = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **self.env},
                cwd=self.log_dir,
                start_new_session=True,
            )
        want = self.scenario.expected_workers(self.workers)
        deadline = time.monotonic() + timeout_s
        while True:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"fewer than {want} workers after {timeout_s:.0f}s; see {self.log_dir}")
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.scenario.script} exited with {self.proc.returncode}; see {self.log_dir}")
            with contextlib.suppress(TimeoutError):
                wait_for_workers(self.base_url, want, timeout_s=1.0)
                break
        if self.scenario.ready is None:
            return
        while (missing := self.scenario.ready(self)) is not None:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.scenario.script} exited with {self.proc.returncode}; see {self.log_dir}")
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{missing} after {timeout_s:.0f}s; see {self.log_dir}")
            time.sleep(0.2)
        time.sleep(self.scenario.settle_s)

    def live_workers(self) -> int:
        _, health = get_json(f"{self.base_url}/health")
        return sum(int(w.get("workers", 1)) for w in health.get("workers", []))

    def stop(self, timeout_s: float = 30.0) -> list[str]:
        """SIGTERM to run.sh's group (it stops its roles); returns what was left behind (then killed)."""
        if self.proc is None:
            return []
        groups = {self.proc.pid, *self.roles().values()}
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.leftovers.append(f"{self.scenario.script} still running {timeout_s:.0f}s after SIGTERM")
        deadline = time.monotonic() + 5.0  # roles are reparented and reaped once run.sh has gone
        while (left := group_members(groups)) and time.monotonic() < deadline:
            time.sleep(0.1)
        self.leftovers += [f"pid {pid}: {cmd}" for pid, cmd in left.items()]
        for pgid in groups if left else ():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.wait(10)
        return self.leftovers


# ---------------------------------------------------------------------------------------------------------------------
# One load point


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


def summarize_result(workers: int, rate: float, path: Path, out_dir: Path, window_s: float | None) -> Point:
    data = json.loads(path.read_text())
    m = data["runs"][0]["metrics"]
    good = m.get("good_requests")
    return Point(
        workers=workers,
        rate=rate,
        result_json=str(path.relative_to(out_dir)),
        completed=m["completed"],
        failed=m["failed"],
        duration_s=round(m["duration_s"], 2),
        request_throughput=round(m["request_throughput"], 3),
        output_throughput=round(m["output_throughput"], 1),
        goodput=None if m.get("request_goodput") is None else round(m["request_goodput"], 3),
        good_fraction=None if good is None or not m["num_requests"] else round(good / m["num_requests"], 3),
        ttft_p50=round(m["ttft"]["percentiles"]["p50"], 1),
        ttft_p99=round(m["ttft"]["percentiles"]["p99"], 1),
        itl_p50=round(m["itl"]["percentiles"]["p50"], 2),
        itl_p99=round(m["itl"]["percentiles"]["p99"], 2),
        tpot_p50=round(m["tpot"]["percentiles"]["p50"], 2),
        tpot_p99=round(m["tpot"]["percentiles"]["p99"], 2),
        e2el_p50=round(m["e2el"]["percentiles"]["p50"], 1),
        max_concurrency=m["max_concurrency"],
        sent_rate=round(m["num_requests"] / window_s, 2) if window_s else None,
    )


def bench_argv(
    args: argparse.Namespace, dep: Deployment, rate: float, seed: int, out: Path, passthrough: list[str]
) -> list[str]:
    load = "--speed" if args.dataset in TRACE_DATASETS else "--request-rate"
    argv = [
        sys.executable, "-m", "zdyn.cli", "bench",
        "--base-url", dep.base_url,
        "--tokenizer", str(args.model),
        "--dataset", args.dataset,
        "--input-len", str(args.input_len),
        "--output-len", str(args.output_len),
        "--range-ratio", str(args.range_ratio),
        "--ignore-eos",
        load, f"{rate:g}",
        "--warmups", str(args.warmups if args.warmups is not None else max(4, 2 * dep.workers)),
        "--seed", str(seed),
        "--result-json", str(out),
        "--label", f"{dep.workers} workers",
        "--no-progress",
    ]  # fmt: skip
    argv += ["--num-requests", str(args.num_requests)] if args.num_requests else ["--duration", str(args.duration)]
    if args.slo:
        argv += ["--goodput", *args.slo]
    return argv + passthrough


def run_bench(
    argv: list[str], log_path: Path, timeout_s: float, where: str = ""
) -> tuple[subprocess.Popen[bytes], float]:
    """Run ``zdyn bench`` (``argv``) in its own process group, output to ``log_path``; the process and when it
    ended. Killed after ``timeout_s``; a failure raises with the end of its log."""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
        try:
            proc.wait(timeout_s)
            ended = time.monotonic()
        finally:
            if proc.poll() is None:  # timed out or interrupted
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    if proc.returncode != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
        raise RuntimeError(f"zdyn bench failed ({proc.returncode}){' ' + where if where else ''}:\n{tail}")
    return proc, ended


def run_point(
    args: argparse.Namespace, dep: Deployment, rate: float, seed: int, out_dir: Path, passthrough: list[str]
) -> Point:
    """One ``zdyn bench`` run at ``rate``, with the CPU use of every process group during its measured part.

    Each point needs its own ``seed``: runs of zdyn bench with equal seeds send identical prompts, which would hit
    the prefix cache the previous point left in the workers."""
    result = out_dir / "raw" / f"w{dep.workers}-r{rate:g}.json"
    result.parent.mkdir(parents=True, exist_ok=True)
    result.unlink(missing_ok=True)
    argv = bench_argv(args, dep, rate, seed, result, passthrough)
    log_path = dep.log_dir / f"bench-r{rate:g}.log"
    with CpuSampler() as sampler:
        proc, ended = run_bench(argv, log_path, 600.0 + 4 * (args.duration or 0.0), f"at rate {rate:g}")
    if not result.exists():
        raise RuntimeError(f"zdyn bench at rate {rate:g} wrote no {result}; see {log_path}")
    point = summarize_result(dep.workers, rate, result, out_dir, None if args.num_requests else args.duration)
    labels = {pid: role_label(name) for name, pid in dep.roles().items()}
    labels[proc.pid] = "bench"
    if dep.proc is not None:
        labels[dep.proc.pid] = "run.sh"
    point.cpu = sampler.usage(ended - point.duration_s, ended, labels)
    point.bench_command = shlex.join(["zdyn", *argv[3:]])
    return point


# ---------------------------------------------------------------------------------------------------------------------
# Report: table, saturation, plots


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def cpu_columns(points: Sequence[Point]) -> list[str]:
    seen = {k for p in points for k in p.cpu if k not in ("machine", "other", "run.sh")}
    first = [k for k in ("frontend", "worker", "bench") if k in seen]
    return first + sorted(seen - set(first)) + ["other", "machine"]


def format_table(points: Sequence[Point], offered: str = "rate") -> str:
    cpus = cpu_columns(points)
    head = [
        "workers", f"{offered}", "sent/s", "req/s", "out tok/s", "TTFT p50", "TTFT p99", "ITL p50", "ITL p99",
        "E2E p50", "goodput req/s", "good %", "failed", *[f"CPU {c}" for c in cpus],
    ]  # fmt: skip
    rows = [head, ["---:"] * len(head)]
    for p in sorted(points, key=lambda p: (p.workers, p.rate)):
        rows.append([
            str(p.workers), f"{p.rate:g}", _fmt(p.sent_rate, 2), _fmt(p.request_throughput, 2),
            _fmt(p.output_throughput, 0), _fmt(p.ttft_p50, 0), _fmt(p.ttft_p99, 0), _fmt(p.itl_p50, 1),
            _fmt(p.itl_p99, 1), _fmt(p.e2el_p50, 0),
            _fmt(p.goodput, 2), _fmt(None if p.good_fraction is None else 100 * p.good_fraction, 0), str(p.failed),
            *[_fmt(p.cpu.get(c), 0) for c in cpus],
        ])  # fmt: skip
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)


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
        first_bad = next((i for i, good in enumerate(ok) if not good), len(mine))
        out[n] = {
            "sustained_rate": mine[first_bad - 1].rate if first_bad > 0 else None,
            "first_saturated_rate": mine[first_bad].rate if first_bad < len(mine) else None,
            "max_request_throughput": max(p.request_throughput for p in mine),
            "max_output_throughput": max(p.output_throughput for p in mine),
        }
    return out


def format_saturation(sat: dict[int, dict[str, float | None]]) -> str:
    lines = []
    for n, s in sat.items():
        sustained = "none of the rates" if s["sustained_rate"] is None else f"up to {s['sustained_rate']:g} req/s"
        beyond = "" if s["first_saturated_rate"] is None else f", not {s['first_saturated_rate']:g} req/s"
        lines.append(
            f"- {n} worker{'s' if n > 1 else ''}: within the SLO {sustained}{beyond}; "
            f"peak {s['max_request_throughput']:.2f} req/s, {s['max_output_throughput']:.0f} output tok/s"
        )
    return "\n".join(lines)


def plot(points: Sequence[Point], out_dir: Path, slo_ms: dict[str, float], title: str) -> list[Path]:
    """throughput.png (req/s and goodput, output tok/s) and ttft.png (TTFT and TPOT p50/p99), one colour per worker
    count, against the offered rate on a log axis: with rates scaled by N, good scaling shows as shifted copies."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.axes import Axes
    from matplotlib.ticker import FuncFormatter, LogLocator

    by_n: dict[int, list[Point]] = {}
    for p in sorted(points, key=lambda p: (p.workers, p.rate)):
        by_n.setdefault(p.workers, []).append(p)
    colors = plt.get_cmap("tab10")
    plain = FuncFormatter(lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "125" else "")

    rates = sorted({p.rate for p in points})

    def style(ax: Axes, ylabel: str, title: str, log_y: bool) -> None:
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        if rates[-1] < 4 * rates[0]:  # too narrow for powers of two
            ax.set_xticks(rates)
        if log_y:
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(plain)
        else:
            ax.set_ylim(bottom=0)
        ax.set(xlabel="offered rate (req/s)", ylabel=ylabel, title=title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small", ncol=2, loc="best")

    def save(fig: Any, name: str) -> Path:
        fig.suptitle(title)
        fig.tight_layout()
        path = out_dir / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path

    fig, (ax_req, ax_tok) = plt.subplots(1, 2, figsize=(13, 5))
    ax_req.plot(rates, rates, color="0.6", lw=1, ls="-.", label="offered")
    for i, (n, ps) in enumerate(by_n.items()):
        x = [p.rate for p in ps]
        ax_req.plot(x, [p.request_throughput for p in ps], "-o", color=colors(i), label=f"{n} w")
        if all(p.goodput is not None for p in ps):
            ax_req.plot(x, [p.goodput for p in ps], ":x", color=colors(i), label=f"{n} w goodput")
        ax_tok.plot(x, [p.output_throughput for p in ps], "-o", color=colors(i), label=f"{n} w")
    style(ax_req, "completed req/s", "request throughput (dotted: goodput)", log_y=False)
    style(ax_tok, "output tok/s", "output token throughput", log_y=False)
    paths = [save(fig, "throughput.png")]

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, metric in zip(axes, ("ttft", "tpot"), strict=True):
        for i, (n, ps) in enumerate(by_n.items()):
            x = [p.rate for p in ps]
            ax.plot(x, [getattr(p, f"{metric}_p50") for p in ps], "-o", color=colors(i), label=f"{n} w p50")
            ax.plot(x, [getattr(p, f"{metric}_p99") for p in ps], "--s", color=colors(i), label=f"{n} w p99")
        if metric in slo_ms:
            ax.axhline(slo_ms[metric], color="red", lw=1, ls="-.", label=f"SLO {slo_ms[metric]:g} ms")
        style(ax, f"{metric.upper()} (ms)", f"{metric.upper()} p50 (solid) / p99 (dashed)", log_y=True)
    paths.append(save(fig, "ttft.png"))
    return paths


def write_report(out_dir: Path, summary: dict[str, Any]) -> list[Path]:
    points = [Point(**p) for p in summary["points"]]
    if not points:
        return []
    offered = "speed" if summary["settings"]["dataset"] in TRACE_DATASETS else "rate"
    table = format_table(points, offered)
    sat = saturation(points)
    summary["saturation"] = {str(n): s for n, s in sat.items()}
    slo = summary["slo_ms"]
    slo_text = " and ".join(f"{k.upper()} <= {v:g} ms" for k, v in slo.items()) or "none"
    legend = (
        f"SLO for goodput: {slo_text}. sent/s: requests sent / sending time (Poisson draws scatter around the rate); "
        "req/s: completed / (first send to last completion), as vLLM counts it. Latencies in ms. CPU in % of one core "
        "during the measured part, summed over the processes of a role (worker = all workers); other = processes "
        f"outside this benchmark; machine = everything ({summary['cpus']} cores = {100 * summary['cpus']})."
    )
    text = "\n\n".join([
        f"Command: `{summary['command']}`",
        legend,
        table,
        "Saturation (the highest rate at which >= 90 % of the requests met the SLO):\n" + format_saturation(sat),
    ])  # fmt: skip
    (out_dir / "table.md").write_text(text + "\n")
    (out_dir / "topology.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(text, flush=True)
    title = f"{summary['scenario']}: {summary['settings']['workload']}"
    return [out_dir / "table.md", out_dir / "topology.json", *plot(points, out_dir, slo, title)]


# ---------------------------------------------------------------------------------------------------------------------
# Command line


def _numbers(cast: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    def parse(text: str) -> list[Any]:
        try:
            values = [cast(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
        if not values or any(v <= 0 for v in values):
            raise argparse.ArgumentTypeError("values must be positive")
        return sorted(set(values))

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Run a scenario with N mocker workers over a sweep of request rates; table, JSON and plots. "
        "Flags this script does not know are passed on to zdyn bench (e.g. --dataset-path, --prefix-len).",
    )
    p.add_argument("--scenario", choices=sorted(SCENARIOS), default="agg")
    p.add_argument("--workers", type=_numbers(int), default=[1, 2, 4, 8], metavar="N[,N..]")
    p.add_argument(
        "--prefill-workers",
        type=int,
        metavar="P",
        help="disagg, disagg_route: P of the N workers are prefill workers, N - P decode workers (default N // 2)",
    )
    rates = p.add_mutually_exclusive_group()
    rates.add_argument("--rates", type=_numbers(float), metavar="R[,R..]", help="offered req/s, the same for every N")
    rates.add_argument(
        "--rates-per-worker",
        type=_numbers(float),
        metavar="R[,R..]",
        help="offered req/s per worker: N workers get R x N (the same number of points around each knee)",
    )
    p.add_argument("--out-dir", type=Path, help="default benchmarks/results/topology-<scenario>")
    p.add_argument("--report-only", action="store_true", help="redo table and plots from OUT_DIR/topology.json")

    g = p.add_argument_group("load (zdyn bench)")
    g.add_argument("--dataset", choices=("random", "prefix", *TRACE_DATASETS), default="random")
    g.add_argument("--input-len", type=int, default=1536, help="random: prompt tokens (default %(default)s)")
    g.add_argument("--output-len", type=int, default=128, help="random, prefix: output tokens (default %(default)s)")
    g.add_argument("--range-ratio", type=float, default=0.0, help="random: lengths uniform in len x (1 +- r)")
    length = g.add_mutually_exclusive_group()
    length.add_argument("--duration", type=float, default=20.0, help="seconds of sending per point (default 20)")
    length.add_argument("--num-requests", type=int, help="measured requests per point instead of --duration")
    g.add_argument("--warmups", type=int, help="warm-up requests before each point (default max(4, 2 x N))")
    g.add_argument(
        "--slo",
        nargs="+",
        default=["ttft:1000", "tpot:100"],
        metavar="NAME:MS",
        help="goodput SLO, zdyn bench --goodput syntax (default ttft:1000 tpot:100)",
    )
    g.add_argument("--seed", type=int, default=0, help="seed of the first point; each next point adds 1")

    g = p.add_argument_group("workers (mocker engine, Dynamo's defaults)")
    g.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="model dir for config and tokenizer (built if "
                   "missing when it is the default tiny-llama)")  # fmt: skip
    g.add_argument("--speedup", type=float, default=1.0, help="divide simulated durations by this")
    g.add_argument("--kv-block-size", type=int, default=64)
    g.add_argument("--num-blocks", type=int, default=16384)
    g.add_argument("--max-num-seqs", type=int, default=256)
    g.add_argument("--max-num-batched-tokens", type=int, default=8192)
    g.add_argument("--max-model-len", type=int, default=2048, help="must hold prompt + output (tiny-llama: <= 2048)")
    g.add_argument("--mocker-args", default="", help="more worker flags, one shell-quoted string")
    g.add_argument("--router-mode", help="agg_route: the router's mode (kv, kv-load, round-robin, random)")

    g = p.add_argument_group("run")
    g.add_argument("--lock", default=LOCK_PATH, help="shared benchmark lock held while a deployment runs ('' for none)")
    g.add_argument("--start-timeout", type=float, default=120.0, help="seconds for all workers to register")
    return p


def mocker_flags(args: argparse.Namespace) -> list[str]:
    return [
        "--speedup", f"{args.speedup:g}",
        "--block-size", str(args.kv_block_size),
        "--num-blocks", str(args.num_blocks),
        "--max-num-seqs", str(args.max_num_seqs),
        "--max-num-batched-tokens", str(args.max_num_batched_tokens),
        "--max-model-len", str(args.max_model_len),
        *shlex.split(args.mocker_args),
    ]  # fmt: skip


def workload_text(args: argparse.Namespace) -> str:
    if args.dataset == "random":
        spread = f" +-{100 * args.range_ratio:g}%" if args.range_ratio else ""
        data = f"random {args.input_len}{spread} in / {args.output_len} out"
    else:
        data = args.dataset
    per_point = f"{args.num_requests} requests" if args.num_requests else f"{args.duration:g} s"
    return f"{data}, mocker speedup {args.speedup:g}, {per_point} per point"


def git_state() -> dict[str, Any]:
    """Commit and whether zdyn/ or examples/ differ from it (read-only git commands)."""

    def git(*cmd: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True, check=False)

    head = git("rev-parse", "HEAD")
    if head.returncode != 0:
        return {}
    return {
        "commit": head.stdout.strip(),
        "dirty": git("diff", "--quiet", "HEAD", "--", "zdyn", "examples").returncode != 0,
    }


def _interrupt_on_sigterm() -> None:
    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)


def run(args: argparse.Namespace, passthrough: list[str], out_dir: Path, command: str) -> dict[str, Any]:
    scenario = scenario_for(args.scenario, getattr(args, "prefill_workers", None))
    summary: dict[str, Any] = {
        "format": RESULT_FORMAT,
        "scenario": args.scenario,
        "command": command,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "git": git_state(),
        "settings": {
            **{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "report_only"},
            "workload": workload_text(args),
            "mocker_flags": mocker_flags(args),
            "bench_passthrough": passthrough,
        },
        "slo_ms": {k: float(v) for k, _, v in (s.partition(":") for s in args.slo)},
        "points": [],
        "deployments": [],
    }
    for n in args.workers:
        rates = args.rates or [round(r * n, 3) for r in args.rates_per_worker]
        env = {
            "ZDYN_ENGINE": "mocker",
            "ZDYN_NUM_WORKERS": str(n),
            "ZDYN_MODEL": str(args.model),
            "ZDYN_HOST": "127.0.0.1",
            "ZDYN_PORT": str(free_port()),
            "ZDYN_START_TIMEOUT": str(int(args.start_timeout)),
            "ZDYN_LOG_DIR": str((out_dir / "logs" / f"w{n}").resolve()),
            **scenario.env(n),
            **({"ZDYN_ROUTER_MODE": args.router_mode} if args.router_mode else {}),
        }
        dep = Deployment(scenario, n, env, mocker_flags(args), out_dir / "logs" / f"w{n}")
        record: dict[str, Any] = {"workers": n, "rates": rates, "log_dir": str(dep.log_dir.relative_to(out_dir))}
        if scenario.split is not None:
            record |= scenario.split(n)
        summary["deployments"].append(record)
        with bench_lock(args.lock) if args.lock else contextlib.nullcontext():
            t0 = time.monotonic()
            print(f"== {args.scenario} ({scenario.about}), N={n}: starting {scenario.script}", flush=True)
            try:
                dep.start(args.start_timeout)
                record["start_s"] = round(time.monotonic() - t0, 2)
                record["roles"] = dep.roles()
                print(
                    f"   ready in {record['start_s']:.1f}s: {dep.live_workers()} workers at {dep.base_url}", flush=True
                )
                for rate in rates:
                    seed = args.seed + len(summary["points"])
                    point = run_point(args, dep, rate, seed, out_dir, passthrough)
                    summary["points"].append(vars(point))
                    print(
                        f"   rate {rate:g}: {point.request_throughput:.2f} req/s, TTFT p50/p99 {point.ttft_p50:.0f}/"
                        f"{point.ttft_p99:.0f} ms, ITL p50 {point.itl_p50:.1f} ms, good {_fmt(point.goodput, 2)}"
                        f" req/s, CPU {point.cpu}",
                        flush=True,
                    )
            finally:
                t1 = time.monotonic()
                record["leftovers"] = dep.stop()
                record["stop_s"] = round(time.monotonic() - t1, 2)
                record["run_sh_exit"] = dep.proc.returncode if dep.proc is not None else None
                print(
                    f"   stopped in {record['stop_s']:.1f}s; left behind: {record['leftovers'] or 'nothing'}",
                    flush=True,
                )
                (out_dir / "topology.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, passthrough = parser.parse_known_args(argv)
    clash = [a for a in passthrough if a.split("=", 1)[0] in OWN_BENCH_FLAGS]
    if clash:
        parser.error(f"set by this script, not passed on to zdyn bench: {' '.join(clash)}")
    out_dir: Path = args.out_dir or REPO / "benchmarks" / "results" / f"topology-{args.scenario}"
    if args.report_only:
        summary = json.loads((out_dir / "topology.json").read_text())
        for path in write_report(out_dir, summary):
            print(f"wrote {path}")
        return 0
    if not args.rates and not args.rates_per_worker:
        parser.error("--rates or --rates-per-worker is required")
    if args.prefill_workers is not None:
        if args.scenario not in ("disagg", "disagg_route"):
            parser.error("--prefill-workers applies to disagg and disagg_route only")
        try:
            for n in args.workers:
                prefill_split(n, args.prefill_workers)
        except ValueError as e:
            parser.error(str(e))
    if args.model == DEFAULT_MODEL:
        build_tiny_llama(DEFAULT_MODEL)
    out_dir.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["python", "benchmarks/topology.py", *(sys.argv[1:] if argv is None else argv)])
    print(f"Command: {command}", flush=True)
    _interrupt_on_sigterm()
    try:
        summary = run(args, passthrough, out_dir, command)
    except KeyboardInterrupt:
        print("interrupted; the deployment was stopped", file=sys.stderr)
        return 130
    paths = write_report(out_dir, summary)
    left = [x for d in summary["deployments"] for x in d.get("leftovers", [])]
    print(f"Command: {command}")
    for path in paths:
        print(f"wrote {path}")
    return 1 if left else 0


if __name__ == "__main__":
    sys.exit(main())
