"""A real keyed deployment (mocker workers, as run.sh starts it): it serves, and a stranger without keys gets
nothing from any of its ZeroMQ ports, not even KV events."""

import re
import time
from pathlib import Path

import httpx
import zmq

from zdyn.bench.deploy import ZdynSpec, start
from zdyn.bench.procs import scrape
from zdyn.protocol import Generate, PrefillJob, Ready, RouteQuery, encode


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
