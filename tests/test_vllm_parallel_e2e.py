"""vLLM's own parallelism behind zdyn: data-parallel ranks as workers (also headless ones), tensor parallelism.

The tiny Llama with ``--data-parallel-size 2`` behind agg_route's frontend (processor in process) and KV router,
rank 1 in a ``zdyn worker --headless`` process that joins the front's DP coordinator, as a second node would (here
on 127.0.0.1). (Both ranks in the one ``zdyn worker``, ``headless=False``, runs the same front code; it passed
this same check with a deployment of its own up to commit d721ef9, dropped to save the suite 70 s.) Each rank
registers as ``w-dp<r>``, its KV events reach the router (rank 0's through vLLM's private ipc, the headless rank's
through vLLM's tcp publisher, both relayed by the front worker), and a repeated prefix goes to the rank that has it.
``--tensor-parallel-size 2``: two CPU workers of one engine (zdyn splits the box's one NUMA node between them).
Pipeline parallelism does not run on vLLM's CPU build (docs/multinode.md says how it fails).
"""

from __future__ import annotations

import signal
import time

import openai
import pytest
from e2e import VLLM_TEST_ARGS, deployment, scratch_env
from helpers import wait_until

from zdyn.bench.deploy import EXAMPLES
from zdyn.bench.procs import ProcessGroup, free_port, get_json, scrape, wait_for_workers
from zdyn.roles import worker
from zdyn.roles.common import parse_args
from zdyn.roles.worker_dp import data_parallel_ranks

pytestmark = pytest.mark.slow

BLOCK = 32  # VLLM_TEST_ARGS' --block-size
PREFIX_BLOCKS = 6
RANKS = ("w-dp0", "w-dp1")
EXAMPLE = EXAMPLES / "multinode" / "dp2-cpu.yaml"
IMPORTS_VLLM = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


class DataParallel:
    """Router, frontend, and one vLLM engine with two DP ranks (``headless``: rank 1 in a process of its own)."""

    def __init__(self, tmp, model, headless: bool) -> None:
        self.group = ProcessGroup(tmp / "logs")
        env = scratch_env(tmp)
        port, hub, router_port, router_hub, self.metrics_port, rpc_port = (free_port() for _ in range(6))
        self.base_url = f"http://127.0.0.1:{port}"
        self.group.start(
            "router",
            ["zdyn", "router", "--endpoint", f"tcp://127.0.0.1:{router_port}",
             "--workers-endpoint", f"tcp://127.0.0.1:{router_hub}", "--metrics-port", str(self.metrics_port)],
            env,
        )  # fmt: skip
        self.group.start(
            "frontend",
            ["zdyn", "frontend", "--model", str(model), "--host", "127.0.0.1", "--port", str(port),
             "--workers-endpoint", f"tcp://127.0.0.1:{hub}",
             "--router-endpoint", f"tcp://127.0.0.1:{router_port}", "--router-timeout", "1"],
            env,
        )  # fmt: skip
        # the example's settings (VLLM_TEST_ARGS' and DP=2, rank 1 on another node), on this test's ports
        node = ["zdyn", "worker", "-f", str(EXAMPLE), "--model", str(model),
                  "--data-parallel-rpc-port", str(rpc_port)]  # fmt: skip
        if headless:
            self.group.start("headless", [*node, "--headless"], {**env, "VLLM_HOST_IP": "127.0.0.1"})
        connect = f"tcp://127.0.0.1:{hub},tcp://127.0.0.1:{router_hub}"
        local = [] if headless else ["--data-parallel-size-local", "2"]  # both ranks in this process
        self.group.start("worker", [*node, "--connect", connect, *local, "--enable-log-requests"], env)
        wait_for_workers(self.base_url, 2, self.group, timeout_s=300)
        wait_until(lambda: self.router("zdyn_router_workers") == 2, 30, "the router never saw both ranks")
        self.client = openai.OpenAI(base_url=f"{self.base_url}/v1", api_key="none", max_retries=0)

    def router(self, name: str) -> float:
        return scrape(f"http://127.0.0.1:{self.metrics_port}/metrics").get(name, -1.0)

    def blocks(self, worker: str) -> float:
        return self.router(f'zdyn_router_indexed_blocks{{worker="{worker}"}}')

    def complete(self, prompt: list[int]) -> openai.types.Completion:
        return self.client.completions.create(model="tiny-llama", prompt=prompt, max_tokens=4, temperature=0)


def prefix(seed: int) -> list[int]:
    return [(seed * 7919 + i * 31) % 900 + 20 for i in range(PREFIX_BLOCKS * BLOCK)]


def check_ranks_serve_and_route(dep: DataParallel) -> None:
    """Every rank is a worker the frontend lists; fresh prefixes spread until both ranks hold some (the router
    breaks ties at random); each repeated prefix is then a cache hit: it went to the one rank that cached it."""
    _, health = get_json(f"{dep.base_url}/health")
    assert sorted(w["id"] for w in health["workers"]) == list(RANKS)
    seeds: list[int] = []
    for seed in range(24):
        assert dep.complete(prefix(seed) + [5, 6, 7]).usage.completion_tokens == 4
        seeds.append(seed)
        wait_until(lambda: sum(dep.blocks(w) for w in RANKS) >= len(seeds) * PREFIX_BLOCKS, 20, "no KV events")
        if len(seeds) >= 4 and all(dep.blocks(w) >= PREFIX_BLOCKS for w in RANKS):
            break
    assert all(dep.blocks(w) >= PREFIX_BLOCKS for w in RANKS), {w: dep.blocks(w) for w in RANKS}
    decisions = dep.router('zdyn_router_decisions_total{outcome="routed"}')
    for seed in seeds:
        usage = dep.complete(prefix(seed) + [8, 9, 10, 11]).usage
        assert usage.prompt_tokens_details.cached_tokens >= (PREFIX_BLOCKS - 1) * BLOCK, seed
    assert dep.router('zdyn_router_decisions_total{outcome="routed"}') >= decisions + len(seeds)
    assert dep.router('zdyn_router_index_events_total{kind="unknown_parent"}') <= 0


