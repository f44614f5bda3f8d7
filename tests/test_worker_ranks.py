"""Which workers a ``zdyn worker`` over vLLM's data parallelism registers, and which config sections it reads
(pure: no vLLM; tests/test_vllm_parallel_e2e.py runs them on vLLM)."""

from __future__ import annotations

import argparse
import os

import pytest

from zdyn.engines.vllm import host
from zdyn.roles import worker
from zdyn.roles.worker_dp import data_parallel_ranks


def config(**flags: object) -> worker.WorkerConfig:
    defaults = dict(
        data_parallel_size=1, data_parallel_rank=None, data_parallel_external_lb=False,
        data_parallel_start_rank=None, data_parallel_size_local=None,
    )  # fmt: skip
    headless = bool(flags.pop("headless", False))
    engine = str(flags.pop("engine", "vllm"))
    return worker.WorkerConfig(
        engine=engine, worker_id="w", headless=headless, engine_flags=argparse.Namespace(**{**defaults, **flags})
    )


@pytest.mark.parametrize(
    ("flags", "ids"),
    [
        ({}, ["w"]),  # no data parallelism
        ({"data_parallel_size": 2}, ["w-dp0", "w-dp1"]),  # internal load balancing: a worker per rank
        ({"data_parallel_size": 4, "data_parallel_size_local": 2}, ["w-dp0", "w-dp1", "w-dp2", "w-dp3"]),  # + headless
        ({"data_parallel_size": 4, "data_parallel_size_local": 2, "data_parallel_start_rank": 2}, ["w-dp2", "w-dp3"]),
        ({"data_parallel_size": 2, "data_parallel_rank": 1}, ["w"]),  # external load balancing: one rank
        ({"data_parallel_size": 2, "data_parallel_external_lb": True}, ["w"]),
    ],
)
def test_one_worker_per_rank_its_engine_sends_to(flags, ids):
    assert config(**flags).worker_ids() == ids


def test_headless_registers_nothing_and_binds_nothing():
    headless = config(headless=True, data_parallel_size=2, data_parallel_start_rank=1, data_parallel_size_local=1)
    assert data_parallel_ranks(headless) == [] and headless.binds() == []
    with pytest.raises(ValueError, match="--headless"):
        config(headless=True, engine="mocker")


def test_a_headless_node_reads_its_own_config_section_last():
    assert worker.sections(["--headless"], "vllm") == ("Worker", "Worker.vllm", "HeadlessWorker")
    assert worker.sections(["--prefill"], "vllm") == ("Worker", "Worker.vllm", "PrefillWorker")
    assert worker.sections([], "vllm") == ("Worker", "Worker.vllm")


@pytest.mark.parametrize(
    ("world_size", "local_ranks", "nodes", "bind"),
    [
        (2, 1, 1, "0,1|2,3"),  # TP=2 on one NUMA node: half the CPUs each
        (2, 2, 1, "0|1|2|3"),  # two DP ranks of TP=2: rank 0's workers, then rank 1's
        (2, 1, 2, None),  # a NUMA node each: vLLM's own binding
        (1, 2, 1, None),  # no TP/PP: vLLM's own binding works
        (4, 2, 1, None),  # fewer CPUs than workers: vLLM says why it cannot start
    ],
)
def test_tp_workers_on_fewer_numa_nodes_split_the_cpus(monkeypatch, world_size, local_ranks, nodes, bind):
    monkeypatch.delenv(host.CPU_BIND_ENV, raising=False)
    monkeypatch.setattr(host.glob, "glob", lambda pattern: [f"/sys/devices/system/node/node{i}" for i in range(nodes)])
    monkeypatch.setattr(host.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    host._split_cpus(world_size, local_ranks)
    assert os.environ.get(host.CPU_BIND_ENV) == bind
