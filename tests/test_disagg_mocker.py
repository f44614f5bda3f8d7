"""disagg with simulated engines: the example scripts' roles as real processes, slow enough to act mid-job.

At speedup 0.1 a 1500-token prefill takes about 1.4 s, so a test can kill a prefill worker, or hang up on a
request, while its prefill is running or while it waits in the queue. What happened is read from the roles'
counters: the queue's ``--metrics-port`` and the frontend's ``/metrics`` (the decode worker's decisions).
"""

from __future__ import annotations

import re
import signal
import threading

import httpx
import openai
import pytest
from helpers import wait_until

from zdyn.bench.procs import ProcessGroup, free_ports, scrape, wait_for_workers

MOCKER = ["--engine", "mocker", "--speedup", "0.1", "--block-size", "32", "--max-model-len", "2048"]
pytestmark = pytest.mark.slow  # real processes; tests/test_inprocess_topology.py is the quick loop's disagg

LONG = [(i * 37) % 800 + 20 for i in range(1500)]


class Disagg:
    """The running roles and their counters."""

    def __init__(self, group: ProcessGroup, base_url: str, queue_metrics: str) -> None:
        self.group, self.base_url, self.queue_metrics = group, base_url, queue_metrics

    def queue(self, name: str, **labels: str) -> float:
        """A counter or gauge of the prefill queue (``zdyn_prefill_queue_<name>``), 0 if never set."""
        label = ",".join(f'{k}="{v}"' for k, v in labels.items())
        return scrape(self.queue_metrics).get(f"zdyn_prefill_queue_{name}" + (f"{{{label}}}" if label else ""), 0.0)

    def jobs(self, outcome: str) -> float:
        return self.queue("jobs_total", outcome=outcome)

    def frontend(self) -> dict[str, float]:
        return scrape(f"{self.base_url}/metrics")

    def decisions(self) -> dict[str, float]:
        """The decode worker's prefill decisions, as the frontend's /metrics has them."""
        prefix = 'zdyn_disagg_decisions_total{decision="'
        found = {k.removeprefix(prefix): v for k, v in self.frontend().items() if k.startswith(prefix)}
        return {k.split('"')[0]: v for k, v in found.items() if 'worker="decode0"' in k}

    def decided(self, before: dict[str, float], decision: str) -> None:
        """Wait until the decode worker has made one more ``decision`` than in ``before``."""
        wait_until(lambda: self.decisions().get(decision, 0) == before.get(decision, 0) + 1, 10, f"no {decision}")


@pytest.fixture
def disagg(tiny_model, tmp_path):
    group = ProcessGroup(tmp_path / "logs")
    port, hub, jobs, prefill_hub, status, queue_metrics = free_ports(6)
    group.start("frontend", ["zdyn", "frontend", "--model", str(tiny_model), "--host", "127.0.0.1", "--port",
                             str(port), "--workers-endpoint", f"tcp://127.0.0.1:{hub}"])  # fmt: skip
    group.start("queue", ["zdyn", "prefill-queue", "--jobs-endpoint", f"tcp://127.0.0.1:{jobs}",
                          "--prefill-workers-endpoint", f"tcp://127.0.0.1:{prefill_hub}",
                          "--status-endpoint", f"tcp://127.0.0.1:{status}", "--max-jobs-per-worker", "1",
                          "--heartbeat-interval", "0.2", "--metrics-port", str(queue_metrics)])  # fmt: skip
    for i in range(2):
        group.start(f"prefill{i}", ["zdyn", "worker", "--prefill", "--model", str(tiny_model), "--connect",
                                    f"tcp://127.0.0.1:{prefill_hub}", "--worker-id", f"prefill{i}",
                                    "--heartbeat-interval", "0.2", *MOCKER])  # fmt: skip
    group.start("decode0", ["zdyn", "worker", "--model", str(tiny_model), "--connect", f"tcp://127.0.0.1:{hub}",
                            "--worker-id", "decode0", "--prefill-queue", f"tcp://127.0.0.1:{jobs}",
             "--prefill-queue-status", f"tcp://127.0.0.1:{status}",
                            "--max-local-prefill-length", "256", "--remote-prefill-timeout", "20",
                            *MOCKER])  # fmt: skip
    try:
        d = Disagg(group, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{queue_metrics}/metrics")
        wait_for_workers(d.base_url, 1, group, timeout_s=60)
        wait_until(lambda: d.queue("workers") == 2, 60, "prefill workers did not join")
        yield d
    finally:
        group.stop()


def complete(base_url: str, prompt: list[int]) -> openai.types.Completion:
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="none", max_retries=0)
    return client.completions.create(model="tiny-llama", prompt=prompt, max_tokens=3, temperature=0)


