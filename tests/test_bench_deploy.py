"""The benchmark harness's deployments: the command lines equal run.sh's, and a real mocker deployment starts,
serves and stops without leaving a process behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml

from zdyn.bench.deploy import EXAMPLES, Ports, ZdynSpec, config_for, plan, start
from zdyn.bench.host import group_members

FAKE_ZDYN = """#!/usr/bin/env bash
python3 -c 'import json, sys; print(json.dumps(sys.argv[1:]), flush=True)' "$@"
exec sleep 60
"""

VARIANTS = {
    "agg": ZdynSpec("agg", workers=2, model="m", worker_args=("--speedup", "10")),
    "agg-processors": ZdynSpec("agg", workers=1, processors=2, model="m"),
    "agg_route": ZdynSpec("agg_route", workers=2, router_mode="kv-load", model="m", engine="vllm"),
    "agg_route-in-process": ZdynSpec("agg_route", workers=1, router_in_process=True),
    "disagg": ZdynSpec("disagg", workers=1, prefill_workers=2, model="m", worker_args=("--kv-lease", "5")),
    "disagg_route": ZdynSpec("disagg_route", workers=2, prefill_workers=1, model="m"),
}


def run_sh_env(spec: ZdynSpec, ports: Ports, config: Path, log_dir: Path, bin_dir: Path) -> dict[str, str]:
    """The environment that asks run.sh for what ``spec`` describes, on ``ports``."""
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "ZDYN_CONFIG": str(config),
        "ZDYN_LOG_DIR": str(log_dir),
        "ZDYN_ENGINE": spec.engine,
        "ZDYN_PORT": str(ports.http),
        "ZDYN_BIND_HOST": "127.0.0.1",
        "ZDYN_HOST": "127.0.0.1",
        "ZDYN_NUM_WORKERS": str(spec.workers),
        "ZDYN_NUM_PREFILL_WORKERS": str(spec.prefill_workers),
        "ZDYN_NUM_PROCESSORS": str(spec.processors),
        "ZDYN_PROCESSORS_PORT": str(ports.processors),
        "ZDYN_WORKERS_PORT": str(ports.workers),
        "ZDYN_ROUTER_PORT": str(ports.router),
        "ZDYN_QUEUE_PORT": str(ports.queue),
        "ZDYN_ROUTER_IN_PROCESS": "1" if spec.router_in_process else "0",
        "ZDYN_KEYS_DIR": "",  # the fake zdyn makes no keys (the harness passes its own through the environment)
        **({"ZDYN_MODEL": spec.model} if spec.model else {}),
        **({"ZDYN_ROUTER_MODE": spec.router_mode} if spec.router_mode else {}),
    }
    if spec.scenario == "agg" and not spec.processors:  # agg's run.sh leaves these to config.yaml (fixed ports)
        env |= {"ZDYN_WORKERS_ENDPOINT": f"tcp://*:{ports.workers}", "ZDYN_CONNECT": f"tcp://127.0.0.1:{ports.workers}"}
    return env


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_command_lines_are_run_sh_s(variant: str, tmp_path: Path) -> None:
    spec = VARIANTS[variant]
    ports = Ports.free(spec)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(config_for(spec, ports)))
    expected = {role.name: role.argv[1:] for role in plan(spec, ports, config)}
    bin_dir, log_dir = tmp_path / "bin", tmp_path / "logs"
    bin_dir.mkdir()
    (bin_dir / "zdyn").write_text(FAKE_ZDYN)
    (bin_dir / "zdyn").chmod(0o755)
    env = {**os.environ, **run_sh_env(spec, ports, config, log_dir, bin_dir)}
    script = EXAMPLES / spec.scenario / "run.sh"
    with open(tmp_path / "run.sh.log", "wb") as out:
        proc = subprocess.Popen(
            [str(script), *spec.worker_args], env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    seen: dict[str, list[str]] = {}
    try:
        deadline = time.monotonic() + 20
        while set(seen) != set(expected) and time.monotonic() < deadline and proc.poll() is None:
            for name in expected:
                lines = (log_dir / f"{name}.log").read_text().splitlines() if (log_dir / f"{name}.log").exists() else []
                if lines:
                    seen[name] = json.loads(lines[0])
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # run.sh's trap stops the roles it started
        proc.wait(20)
    assert seen == expected, (tmp_path / "run.sh.log").read_text()
    assert set(expected) == {r for r in expected if (log_dir / f"{r}.log").exists()}


def test_plan_names_roles_as_run_sh_and_shares_the_worker_flags() -> None:
    spec = ZdynSpec("disagg_route", workers=2, prefill_workers=1, worker_args=("--speedup", "5"))
    ports = Ports(8000, 5555, 5550, 5570, 5590, 9100, 9101)
    roles = plan(spec, ports, Path("/c.yaml"))
    assert [r.name for r in roles] == ["router", "frontend", "prefill_queue", "prefill0", "decode0", "decode1"]
    for role in roles[3:]:
        assert role.argv[-2:] == ["--speedup", "5"] and "--model" not in role.argv
    decode = roles[-1].argv
    assert decode[decode.index("--connect") + 1] == "tcp://127.0.0.1:5555,tcp://127.0.0.1:5571"
    assert decode[decode.index("--prefill-queue") + 1] == "tcp://127.0.0.1:5590"
    assert config_for(spec, ports)["PrefillQueue"]["metrics-port"] == 9101


def test_spec_rejects_what_run_sh_cannot_start() -> None:
    for bad in (
        {"scenario": "nope"},
        {"engine": "sglang"},
        {"workers": 0},
        {"scenario": "disagg", "prefill_workers": 0},
        {"scenario": "agg_route", "processors": 2},
        {"scenario": "agg", "router_mode": "kv"},
        {"scenario": "disagg_route", "router_in_process": True},
    ):
        with pytest.raises(ValueError):
            ZdynSpec(**bad)  # type: ignore[arg-type]


@pytest.mark.slow
def test_agg_with_two_mocker_workers_serves_and_leaves_nothing_behind(tiny_model: Path, tmp_path: Path) -> None:
    spec = ZdynSpec(
        "agg", workers=2, model=str(tiny_model), worker_args=("--speedup", "1000", "--max-model-len", "2048")
    )
    with start(spec, tmp_path / "logs", timeout_s=60) as dep:
        groups = dep.roles()
        assert set(groups) == {"frontend", "worker0", "worker1"} and dep.model == "tiny-llama"
        served = []
        with httpx.Client(base_url=dep.base_url, timeout=30) as client:
            for i in range(4):
                body = {"model": dep.model, "prompt": f"hello {i}", "max_tokens": 4, "ignore_eos": True}
                r = client.post("/v1/completions", json=body)
                assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
            for w in client.get("/health").json()["workers"]:
                served.append(w["id"])
        metrics = httpx.get(f"{dep.base_url}/metrics").text
        assert 'zdyn_requests_total{endpoint="completions",status="success"} 4.0' in metrics
    assert sorted(served) == ["worker0", "worker1"]
    assert dep.info["killed_on_stop"] == []  # every role ended on SIGTERM
    assert group_members(groups.values()) == {}
    assert all(proc.returncode is not None for proc in dep.group.procs.values())
