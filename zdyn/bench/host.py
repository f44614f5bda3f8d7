"""The machine a benchmark runs on: the shared benchmark lock, and CPU and memory per process from /proc.

Standard library only: ``benchmarks/router_speed_dynamo.py`` imports this module from Dynamo's own venv.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024
DEFAULT_LOCK = "/tmp/zdyn-bench.lock"


def lock_path() -> str:
    """The shared benchmark lock: ``$ZDYN_BENCH_LOCK``, else /tmp/zdyn-bench.lock."""
    return os.environ.get("ZDYN_BENCH_LOCK") or DEFAULT_LOCK


@contextlib.contextmanager
def bench_lock(path: str | None = None) -> Iterator[float]:
    """Hold the benchmark lock (fcntl, as ``flock PATH cmd`` takes it) so that no two benchmarks share the cores;
    waits for it, with a note, while another holds it. Yields the seconds spent waiting. Meanwhile SIGTERM raises
    KeyboardInterrupt in the main thread, so that a stopped benchmark still stops the deployments it started (they
    run in process groups of their own, which the signal does not reach)."""
    path = path or lock_path()
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler) if main else None
    try:
        with open(path, "a") as f:
            t0 = time.monotonic()
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                print(f"waiting for {path}: another benchmark holds it", file=sys.stderr, flush=True)
                fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield time.monotonic() - t0
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)


# ------------------------------------------------------------------------------------------------------ /proc
@dataclass(frozen=True, slots=True)
class ProcStat:
    pid: int
    ppid: int
    pgid: int
    state: str
    cpu_s: float  # user + system, all threads
    rss_kib: int


def read_stat(pid: int) -> ProcStat | None:
    """One process's /proc/PID/stat, None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rfind(b")") + 2 :].split()  # from "state" on: the command name may hold spaces
    cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK
    return ProcStat(pid, int(fields[1]), int(fields[2]), fields[0].decode(), cpu, int(fields[21]) * PAGE_KIB)


