"""disagg end to end with real vLLM on CPU and NIXL: frontend, prefill queue, a decode and a prefill worker.

Greedy outputs of remotely prefilled requests must equal the locally prefilled ones, the decode worker must
pull the prompt's KV instead of computing it, and a prefill worker that stops answering must not lose a
request.
"""

from __future__ import annotations

import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from e2e import VLLM_TEST_ARGS, scratch_env
from helpers import wait_until

from zdyn.bench.procs import ProcessGroup, free_ports, scrape, wait_for_workers

pytestmark = pytest.mark.slow
# Two vLLM engines and NIXL on 2 cores can starve a process for seconds: give liveness room (2 s x 3).
LIVENESS = ["--heartbeat-interval", "2"]
KV_LEASE = 6  # the prefill workers' KV lease (s), vLLM's shortest sensible one: a decode worker reads within 3 s

MAX_LOCAL = 64
BLOCK = 32
LONG = [(i * 37) % 800 + 20 for i in range(600)]  # well past MAX_LOCAL
SHORT = LONG[:40]


class Disagg:
    def __init__(self, tmp, model) -> None:
        self.group = ProcessGroup(tmp / "logs")
        env = scratch_env(tmp)
        port, hub, jobs, prefill_hub, status, metrics, queue_metrics = free_ports(7)
        self.metrics_url = f"http://127.0.0.1:{metrics}/metrics"
        self.queue_metrics_url = f"http://127.0.0.1:{queue_metrics}/metrics"
        self.base_url = f"http://127.0.0.1:{port}"
        self.settings = tmp / "disagg.yaml"
        self.settings.write_text(f"max-local-prefill-length: {MAX_LOCAL}\n")
        self.group.start("frontend", ["zdyn", "frontend", "--model", str(model), "--host", "127.0.0.1", "--port",
                                      str(port), "--workers-endpoint", f"tcp://127.0.0.1:{hub}", *LIVENESS],
                         env)  # fmt: skip
        self.group.start(
            "queue",
            ["zdyn", "prefill-queue", "--jobs-endpoint", f"tcp://127.0.0.1:{jobs}",
             "--prefill-workers-endpoint", f"tcp://127.0.0.1:{prefill_hub}",
             "--status-endpoint", f"tcp://127.0.0.1:{status}", "--metrics-port", str(queue_metrics), *LIVENESS],
            env,
        )  # fmt: skip
        self.prefill_argv = ["zdyn", "worker", "--prefill", "--model", str(model), "--connect",
                             f"tcp://127.0.0.1:{prefill_hub}", "--kv-lease", str(KV_LEASE), *LIVENESS,
                             *VLLM_TEST_ARGS]  # fmt: skip
        self.env = env
        self.group.start("prefill0", [*self.prefill_argv, "--worker-id", "prefill0"], env)
        self.group.start(
            "decode0",
            ["zdyn", "worker", "--model", str(model), "--connect", f"tcp://127.0.0.1:{hub}", "--worker-id", "decode0",
             "--prefill-queue", f"tcp://127.0.0.1:{jobs}",
             "--prefill-queue-status", f"tcp://127.0.0.1:{status}", "--disagg-settings", str(self.settings),
             "--remote-prefill-timeout", "10", "--no-enable-prefix-caching", "--metrics-port", str(metrics),
             *LIVENESS, *VLLM_TEST_ARGS],
            env,
        )  # fmt: skip
        wait_for_workers(self.base_url, 1, self.group, timeout_s=300)
        self.wait_for_prefill_workers(1)
        self.client = openai.OpenAI(base_url=f"{self.base_url}/v1", api_key="none", max_retries=0)

    def wait_for_prefill_workers(self, n: int) -> None:
        wait_until(lambda: scrape(self.queue_metrics_url).get("zdyn_prefill_queue_workers", 0) >= n, 300,
                   f"fewer than {n} prefill worker(s) at the queue")  # fmt: skip

    def decode_metrics(self, prefix: str) -> dict[str, float]:
        """The decode worker's samples named ``prefix...``, by their labels (its Prometheus metrics)."""
        return {k[len(prefix) :]: v for k, v in scrape(self.metrics_url).items() if k.startswith(prefix)}

    def prompt_tokens(self) -> dict[str, float]:
        """vLLM's prompt-token counters of the decode worker, by source."""
        samples = self.decode_metrics("zdyn_engine_prompt_tokens_total")
        return {re.search(r'source="(\w+)"', k).group(1): v for k, v in samples.items()}  # type: ignore[union-attr]

    def set_max_local(self, n: int) -> None:
        self.settings.write_text(f"max-local-prefill-length: {n}\n")
        wait_until(lambda: self.decode_metrics("zdyn_disagg_max_local_prefill_length") == {'{worker="decode0"}': n},
                   10, "the settings file was not re-read")  # fmt: skip

    def complete(self, prompt: list[int], **kw) -> tuple[openai.types.Completion, str]:
        """A greedy completion, and the decode worker's prefill decision for it (remote, local, fallback)."""
        before = self.decode_metrics("zdyn_disagg_decisions_total")
        r = self.client.completions.create(model="tiny-llama", prompt=prompt, max_tokens=12, temperature=0, **kw)
        grown = [k for k, v in self.decode_metrics("zdyn_disagg_decisions_total").items() if v > before.get(k, 0)]
        assert len(grown) == 1, grown  # one request, one decision (requests here run one at a time)
        return r, re.search(r'decision="(\w+)"', grown[0]).group(1)  # type: ignore[union-attr]


