"""disagg_route across three hosts: Linux network namespaces on a bridge, made by the test (as root) and removed.

h0 runs the frontend, the KV router and the prefill queue on their default ports; h1 two decode workers that
know only the frontend (they discover the router); h2 a prefill worker. Requests succeed, the router routes on
KV events published from h1, long prompts are prefilled on h2, /health names every role's host, the same
worker id from another host is refused, and cutting h2 off and back heals by itself. Every socket uses CURVE with
one key folder (``zdyn keys generate``) that every host has a copy of.
"""

from __future__ import annotations

import functools
import subprocess
import sys
import time

import httpx
import pytest

from zdyn.bench import netns
from zdyn.bench.procs import ProcessGroup, get_json, scrape, wait_until

pytestmark = [
    pytest.mark.skipif(netns.available() is not None, reason=str(netns.available())),
    pytest.mark.slow,  # a deployment's processes in network namespaces
]

MOCKER = ["--engine", "mocker", "--speedup", "20", "--block-size", "32", "--max-model-len", "2048"]
FAST = ["--heartbeat-interval", "0.5"]
LONG = [(i * 37) % 800 + 20 for i in range(700)]  # past max-local-prefill-length


def remote_prefills(hosts: netns.NetnsHosts) -> float:
    total = 0.0
    for port in (9100, 9101):  # decode0, decode1
        metrics = scrape(f"http://{hosts.ip(1)}:{port}/metrics")
        total += sum(v for k, v in metrics.items() if k.startswith("zdyn_disagg_decisions") and "remote" in k)
    return total


@pytest.fixture
def fleet(tiny_model, tmp_path):
    keys = tmp_path / "keys"  # one folder of CURVE keys, carried to every host (here: the same file system)
    subprocess.run([sys.executable, "-m", "zdyn.cli", "keys", "generate", str(keys)], check=True, capture_output=True)
    with netns.NetnsHosts(3) as hosts, ProcessGroup(tmp_path / "logs") as group:
        a = hosts.ip(0)
        model = ["--model", str(tiny_model)]
        group.start = functools.partial(group.start, env={"ZDYN_KEYS_DIR": str(keys)})  # type: ignore[method-assign]
        group.start("frontend", hosts.argv(0, ["zdyn", "frontend", *model, "--host", "0.0.0.0",
                                                "--router-endpoint", f"tcp://{a}:5570", *FAST]))  # fmt: skip
        group.start("router", hosts.argv(0, ["zdyn", "router", "--seed-hubs", f"tcp://{a}:5555", "--metrics-port",
                                             "9102", *FAST]))  # fmt: skip
        group.start("queue", hosts.argv(0, ["zdyn", "prefill-queue", *FAST]))
        for i in range(2):
            argv = ["zdyn", "worker", *model, *MOCKER, *FAST, "--connect", f"tcp://{a}:5555", "--worker-id",
                    f"decode{i}", "--prefill-queue", f"tcp://{a}:5590", "--max-local-prefill-length", "256",
                    "--port-base", str(6000 + 10 * i), "--metrics-port", str(9100 + i)]  # fmt: skip
            group.start(f"decode{i}", hosts.argv(1, argv))
        group.start("prefill0", hosts.argv(2, ["zdyn", "worker", "--prefill", *model, *MOCKER, *FAST, "--connect",
                                               f"tcp://{a}:5591", "--worker-id", "prefill0"]))  # fmt: skip
        base_url = f"http://{a}:8000"

        def ready() -> bool:
            status, health = get_json(f"{base_url}/health")
            queues = health.get("prefill_queues", []) if status == 200 else []
            return len(health["workers"]) == 2 and bool(queues) and queues[0]["prefill_workers"] == ["prefill0@" +
                                                                                               hosts.ip(2)]  # fmt: skip

        wait_until(ready, "2 decode workers and a prefill worker", 60, group)
        router = f"http://{a}:9102/metrics"
        wait_until(lambda: scrape(router).get("zdyn_router_workers", 0) >= 2, "workers at the router", 30, group)
        yield hosts, group, base_url, model
        assert group.stop() == []
    assert not hosts.exists()


def complete(base_url: str, prompt: list[int]) -> dict:
    body = {"model": "tiny-llama", "prompt": prompt, "max_tokens": 3, "temperature": 0}
    response = httpx.post(f"{base_url}/v1/completions", json=body, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def test_disagg_route_across_three_hosts(fleet):
    hosts, group, base_url, model = fleet
    a, b, c = (hosts.ip(i) for i in range(3))
    first = complete(base_url, LONG)
    assert remote_prefills(hosts) >= 1  # prefilled on h2, its KV pulled by h1
    again = complete(base_url, LONG)  # the router saw h1's KV events (advertised at h1's address): a prefix hit
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    assert first["usage"]["prompt_tokens"] == again["usage"]["prompt_tokens"]

    status, health = get_json(f"{base_url}/health")
    assert status == 200 and {w["host"] for w in health["workers"]} == {b}
    assert health["hosts"] == {
        a: [f"prefill-queue tcp://{a}:5590", f"router tcp://{a}:5570"],
        b: ["worker decode0", "worker decode1"],
        c: ["prefill-worker prefill0"],
    }
    assert health["routers"] == [{"endpoint": f"tcp://{a}:5570", "status": "answering"}]

    # the same worker id from another host is refused; the first keeps serving
    dup = group.start("dup", hosts.argv(2, ["zdyn", "worker", *model, *MOCKER, "--connect", f"tcp://{a}:5555",
                                            "--worker-id", "decode0", "--no-discover"]))  # fmt: skip
    assert dup.wait(30) == 2
    del group.procs["dup"]
    assert len(get_json(f"{base_url}/health")[1]["workers"]) == 2

    # cut h2 (the prefill worker) off: long prompts are prefilled locally meanwhile; plugged back in, it returns
    hosts.partition(2)
    try:
        wait_until(lambda: not get_json(f"{base_url}/health")[1]["prefill_workers"], "prefill worker gone", 20, group)
        complete(base_url, [t + 1 for t in LONG])
    finally:
        hosts.heal(2)
    wait_until(lambda: get_json(f"{base_url}/health")[1]["prefill_workers"], "prefill worker back", 30, group)
    before = remote_prefills(hosts)
    deadline, shift = time.monotonic() + 20, 2
    while remote_prefills(hosts) == before and time.monotonic() < deadline:
        complete(base_url, [t + shift for t in LONG])  # new prompts until one goes to h2 again
        shift += 1
        time.sleep(0.5)
    assert remote_prefills(hosts) > before