def process_table() -> dict[int, ProcStat]:
    out = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (stat := read_stat(int(name))) is not None:
            out[stat.pid] = stat
    return out


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def machine_busy_s() -> float:
    """CPU seconds all cores have spent busy since boot (steal included)."""
    with open("/proc/stat", encoding="ascii") as f:
        ticks = [int(v) for v in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
    return (sum(ticks) - ticks[3] - ticks[4]) / CLK_TCK


def group_members(pgids: Iterable[int]) -> dict[int, str]:
    """pid -> command line of the live (not zombie) processes in these process groups."""
    wanted = set(pgids)
    return {p.pid: cmdline(p.pid) for p in process_table().values() if p.pgid in wanted and p.state != "Z"}


def pss_kib(pid: int) -> int:
    """Proportional set size: shared pages split between the processes that map them (so sums do not double count)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


Labeller = Callable[[int, int], str | None]  # (pid, process group) -> label; None: not counted


def memory_mib(labels: Labeller, pss: bool = False) -> dict[str, float]:
    """RSS (or PSS) per label, in MiB, of every live process ``labels`` names."""
    out: dict[str, float] = {}
    for p in process_table().values():
        if p.state != "Z" and (label := labels(p.pid, p.pgid)) is not None:
            out[label] = out.get(label, 0.0) + (pss_kib(p.pid) if pss else p.rss_kib) / 1024
    return out


def by_group(groups: dict[str, int], titles: bool = False) -> Labeller:
    """A labeller: the role whose process group a process is in (``groups``: role -> pgid). With ``titles``, a
    process that names itself ``VLLM::...`` (vLLM's EngineCore and workers) is labelled ``role/VLLM::...``."""
    role_of = {pgid: role for role, pgid in groups.items()}

    def label(pid: int, pgid: int) -> str | None:
        role = role_of.get(pgid)
        if role is not None and titles and pid != pgid:
            title = cmdline(pid).split(" ", 1)[0]
            if title.startswith("VLLM::"):
                return f"{role}/{title}"
        return role

    return label


# ------------------------------------------------------------------------------------------------ CPU sampler
@dataclass(slots=True)
class Sample:
    t: float  # time.time()
    busy_s: float  # machine_busy_s()
    cpu_s: dict[int, float]  # pid -> CPU seconds, of the tracked processes
    rss_kib: dict[int, int]


class CpuSampler:
    """Samples the CPU seconds (and RSS) of the processes in some process groups every ``interval_s``, and the
    whole machine's busy time, stamped with wall-clock time; ``usage`` then reads any window, also one known only
    afterwards (a load generator's measured phase). The processes of a group are looked up every ``rescan_s``;
    ``match`` adds the process groups of processes whose command line contains one of its strings (a tool that
    names its own processes, such as aiperf). ``mark()`` takes a sample at once and returns its time."""

    def __init__(
        self, pgids: Iterable[int] = (), *, match: Iterable[str] = (), interval_s: float = 0.5, rescan_s: float = 1.0
    ) -> None:
        self.pgids = set(pgids)
        self.match = tuple(match)
        self.interval_s, self.rescan_s = interval_s, rescan_s
        self.samples: list[Sample] = []
        self.pgid_of: dict[int, int] = {}  # pid -> process group, of every process seen in a tracked group
        self.titles: dict[int, str] = {}  # pid -> command line, of the processes of the ``match`` groups
        self._pids: list[int] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-sampler", daemon=True)

    def track(self, pgid: int) -> None:
        """Also sample process group ``pgid`` (e.g. a load generator started after the sampler)."""
        with self._lock:
            self.pgids.add(pgid)
        self._scan()

    def _scan(self) -> None:
        table = process_table()
        if self.match:
            me = os.getpid()
            lines = {p.pid: cmdline(p.pid) for p in table.values() if p.pid != me}
            found = {table[pid].pgid for pid, line in lines.items() if any(m in line for m in self.match)}
            with self._lock:
                self.pgids |= found
                self.titles |= {pid: lines[pid] for pid in lines if table[pid].pgid in found}
        with self._lock:
            mine = [p for p in table.values() if p.pgid in self.pgids and p.state != "Z"]
            self.pgid_of.update({p.pid: p.pgid for p in mine})
            self._pids = [p.pid for p in mine]

    def mark(self) -> float:
        with self._lock:
            pids = list(self._pids)
        stats = [s for pid in pids if (s := read_stat(pid)) is not None]
        sample = Sample(
            time.time(), machine_busy_s(), {s.pid: s.cpu_s for s in stats}, {s.pid: s.rss_kib for s in stats}
        )
        with self._lock:
            self.samples.append(sample)
        return sample.t

    def _run(self) -> None:
        last_scan = 0.0
        while True:
            if time.monotonic() - last_scan >= self.rescan_s:
                self._scan()
                last_scan = time.monotonic()
            self.mark()
            if self._stop.wait(self.interval_s):
                return

    def __enter__(self) -> CpuSampler:
        self._scan()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.mark()

    def usage(self, t0: float, t1: float, labels: Labeller) -> dict[str, float]:
        """CPU seconds between wall-clock times ``t0`` and ``t1`` per label (``labels(pid, pgid)``),
        plus ``machine`` (all cores busy) and ``other`` (machine minus every tracked process). Values are
        interpolated between samples; a process counts from the first to the last sample it appears in."""
        with self._lock:
            samples = sorted(self.samples, key=lambda s: s.t)
        if len(samples) < 2:
            return {}
        out: dict[str, float] = {}
        tracked = 0.0
        for pid in {pid for s in samples for pid in s.cpu_s}:
            used = _interp([(s.t, s.cpu_s[pid]) for s in samples if pid in s.cpu_s], t0, t1)
            tracked += used
            if (label := labels(pid, self.pgid_of[pid])) is not None:
                out[label] = out.get(label, 0.0) + used
        out["machine"] = _interp([(s.t, s.busy_s) for s in samples], t0, t1)
        out["other"] = max(0.0, out["machine"] - tracked)
        return out

    def peak_rss_mib(self, labels: Labeller) -> dict[str, float]:
        """The highest RSS seen per label (summed over its processes in one sample), in MiB."""
        with self._lock:
            samples = list(self.samples)
        peak: dict[str, float] = {}
        for s in samples:
            now: dict[str, float] = {}
            for pid, kib in s.rss_kib.items():
                if (label := labels(pid, self.pgid_of[pid])) is not None:
                    now[label] = now.get(label, 0.0) + kib / 1024
            for label, mib in now.items():
                peak[label] = max(peak.get(label, 0.0), mib)
        return peak


def _interp(points: list[tuple[float, float]], t0: float, t1: float) -> float:
    """f(t1) - f(t0) of the piecewise linear f through ``points`` (sorted by time), held flat beyond its ends."""
    if not points:
        return 0.0

    def at(t: float) -> float:
        if t <= points[0][0]:
            return points[0][1]
        for (ta, va), (tb, vb) in zip(points, points[1:], strict=False):
            if t <= tb:
                return va + (vb - va) * (t - ta) / (tb - ta) if tb > ta else vb
        return points[-1][1]

    return at(t1) - at(t0)