def dispatched(group: ProcessGroup, n: int = 1) -> list[tuple[str, str]]:
    """(job, prefill worker) of the first ``n`` dispatches, waiting for them. Which worker got a job is said only
    in the queue's log (the counters do not name workers): read there to know which one to kill."""
    pattern = re.compile(r"prefill job (\S+) -> (\S+) \(attempt")
    wait_until(lambda: len(pattern.findall(group.log("queue"))) >= n, 20, f"fewer than {n} dispatches")
    return pattern.findall(group.log("queue"))


def test_remote_and_local_and_a_killed_prefill_worker(disagg):
    base_url = disagg.base_url
    before = disagg.decisions()
    complete(base_url, LONG[:100])
    disagg.decided(before, "local")  # 100 new tokens <= max_local_prefill_length 256
    aggregated = complete(base_url, [t + 1 for t in LONG[:200]])  # local: the reference for the same seed

    result: dict[str, openai.types.Completion] = {}
    worker = threading.Thread(target=lambda: result.setdefault("r", complete(base_url, LONG)))
    worker.start()
    [(_, victim)] = dispatched(disagg.group)
    disagg.group.kill(victim, signal.SIGKILL)  # mid-prefill
    worker.join(30)
    r = result["r"]
    assert r.usage.completion_tokens == 3 and r.usage.prompt_tokens == len(LONG)
    wait_until(lambda: disagg.decisions() == {"local": 2, "remote": 1}, 10, "decisions not counted")
    # The job went back into the queue when its worker died, and the other worker finished it.
    assert (disagg.jobs("submitted"), disagg.jobs("redelivered"), disagg.jobs("done"), disagg.jobs("failed")) == (
        1, 1, 1, 0)  # fmt: skip
    assert disagg.queue("workers") == 1
    assert aggregated.choices[0].text  # and the remote one decoded normally


def test_cancel_while_queued_and_while_prefilling_leaves_nothing_behind(disagg):
    base_url = disagg.base_url
    threads = []
    for k in range(2):  # occupy both prefill workers (one job each)
        t = threading.Thread(target=complete, args=(base_url, [t + 10 * k for t in LONG]), daemon=True)
        t.start()
        threads.append(t)
    wait_until(lambda: disagg.queue("running") == 2, 20, "two jobs not running")

    def hang_up(prompt: list[int]) -> None:
        """Send a request and hang up after 0.5 s, before its first token (the prefill takes seconds)."""
        body = {"model": "tiny-llama", "prompt": prompt, "max_tokens": 3, "stream": True}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{base_url}/v1/completions", json=body, timeout=httpx.Timeout(30, read=0.5))

    hang_up([t + 7 for t in LONG])  # queued behind the two running jobs
    wait_until(lambda: disagg.jobs("cancelled") == 1, 10, "queued job not cancelled")
    assert (disagg.queue("queued"), disagg.queue("running"), disagg.jobs("done")) == (0, 2, 0)  # while queued
    for t in threads:
        t.join(30)
    assert disagg.jobs("done") == 2
    hang_up([t + 9 for t in LONG])  # now a worker is free: cancelled while prefilling
    wait_until(lambda: disagg.jobs("cancelled") == 2, 10, "running job not cancelled")
    cancelled = 'zdyn_requests_total{endpoint="completions",status="cancelled"}'
    wait_until(lambda: disagg.frontend().get(cancelled) == 2, 5, "the frontend did not count both hang-ups")

    def idle() -> bool:  # nothing left on the decode worker (its heartbeat) or in the queue
        worker = httpx.get(f"{base_url}/health").json()["workers"][0]
        busy = worker["running"] or worker["waiting"] or worker["in_flight"]
        return not busy and disagg.queue("queued") == 0 and disagg.queue("running") == 0

    wait_until(idle, 5, "a request was left behind on the decode worker or in the queue")
    assert (disagg.jobs("submitted"), disagg.jobs("done"), disagg.jobs("failed")) == (4, 2, 0)  # none ran on


def test_n_choices_share_one_remote_prefill_and_the_frontend_counts_decisions(disagg):
    base_url = disagg.base_url
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="none", max_retries=0)
    answer = client.completions.create(model="tiny-llama", prompt=LONG, max_tokens=3, n=2, seed=1)
    assert len(answer.choices) == 2 and answer.usage.completion_tokens == 6

    wait_until(lambda: disagg.decisions().get("shared") == 1, 10, "no shared prefill on the frontend's /metrics")
    assert disagg.decisions() == {"remote": 1, "shared": 1}  # one remote prefill for both choices
    assert (disagg.jobs("submitted"), disagg.jobs("done")) == (1, 1)