def test_each_rank_is_a_worker_the_router_routes_to_and_a_headless_rank_stops_on_sigterm(tiny_model, tmp_path):
    dep = DataParallel(tmp_path, tiny_model, headless=True)
    try:
        check_ranks_serve_and_route(dep)
        worker = dep.group.procs["worker"]
        dep.group.kill("worker", signal.SIGTERM)  # the front drains and exits; then the headless rank, on SIGTERM
        assert worker.wait(60) == 0
        headless = dep.group.procs["headless"]
        started = time.monotonic()
        dep.group.kill("headless", signal.SIGTERM)
        assert headless.wait(60) == 0, dep.group.log("headless")[-3000:]
        assert time.monotonic() - started < 60
    finally:
        dep.group.stop(30)


def test_tensor_parallel_across_two_nodes(tiny_model, tmp_path):
    """TP=2 over two "nodes" with vLLM's multiprocessing executor: node 1 is ``zdyn worker --headless --node-rank 1``
    (its TP worker joins node 0's torch.distributed group at --master-addr/--master-port); one worker registers."""
    nodes = [*VLLM_TEST_ARGS, "--tensor-parallel-size", "2", "--nnodes", "2", "--master-addr", "127.0.0.1"]
    nodes += ["--master-port", str(free_port())]
    node1 = ProcessGroup(tmp_path / "node1")
    try:
        argv = ["zdyn", "worker", "--headless", "--model", str(tiny_model), *nodes, "--node-rank", "1"]
        headless = node1.start("node1", argv, scratch_env(tmp_path))
        with deployment(tmp_path, tiny_model, worker_args=[*nodes, "--node-rank", "0"]) as dep:
            client = dep.client()
            kw = dict(model=dep.model, prompt=prefix(1), max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
            first, again = client.completions.create(**kw), client.completions.create(**kw)
            assert first.usage.completion_tokens == 8 and first.choices[0].text == again.choices[0].text
            assert again.usage.prompt_tokens_details.cached_tokens >= (PREFIX_BLOCKS - 1) * BLOCK
            _, health = get_json(f"{dep.base_url}/health")
            assert len(health["workers"]) == 1  # one engine over both nodes: one worker
            assert headless.poll() is None  # node 1's TP worker serves with node 0's
        node1.kill("node1", signal.SIGTERM)
        assert headless.wait(60) == 0, node1.log("node1")[-3000:]
    finally:
        node1.stop(30)


@IMPORTS_VLLM
@pytest.mark.parametrize(
    ("name", "headless", "ids", "engine_flags"),
    [
        ("llama-70b-tp8.yaml", False, None, {"tensor_parallel_size": 8}),
        ("deepseek-r1-dp16-ep.yaml", False, [f"r1-dp{r}" for r in range(16)], {"enable_expert_parallel": True}),
        ("deepseek-r1-dp16-ep.yaml", True, [], {"data_parallel_start_rank": 8, "data_parallel_size_local": 8}),
        ("deepseek-r1-tp8-pp2.yaml", False, ["r1-tp8pp2"], {"pipeline_parallel_size": 2}),
        ("deepseek-r1-tp8-pp2.yaml", True, [], {"tensor_parallel_size": 8, "master_addr": "10.0.0.10"}),
    ],
)
def test_gpu_example_configs_are_what_vllm_and_zdyn_read(name, headless, ids, engine_flags):
    """The GPU-only configs cannot run here; their keys are vLLM's and zdyn's flags, and they register as said."""
    argv = ["-f", str(EXAMPLES / "multinode" / name), *(["--headless"] if headless else [])]
    args = parse_args(worker.build_parser("vllm"), argv, *worker.sections(argv, "vllm"))
    config = worker.WorkerConfig.from_args(args)
    assert config.headless == headless
    if ids is not None:
        assert (config.worker_ids() if not headless else data_parallel_ranks(config)) == ids
    for flag, value in engine_flags.items():
        assert getattr(config.engine_flags, flag) == value


@IMPORTS_VLLM
def test_ipc_kv_event_endpoints_get_a_name_per_rank(monkeypatch):
    """vLLM offsets a rank's publisher endpoint for tcp and inproc, and refuses ipc (a zdyn worker's private
    endpoint): zdyn's plugin names rank r's ``<endpoint>-dp<r>`` and leaves the rest to vLLM."""
    from vllm.distributed.kv_events import ZmqEventPublisher

    from zdyn.engines.vllm.plugin import _kv_events_per_rank_on_ipc

    with pytest.raises(ValueError, match="Invalid endpoint"):
        ZmqEventPublisher.offset_endpoint_port("ipc:///tmp/kv/events-0", 1)
    original = ZmqEventPublisher.__dict__["offset_endpoint_port"]
    monkeypatch.setattr(ZmqEventPublisher, "offset_endpoint_port", original)  # put back after the test
    _kv_events_per_rank_on_ipc()
    offset = ZmqEventPublisher.offset_endpoint_port
    assert offset("ipc:///tmp/kv/events-0", 1) == "ipc:///tmp/kv/events-0-dp1"
    assert offset("ipc:///tmp/kv/events-0", 0) == "ipc:///tmp/kv/events-0"
    assert offset("tcp://*:5557", 2) == "tcp://*:5559" and offset("tcp://*:0", 2) == "tcp://*:0"
