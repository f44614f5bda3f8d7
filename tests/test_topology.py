"""benchmarks/topology.py: a real run of the agg scenario (one mocker worker, one short load point), and its knee logic.

Tests never take the shared benchmark lock: the run gets a lock file of its own (``ZDYN_BENCH_LOCK``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "topology.py"
RUN_TIMEOUT_S = 180


def load_topology() -> ModuleType:
    spec = importlib.util.spec_from_file_location("topology", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["topology"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def alive(pid: int) -> bool:
    """Whether the process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] != "Z"


@pytest.mark.slow
@pytest.mark.timeout(RUN_TIMEOUT_S + 30)
def test_agg_one_worker_one_rate(tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "topology"
    argv = [
        sys.executable, "-m", "benchmarks.topology", "--scenario", "agg", "--workers", "1", "--rates", "8",
        "--num-requests", "6", "--warmups", "1", "--speedup", "50", "--model", str(tiny_model), "--out-dir", str(out),
    ]  # fmt: skip
    env = {**os.environ, "ZDYN_BENCH_LOCK": str(tmp_path / "lock")}
    run = subprocess.run(argv, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, cwd=REPO, env=env)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "python -m benchmarks.topology --scenario agg --workers 1" in run.stdout

    summary: dict[str, Any] = json.loads((out / "topology.json").read_text())
    [point] = summary["points"]
    assert (point["workers"], point["rate"], point["completed"], point["failed"]) == (1, 8, 6, 0)
    assert 0 < point["ttft_p50"] <= point["ttft_p99"] and point["output_throughput"] > 0
    assert point["good_fraction"] is not None  # the default SLO was applied
    raw = json.loads((out / point["result_json"]).read_text())
    assert raw["runs"][0]["metrics"]["completed"] == 6 and raw["runs"][0]["warmup"]["requests"] == 1

    table = (out / "table.md").read_text()
    assert "| 1 | 8 |" in table and "TTFT p99" in table and "Saturation" in table
    for name in ("throughput.png", "ttft.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    [deployment] = summary["deployments"]
    assert deployment["leftovers"] == []
    assert set(deployment["roles"]) == {"frontend", "worker0"}
    assert not [name for name, pid in deployment["roles"].items() if alive(pid)]


def test_saturation_finds_the_last_rate_within_the_slo() -> None:
    topology = load_topology()

    def point(workers: int, rate: float, throughput: float, good: float | None) -> Any:
        return topology.Point(
            workers=workers, rate=rate, result_json="", completed=1, failed=0, duration_s=1.0,
            request_throughput=throughput, output_throughput=128 * throughput, goodput=None, good_fraction=good,
            ttft_p50=1.0, ttft_p99=1.0, itl_p50=1.0, itl_p99=1.0, tpot_p50=1.0, tpot_p99=1.0, e2el_p50=1.0,
            max_concurrency=1,
        )  # fmt: skip

    points = [
        point(1, 2, 1.9, 1.0), point(1, 4, 3.8, 0.95), point(1, 6, 4.5, 0.4), point(1, 8, 4.6, 0.0),
        point(2, 4, 3.9, 0.5),  # fails at its first rate
        point(4, 8, 7.9, None), point(4, 16, 12.0, None),  # no SLO: throughput against the offered rate
    ]  # fmt: skip
    sat = topology.saturation(points)
    assert sat[1] == {
        "sustained_rate": 4,
        "first_saturated_rate": 6,
        "max_request_throughput": 4.6,
        "max_output_throughput": 128 * 4.6,
    }
    assert (sat[2]["sustained_rate"], sat[2]["first_saturated_rate"]) == (None, 4)
    assert (sat[4]["sustained_rate"], sat[4]["first_saturated_rate"]) == (8, 16)
    table = topology.format_table(points)
    assert table.count("\n") == len(points) + 1 and "| 1 | 6 | - | 4.50 |" in table