@pytest.fixture(scope="module")
def disagg(tiny_model, tmp_path_factory):
    dep = Disagg(tmp_path_factory.mktemp("disagg"), tiny_model)
    try:
        yield dep
    finally:
        dep.group.stop()


def test_long_prompts_go_remote_short_ones_stay_local_and_outputs_match(disagg):
    remote, decision = disagg.complete(LONG)
    assert decision == "remote"
    assert scrape(disagg.queue_metrics_url)['zdyn_prefill_queue_jobs_total{outcome="done"}'] >= 1
    assert disagg.complete(SHORT)[1] == "local"

    disagg.set_max_local(100_000)  # changed while running: everything stays local now
    local, decision = disagg.complete(LONG)  # the decode worker has no prefix cache: it computes the whole prompt
    assert decision == "local"
    assert local.choices[0].text == remote.choices[0].text
    assert local.usage.prompt_tokens_details.cached_tokens == 0
    disagg.set_max_local(MAX_LOCAL)


def test_the_decode_side_pulled_the_kv_instead_of_computing_it(disagg):
    before = disagg.prompt_tokens()
    prompt = [t + 3 for t in LONG]
    assert disagg.complete(prompt)[1] == "remote"
    after = disagg.prompt_tokens()
    pulled = after["external_kv_transfer"] - before["external_kv_transfer"]
    computed = after["computed"] - before["computed"]
    assert pulled >= len(prompt) - BLOCK and computed <= BLOCK, (pulled, computed)  # vLLM's own accounting


def test_a_frozen_queue_is_given_up_within_a_second_and_its_late_kv_released(disagg):
    """The prefill queue freezes while a job is on its way (SIGSTOP). The decode worker hears no status for 1 s,
    gives the job up and prefills locally (the same output), long before the remote-prefill timeout. Whatever
    the thawed queue then does with the job (cancelled, or a result nobody waits for) the prefill worker's KV is
    freed at once, not held to the end of its lease. (A result older than half the lease is refused in
    test_disagg_service.)"""
    prompt = [(i * 53) % 800 + 20 for i in range(1000)]
    given_up = 'zdyn_disagg_results_total{kind="gave_up_no_status",worker="decode0"}'
    before = scrape(disagg.metrics_url).get(given_up, 0)
    disagg.group.kill("queue", signal.SIGSTOP)  # its last status is under a second old: the job still goes remote
    try:
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(disagg.complete, prompt)
            r, decision = pending.result(timeout=60)
    finally:
        disagg.group.kill("queue", signal.SIGCONT)
    thawed = time.monotonic()
    # given up for want of status, or (a slow start) never sent to the queue that fell silent
    assert (decision == "fallback" and scrape(disagg.metrics_url)[given_up] == before + 1) or decision == "local"
    disagg.set_max_local(100_000)
    assert disagg.complete(prompt)[0].choices[0].text == r.choices[0].text
    disagg.set_max_local(MAX_LOCAL)
    time.sleep(max(0.0, thawed + KV_LEASE + 2 - time.monotonic()))
    assert "Releasing expired KV blocks" not in disagg.group.log("prefill0")


def test_a_stopped_prefill_worker_does_not_lose_the_request(disagg):
    disagg.group.kill("prefill0", signal.SIGSTOP)  # frozen mid-way: no heartbeats, no answers
    try:
        r, decision = disagg.complete([t + 5 for t in LONG])
        assert r.choices[0].text and r.usage.completion_tokens == 12
        assert decision in ("fallback", "remote")
    finally:
        disagg.group.kill("prefill0", signal.SIGKILL)
    disagg.group.procs["prefill0"].wait(10)
    disagg.group.start("prefill1", [*disagg.prefill_argv, "--worker-id", "prefill1"], disagg.env)
    wait_until(lambda: scrape(disagg.queue_metrics_url).get("zdyn_prefill_queue_workers") == 0, 30,
               "the killed prefill0 is still registered")  # fmt: skip
    disagg.wait_for_prefill_workers(1)  # prefill1
    assert disagg.complete([t + 6 for t in LONG])[1] == "remote"
