"""agg_route end to end: frontend, a separate KV router and two real vLLM workers on loopback.

The router learns what each worker caches only from vLLM's own KV-event publisher; vLLM's
``num_cached_tokens`` (``usage.prompt_tokens_details.cached_tokens``) shows whether a request landed where
its prefix was cached.
"""

from __future__ import annotations

import signal
import time

import openai
import pytest
from e2e import VLLM_TEST_ARGS, scratch_env
from helpers import wait_until

from zdyn.bench.procs import ProcessGroup, free_port, scrape, wait_for_workers

pytestmark = pytest.mark.slow

BLOCK = 32  # VLLM_TEST_ARGS' --block-size
PREFIX_BLOCKS = 10


class Route:
    def __init__(self, tmp, model) -> None:
        self.group = ProcessGroup(tmp / "logs")
        self.env = scratch_env(tmp)
        self.port, hub, self.router_port, router_hub, self.metrics_port = (free_port() for _ in range(5))
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.metrics_url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        self.router_argv = [
            "zdyn", "router", "--endpoint", f"tcp://127.0.0.1:{self.router_port}",
            "--workers-endpoint", f"tcp://127.0.0.1:{router_hub}", "--metrics-port", str(self.metrics_port),
        ]  # fmt: skip
        self.group.start("router", self.router_argv, self.env)
        self.group.start(
            "frontend",
            ["zdyn", "frontend", "--model", str(model), "--host", "127.0.0.1", "--port", str(self.port),
             "--workers-endpoint", f"tcp://127.0.0.1:{hub}",
             "--router-endpoint", f"tcp://127.0.0.1:{self.router_port}", "--router-timeout", "0.5"],
            self.env,
        )  # fmt: skip
        self.worker_metrics = {}
        for i in range(2):
            connect = f"tcp://127.0.0.1:{hub},tcp://127.0.0.1:{router_hub}"
            port = free_port()
            self.worker_metrics[f"worker{i}"] = f"http://127.0.0.1:{port}/metrics"
            argv = ["zdyn", "worker", "--model", str(model), "--connect", connect, "--worker-id", f"worker{i}",
                    "--metrics-port", str(port)]  # fmt: skip
            self.group.start(f"worker{i}", argv + VLLM_TEST_ARGS, self.env)
        wait_for_workers(self.base_url, 2, self.group, timeout_s=240)
        self.wait_router_workers(2)
        self.client = openai.OpenAI(base_url=f"{self.base_url}/v1", api_key="none", max_retries=0)

    def wait_router_workers(self, n: int) -> None:
        wait_until(lambda: self.router_metric("zdyn_router_workers") == n, 30, f"router never saw {n} workers")

    def router_metric(self, name: str) -> float:
        """The sum of the router's samples named ``name...`` (-1 while it does not answer)."""
        samples = scrape(self.metrics_url)
        return sum(v for k, v in samples.items() if k.startswith(name)) if samples else -1.0

    def complete(self, prompt: list[int]) -> openai.types.Completion:
        return self.client.completions.create(model="tiny-llama", prompt=prompt, max_tokens=4, temperature=0)

    def frontend_metric(self, name: str) -> float:
        return scrape(f"{self.base_url}/metrics")[name]

    def served(self) -> dict[str, float]:
        """Requests each worker has finished (its own counter)."""
        name = 'zdyn_worker_requests_total{outcome="finished",worker="%s"}'
        return {w: scrape(url).get(name % w, 0.0) for w, url in self.worker_metrics.items()}

    def complete_on(self, prompt: list[int]) -> tuple[openai.types.Completion, str]:
        """A completion, and the worker that served it (requests here run one at a time)."""
        before = self.served()
        r = self.complete(prompt)
        [worker] = [w for w, n in self.served().items() if n > before[w]]
        return r, worker

    def restart_router(self) -> None:
        self.group.kill("router", signal.SIGKILL)
        self.group.procs["router"].wait(10)
        self.group.start("router", self.router_argv, self.env)


@pytest.fixture(scope="module")
def route(tiny_model, tmp_path_factory):
    dep = Route(tmp_path_factory.mktemp("agg_route"), tiny_model)
    try:
        yield dep
    finally:
        dep.group.stop()


def prefix(seed: int) -> list[int]:
    return [(seed * 7919 + i * 31) % 900 + 20 for i in range(PREFIX_BLOCKS * BLOCK)]


def test_shared_prefixes_go_where_they_are_cached(route):
    firsts = {}
    for seed in range(4):
        firsts[seed] = route.complete_on(prefix(seed) + [5, 6, 7])[1]
    # vLLM's own publisher told the router about the blocks (not only the router's optimistic guess)
    wait_until(lambda: route.router_metric("zdyn_router_indexed_blocks") >= 4 * PREFIX_BLOCKS, 10, "no KV events")
    for seed in range(4):
        r, worker = route.complete_on(prefix(seed) + [8, 9, 10, 11])
        assert worker == firsts[seed]
        assert r.usage.prompt_tokens_details.cached_tokens >= (PREFIX_BLOCKS - 1) * BLOCK
    assert route.router_metric('zdyn_router_index_events_total{kind="unknown_parent"}') <= 0


def test_router_down_means_round_robin_and_a_restarted_router_catches_up(route):
    route.group.kill("router", signal.SIGKILL)
    route.group.procs["router"].wait(10)
    fallbacks = route.frontend_metric("zdyn_router_client_fallbacks_total")
    workers = {route.complete_on(prefix(100 + i))[1] for i in range(4)}
    assert workers == {"worker0", "worker1"}  # served, round-robin, while the router is away
    assert route.frontend_metric("zdyn_router_client_fallbacks_total") == fallbacks + 4

    route.group.start("router", route.router_argv, route.env)
    route.wait_router_workers(2)
    # the new router replays each worker's buffered KV events, so it knows the earlier prefixes at once
    wait_until(lambda: route.router_metric("zdyn_router_indexed_blocks") >= 8 * PREFIX_BLOCKS, 20, "no replay")
    # the processor asks the router again once its back-off after the timeouts ends: until the new router has
    # answered in time, requests are still routed round-robin (fresh prefixes here, so nothing below changes).
    # (The router's own decision count is no sign: queries that timed out while it was down reach it late.)
    for k in range(40):
        fallbacks = route.frontend_metric("zdyn_router_client_fallbacks_total")
        route.complete(prefix(200 + k))
        if route.frontend_metric("zdyn_router_client_fallbacks_total") == fallbacks:  # the router routed it
            break
        time.sleep(0.5)
    answered = route.router_metric("zdyn_router_decisions_total")
    for seed in (0, 1, 100, 101):
        assert route.complete(prefix(seed) + [12, 13]).usage.completion_tokens == 4
    # the restarted router decides again (whether each lands on its cached copy depends on how much of
    # the workers' history their replay buffers still hold, which a long test session can exceed)
    assert route.router_metric("zdyn_router_decisions_total") > answered
