"""A real keyed deployment (mocker workers, as run.sh starts it): it serves, and a stranger without keys gets
nothing from any of its ZeroMQ ports, not even KV events."""

import json
import re
import time
from pathlib import Path

import httpx
import pytest
import zmq

from zdyn.bench.deploy import ZdynSpec, start
from zdyn.bench.procs import scrape
from zdyn.protocol import Generate, PrefillJob, Ready, RouteQuery, encode

pytestmark = pytest.mark.slow  # starts a deployment's processes; tests/test_inprocess_topology.py is the quick loop's


def _stranger_gets_nothing(endpoint: str, frames: list[bytes], ctx: zmq.Context) -> bool:
    sock = ctx.socket(zmq.DEALER)  # no CURVE: the handshake with a CURVE server never completes
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        for _ in range(3):
            sock.send_multipart(frames)
        return sock.poll(1000) == 0
    finally:
        sock.close()


def test_a_keyed_deployment_serves_and_strangers_get_nothing(tiny_model: Path, tmp_path: Path) -> None:
    spec = ZdynSpec(
        "disagg_route", workers=1, model=str(tiny_model), worker_args=("--speedup", "1000"),
        config={"Worker": {"max-local-prefill-length": 8}},  # every prompt here is prefilled through the queue
    )  # fmt: skip
    with start(spec, tmp_path / "logs", timeout_s=120) as dep:
        assert dep.ports is not None
        keys = tmp_path / "logs" / "keys"
        assert (keys / "server.key_secret").is_file()
        log = (tmp_path / "logs" / "decode0.log").read_text()
        assert "CURVE keys from" in log
        kv_events = re.search(r"publishes KV events at (tcp://\S+) \(replay (tcp://\S+)\)", log)
        assert kv_events is not None
        ctx = zmq.Context()
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(kv_events.group(1))
        try:
            with httpx.Client(base_url=dep.base_url, timeout=30) as client:
                for i in range(6):
                    prompt = f"the same long prefix {'x y z ' * 100} then {i}"  # several 64-token blocks
                    body = {"model": dep.model, "prompt": prompt, "max_tokens": 4, "ignore_eos": True}
                    r = client.post("/v1/completions", json=body)
                    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
            # the router (a keyed reader) follows the worker's KV events through its relay; a stranger reads none
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                router = scrape(dep.metrics["router"])
                if sum(v for k, v in router.items() if k.startswith("zdyn_router_indexed_blocks")) > 0:
                    break
                time.sleep(0.1)
            assert sum(v for k, v in router.items() if k.startswith("zdyn_router_indexed_blocks")) > 0, router
            assert sub.poll(500) == 0
            queue = scrape(dep.metrics["prefill_queue"])  # jobs and results went over the queue's keyed ROUTER
            assert sum(v for k, v in queue.items() if k.startswith("zdyn_prefill_queue_jobs") and "done" in k) > 0
            p = dep.ports
            ready = encode(Ready(peer_id="worker0", role="worker", model=dep.model))
            job = encode(PrefillJob(request=Generate(request_id="x", token_ids=[1, 2, 3])))
            probes = {
                f"tcp://127.0.0.1:{p.workers}": ready,  # the frontend's worker hub
                f"tcp://127.0.0.1:{p.router}": encode(RouteQuery(request_id="q", token_ids=[1, 2, 3])),
                f"tcp://127.0.0.1:{p.router + 1}": ready,  # the router's worker hub
                f"tcp://127.0.0.1:{p.queue}": job,
                f"tcp://127.0.0.1:{p.queue + 1}": encode(Ready(peer_id="p", role="prefill", model=dep.model)),
                kv_events.group(2): [b"", (0).to_bytes(8, "big")],  # a KV-event replay request
            }
            for endpoint, frames in probes.items():
                assert _stranger_gets_nothing(endpoint, frames, ctx), endpoint
            time.sleep(0.5)
            health = httpx.get(f"{dep.base_url}/health").json()
            assert len(health["workers"]) == 1
        finally:
            sub.close()
            ctx.term()


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_a_10_mb_prompt_is_refused_fast_without_hurting_other_streams(tiny_model: Path, tmp_path: Path) -> None:
    spec = ZdynSpec("agg", workers=1, model=str(tiny_model), worker_args=("--speedup", "20", "--max-model-len", "2048"))
    with start(spec, tmp_path / "logs", timeout_s=90) as dep:
        frontend_pid = dep.group.procs["frontend"].pid
        body = {"model": dep.model, "prompt": "hello there", "max_tokens": 64, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}  # fmt: skip
        with httpx.Client(base_url=dep.base_url, timeout=30) as client:  # warm up: first requests allocate
            client.post("/v1/completions", json={**body, "stream": False, "max_tokens": 2})
        rss_before = _rss_mib(frontend_pid)
        import concurrent.futures

        def stream() -> int:  # the tokens a streamed completion reports
            tokens = 0
            with httpx.stream("POST", f"{dep.base_url}/v1/completions", json=body, timeout=30) as r:
                assert r.status_code == 200
                for line in r.iter_lines():
                    if line.startswith("data: {") and (usage := json.loads(line[6:]).get("usage")):
                        tokens = usage["completion_tokens"]
            return tokens

        huge = {"model": dep.model, "prompt": "a " * (5 << 20), "max_tokens": 4}  # 10 MiB of prompt
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            streams = [pool.submit(stream) for _ in range(6)]
            time.sleep(0.3)
            t0 = time.monotonic()
            r = httpx.post(f"{dep.base_url}/v1/completions", json=huge, timeout=30)
            refused_s = time.monotonic() - t0
            assert all(s.result(60) == 64 for s in streams)  # every other stream got all its tokens
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
        assert refused_s < 1.0, refused_s
        assert _rss_mib(frontend_pid) - rss_before < 100
