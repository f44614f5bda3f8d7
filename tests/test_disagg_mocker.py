"""disagg with simulated engines: the example scripts' roles as real processes, slow enough to act mid-job.

At speedup 0.1 a 1500-token prefill takes about 1.4 s, so a test can kill a prefill worker, or hang up on a
request, while its prefill is running or while it waits in the queue.
"""

from __future__ import annotations

import re
import signal
import threading

import httpx
import openai
import pytest
from helpers import wait_until

from zdyn.bench.procs import ProcessGroup, free_ports, wait_for_workers

MOCKER = ["--engine", "mocker", "--speedup", "0.1", "--block-size", "32", "--max-model-len", "2048"]
pytestmark = pytest.mark.slow  # real processes; tests/test_inprocess_topology.py is the quick loop's disagg

LONG = [(i * 37) % 800 + 20 for i in range(1500)]


@pytest.fixture
def disagg(tiny_model, tmp_path):
    group = ProcessGroup(tmp_path / "logs")
    port, hub, jobs, prefill_hub, status = free_ports(5)
    group.start("frontend", ["zdyn", "frontend", "--model", str(tiny_model), "--host", "127.0.0.1", "--port",
                             str(port), "--workers-endpoint", f"tcp://127.0.0.1:{hub}"])  # fmt: skip
    group.start("queue", ["zdyn", "prefill-queue", "--jobs-endpoint", f"tcp://127.0.0.1:{jobs}",
                          "--prefill-workers-endpoint", f"tcp://127.0.0.1:{prefill_hub}",
                          "--status-endpoint", f"tcp://127.0.0.1:{status}", "--max-jobs-per-worker", "1",
                          "--heartbeat-interval", "0.2"])  # fmt: skip
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
        base_url = f"http://127.0.0.1:{port}"
        wait_for_workers(base_url, 1, group, timeout_s=60)
        wait_until(lambda: group.log("queue").count("joined at") == 2, 60, "prefill workers did not join")
        yield group, base_url
    finally:
        group.stop()


def complete(base_url: str, prompt: list[int]) -> openai.types.Completion:
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="none", max_retries=0)
    return client.completions.create(model="tiny-llama", prompt=prompt, max_tokens=3, temperature=0)


def decision(group: ProcessGroup, response_id: str) -> str:
    rid = response_id.split("-", 1)[-1]
    pattern = re.compile(rf"request {rid}: (remote prefill|local prefill)[^\n]*")
    wait_until(lambda: pattern.search(group.log("decode0")) is not None, 5, f"no decision for {rid}")
    found = pattern.search(group.log("decode0"))
    assert found is not None
    return found.group(0)


def dispatched(group: ProcessGroup, n: int = 1) -> list[tuple[str, str]]:
    """(job, prefill worker) of the first ``n`` dispatches in the queue's log, waiting for them."""
    pattern = re.compile(r"prefill job (\S+) -> (\S+) \(attempt")
    wait_until(lambda: len(pattern.findall(group.log("queue"))) >= n, 20, f"fewer than {n} dispatches")
    return pattern.findall(group.log("queue"))


def test_remote_and_local_and_a_killed_prefill_worker(disagg):
    group, base_url = disagg
    short = complete(base_url, LONG[:100])
    assert "local prefill (100 new tokens <= max_local_prefill_length 256)" in decision(group, short.id)
    aggregated = complete(base_url, [t + 1 for t in LONG[:200]])  # local: the reference for the same seed

    result: dict[str, openai.types.Completion] = {}
    worker = threading.Thread(target=lambda: result.setdefault("r", complete(base_url, LONG)))
    worker.start()
    [(job, victim)] = dispatched(group)
    group.kill(victim, signal.SIGKILL)  # mid-prefill
    worker.join(30)
    r = result["r"]
    assert "remote prefill (" in decision(group, r.id) and r.usage.completion_tokens == 3
    log = group.log("queue")
    assert f"prefill job {job}: " in log and "queued again (attempt 2)" in log
    other = "prefill1" if victim == "prefill0" else "prefill0"
    assert re.search(rf"prefill job {job} on {other}: done", log)
    assert aggregated.choices[0].text  # and the remote one decoded normally
    assert r.usage.prompt_tokens == len(LONG)


def test_cancel_while_queued_and_while_prefilling_leaves_nothing_behind(disagg):
    group, base_url = disagg
    threads = []
    for k in range(2):  # occupy both prefill workers (one job each)
        t = threading.Thread(target=complete, args=(base_url, [t + 10 * k for t in LONG]), daemon=True)
        t.start()
        threads.append(t)
    dispatched(group, 2)

    def hang_up(prompt: list[int]) -> None:
        """Send a request and hang up after 0.5 s, before its first token (the prefill takes seconds)."""
        body = {"model": "tiny-llama", "prompt": prompt, "max_tokens": 3, "stream": True}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{base_url}/v1/completions", json=body, timeout=httpx.Timeout(30, read=0.5))

    hang_up([t + 7 for t in LONG])  # queued behind the two running jobs
    wait_until(lambda: "cancelled (queued)" in group.log("queue"), 10, "queued job not cancelled")
    for t in threads:
        t.join(30)
    hang_up([t + 9 for t in LONG])  # now a worker is free: cancelled while prefilling
    wait_until(lambda: "cancelled (running)" in group.log("queue"), 10, "running job not cancelled")
    assert group.log("frontend").count(" cancelled in ") == 2  # the processor's per-request log: both gone

    def idle() -> bool:  # nothing left on the decode worker (its heartbeat) or in the queue
        worker = httpx.get(f"{base_url}/health").json()["workers"][0]
        return worker["running"] == 0 and worker["waiting"] == 0 and worker["in_flight"] == 0

    wait_until(idle, 5, "a request was left behind on the decode worker")
    assert not re.search(r"prefill job \S+ on \S+: done", group.log("queue").split("cancelled (running)")[-1])


def test_n_choices_share_one_remote_prefill_and_the_frontend_counts_decisions(disagg):
    group, base_url = disagg
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="none", max_retries=0)
    answer = client.completions.create(model="tiny-llama", prompt=LONG, max_tokens=3, n=2, seed=1)
    assert len(answer.choices) == 2 and answer.usage.completion_tokens == 6

    def decisions() -> dict[str, float]:  # the decode worker's, as the frontend's /metrics has them
        text = httpx.get(f"{base_url}/metrics").text
        found = re.findall(r'zdyn_disagg_decisions_total\{decision="(\w+)",worker="decode0"\} (\S+)', text)
        return {decision: float(n) for decision, n in found}

    wait_until(lambda: decisions().get("shared") == 1, 10, "no shared prefill on the frontend's /metrics")
    assert decisions() == {"remote": 1, "shared": 1}  # one remote prefill for both choices
    assert len(dispatched(group)) == 1
