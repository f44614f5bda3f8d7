"""disagg end to end with real vLLM on CPU and NIXL: frontend, prefill queue, a decode and a prefill worker.

Greedy outputs of remotely prefilled requests must equal the locally prefilled ones, the decode worker must
pull the prompt's KV instead of computing it, and a prefill worker that stops answering must not lose a
request.
"""

from __future__ import annotations

import re
import signal
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from e2e import VLLM_TEST_ARGS, scratch_env
from helpers import wait_until

from zdyn.bench.procs import ProcessGroup, free_ports, wait_for_workers

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
        port, hub, jobs, prefill_hub, status, metrics = free_ports(6)
        self.metrics_url = f"http://127.0.0.1:{metrics}/metrics"
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
             "--status-endpoint", f"tcp://127.0.0.1:{status}", *LIVENESS],
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
        wait_until(lambda: "prefill prefill0 joined" in self.group.log("queue"), 300, "no prefill worker")
        self.client = openai.OpenAI(base_url=f"{self.base_url}/v1", api_key="none", max_retries=0)

    def prompt_tokens(self) -> dict[str, float]:
        """The decode worker's vLLM prompt-token counters by source (its Prometheus metrics)."""
        text = urllib.request.urlopen(self.metrics_url, timeout=5).read().decode()
        pattern = r'zdyn_engine_prompt_tokens_total\{source="(\w+)",worker="decode0"\} (\S+)'
        return {source: float(value) for source, value in re.findall(pattern, text)}

    def set_max_local(self, n: int) -> None:
        seen = self.group.log("decode0").count(f"max_local_prefill_length={n} ")
        self.settings.write_text(f"max-local-prefill-length: {n}\n")
        wait_until(lambda: self.group.log("decode0").count(f"max_local_prefill_length={n} ") > seen, 10, "not re-read")

    def complete(self, prompt: list[int], **kw) -> openai.types.Completion:
        return self.client.completions.create(model="tiny-llama", prompt=prompt, max_tokens=12, temperature=0, **kw)

    def decision(self, response_id: str) -> str:
        """The decode worker's log line about this request's prefill."""
        rid = response_id.split("-", 1)[-1]
        pattern = re.compile(rf"request {rid}: (remote prefill|local prefill|remote prefill failed)[^\n]*")
        wait_until(lambda: pattern.search(self.group.log("decode0")) is not None, 5, f"no decision for {rid}")
        found = pattern.search(self.group.log("decode0"))
        assert found is not None
        return found.group(0)


@pytest.fixture(scope="module")
def disagg(tiny_model, tmp_path_factory):
    dep = Disagg(tmp_path_factory.mktemp("disagg"), tiny_model)
    try:
        yield dep
    finally:
        dep.group.stop()


def test_long_prompts_go_remote_short_ones_stay_local_and_outputs_match(disagg):
    remote = disagg.complete(LONG)
    assert "remote prefill (" in disagg.decision(remote.id)
    assert re.search(r"prefill job \S+ on prefill0: done", disagg.group.log("queue"))
    short = disagg.complete(SHORT)
    assert "local prefill (" in disagg.decision(short.id)

    disagg.set_max_local(100_000)  # changed while running: everything stays local now
    local = disagg.complete(LONG)  # the decode worker has no prefix cache: it computes the whole prompt
    assert "local prefill (" in disagg.decision(local.id)
    assert local.choices[0].text == remote.choices[0].text
    assert local.usage.prompt_tokens_details.cached_tokens == 0
    disagg.set_max_local(MAX_LOCAL)


def test_the_decode_side_pulled_the_kv_instead_of_computing_it(disagg):
    before = disagg.prompt_tokens()
    prompt = [t + 3 for t in LONG]
    r = disagg.complete(prompt)
    assert "remote prefill (" in disagg.decision(r.id)
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
    disagg.group.kill("queue", signal.SIGSTOP)  # its last status is under a second old: the job still goes remote
    try:
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(disagg.complete, prompt)
            r = pending.result(timeout=60)
    finally:
        disagg.group.kill("queue", signal.SIGCONT)
    thawed = time.monotonic()
    decision = disagg.decision(r.id)  # given up, or (a slow start) never sent to the queue that fell silent
    assert ("remote prefill failed (" in decision and "no status" in decision) or "local prefill (" in decision
    disagg.set_max_local(100_000)
    assert disagg.complete(prompt).choices[0].text == r.choices[0].text
    disagg.set_max_local(MAX_LOCAL)
    time.sleep(max(0.0, thawed + KV_LEASE + 2 - time.monotonic()))
    assert "Releasing expired KV blocks" not in disagg.group.log("prefill0")


def test_a_stopped_prefill_worker_does_not_lose_the_request(disagg):
    disagg.group.kill("prefill0", signal.SIGSTOP)  # frozen mid-way: no heartbeats, no answers
    try:
        r = disagg.complete([t + 5 for t in LONG])
        assert r.choices[0].text and r.usage.completion_tokens == 12
        assert "remote prefill failed" in disagg.decision(r.id) or "remote prefill (" in disagg.decision(r.id)
    finally:
        disagg.group.kill("prefill0", signal.SIGKILL)
    disagg.group.procs["prefill0"].wait(10)
    disagg.group.start("prefill1", [*disagg.prefill_argv, "--worker-id", "prefill1"], disagg.env)
    wait_until(lambda: "prefill prefill1 joined" in disagg.group.log("queue"), 300, "no new prefill worker")
    r = disagg.complete([t + 6 for t in LONG])
    assert "remote prefill (" in disagg.decision(r.id)
