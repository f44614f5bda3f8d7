"""The benchmark harness's parts that need no deployment: process groups, the lock, CPU sampling, reporting."""

from __future__ import annotations

import math
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from zdyn.bench import host, results
from zdyn.bench.host import CpuSampler, _interp, bench_lock, by_group
from zdyn.bench.procs import ChildExited, ProcessGroup, free_port_run, wait_until
from zdyn.bench.runs import Load, cpu_by_kind, figures, idle_workers

SPIN = "import time\nt = time.process_time()\nwhile time.process_time() - t < {s}: pass\ntime.sleep(60)"
IGNORE_TERM = (
    "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('ready', flush=True)\ntime.sleep(60)"
)


def test_stop_kills_what_ignores_sigterm_and_reports_it(tmp_path: Path) -> None:
    group = ProcessGroup(tmp_path)
    polite = group.start("polite", [sys.executable, "-c", "import time; time.sleep(60)"])
    stubborn = group.start("stubborn", [sys.executable, "-c", IGNORE_TERM])
    wait_until(lambda: "ready" in group.log("stubborn"), "stubborn did not start", 10)
    assert group.stop(timeout_s=1.0) == ["stubborn"]
    assert polite.returncode == -signal.SIGTERM and stubborn.returncode == -signal.SIGKILL
    assert host.group_members([polite.pid, stubborn.pid]) == {}


def test_a_dead_child_fails_a_wait_at_once_with_its_log_tail(tmp_path: Path) -> None:
    with ProcessGroup(tmp_path) as group:
        group.start("doomed", [sys.executable, "-c", "print('the last words'); raise SystemExit(3)"])
        t0 = time.monotonic()
        with pytest.raises(ChildExited, match="doomed exited with 3(.|\n)*the last words"):
            wait_until(lambda: False, "never", 30, group)
        assert time.monotonic() - t0 < 10


def test_consecutive_free_ports() -> None:
    base = free_port_run(3)
    assert base > 1024 and base + 2 < 65536


def test_the_lock_is_exclusive_and_names_its_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZDYN_BENCH_LOCK", str(tmp_path / "lock"))
    assert host.lock_path() == str(tmp_path / "lock")
    second: list[float] = []

    def other() -> None:
        with bench_lock() as waited:
            second.append(waited)

    with bench_lock() as waited:
        assert waited < 1.0
        thread = threading.Thread(target=other)
        thread.start()
        time.sleep(0.3)
        assert second == []  # the other holder waits
    thread.join(10)
    assert second and second[0] >= 0.25


def test_interpolation_between_samples() -> None:
    points = [(0.0, 0.0), (1.0, 1.0), (3.0, 2.0)]
    assert _interp(points, 0.5, 2.0) == pytest.approx(1.5 - 0.5)
    assert _interp(points, -5.0, 10.0) == 2.0  # held flat beyond the ends
    assert _interp([], 0.0, 1.0) == 0.0


def test_sampler_charges_cpu_to_the_right_role(tmp_path: Path) -> None:
    with ProcessGroup(tmp_path) as group:
        busy = group.start("busy", [sys.executable, "-c", SPIN.format(s=0.4)])
        idle = group.start("idle", [sys.executable, "-c", "import time; time.sleep(60)"])
        t0 = time.time()
        with CpuSampler([busy.pid, idle.pid], interval_s=0.05) as sampler:
            wait_until(lambda: getattr(host.read_stat(busy.pid), "cpu_s", 0.0) >= 0.4, "no spin", 20)
            time.sleep(0.2)
        used = sampler.usage(t0, time.time(), by_group({"busy": busy.pid, "idle": idle.pid}))
    assert 0.2 < used["busy"] < 1.5  # its spin (0.4 s) and start-up, not the idle one's
    assert used["idle"] < 0.3 < used["busy"]
    assert used["machine"] >= used["busy"] and used["other"] >= 0.0


def test_reporting_formats() -> None:
    assert (results.fmt(None), results.fmt(math.nan), results.fmt(1234.5), results.fmt(12.34), results.fmt(1.234)) == (
        "-", "-", "1,234", "12.3", "1.23",
    )  # fmt: skip
    assert results.mr([3.0, 1.0, 2.0, None]) == "2.00 (1.00-3.00)" and results.mr([5.0]) == "5.00"
    assert results.percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5 and math.isnan(results.percentile([], 50))
    assert math.isnan(results.ratio(1.0, 0.0)) and results.ratio(3.0, 2.0) == 1.5
    text = results.table(["a", "b"], [["x", "1"]])
    assert text.splitlines() == ["| a | b |", "| --- | ---: |", "| x | 1 |"]
    groups = {"sys": [{"v": 1.0}, {"v": 3.0}]}
    assert (
        results.summary_table(groups, [("v", lambda r: r["v"], 1)], "system").splitlines()[2]
        == "| sys | 2 | 2.0 (1.0-3.0) |"
    )


def test_figures_of_a_bench_result() -> None:
    stats = {"count": 2, "mean": 15.0, "median": 15.0, "percentiles": {"p50": 15.0, "p99": 19.9}}
    empty = {"count": 0, "mean": 0.0, "median": 0.0, "percentiles": {"p50": 0.0}}
    metrics = {"num_requests": 2, "completed": 2, "failed": 0, "duration_s": 2.0, "request_throughput": 1.0,
               "output_throughput": 10.0, "total_input_tokens": 100, "good_requests": 1, "request_goodput": 0.5,
               "max_concurrency": 2, "ttft": stats, "itl": empty, "tpot": stats, "e2el": stats}  # fmt: skip
    records = [{"success": True, "num_chunks": 3, "output_tokens": 5, "prompt_tokens": 50}] * 2
    f = figures({"metrics": metrics, "requests": records})
    assert (f["req_s"], f["in_tok_s"], f["good_fraction"], f["ttft_p99"], f["chunks_per_req"]) == (
        1.0,
        50.0,
        0.5,
        19.9,
        3,
    )
    assert math.isnan(f["itl_p50"]) and math.isnan(f["ttft_p90"])  # no ITL at all; p90 not asked for


def test_rows_by_kind_of_role_and_idle_workers() -> None:
    row = {"window_s": 2.0, "cpu_s": {"frontend": 1.0, "worker0": 0.5, "worker1": 0.01, "load generator": 0.2,
                                      "machine": 2.0, "other": 0.29}}  # fmt: skip
    assert cpu_by_kind(row) == {"frontend": 50.0, "worker": 25.5, "bench": 10.0, "machine": 100.0, "other": 14.5}
    assert idle_workers(row) == ["worker1"]
    assert Load(concurrency=4, requests=10, request_rate=2.0).flags()[-2:] == ["--request-rate", "2"]
