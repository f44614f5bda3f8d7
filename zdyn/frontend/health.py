"""What ``GET /health`` shows besides the workers: every role with its host, and the links that are missing.

Built from what the frontend already hears: workers' READY (their host) and heartbeats (a decode worker's view
of its prefill queues and their prefill workers), separate processors' heartbeats (their workers and their
router link), and the embedded processor's own router client.
"""

from __future__ import annotations

from typing import Any

from zdyn.transport import endpoint_host


def topology(
    workers: list[dict[str, Any]], processors: list[dict[str, Any]], routers: list[dict[str, Any]]
) -> dict[str, Any]:
    """``/health``'s extra sections: processors, routers, prefill queues and prefill workers, hosts."""
    hosts: dict[str, list[str]] = {}

    def on(host: str, what: str) -> None:
        hosts.setdefault(host or "?", []).append(what)

    queues: dict[str, dict[str, Any]] = {}
    for worker in workers:
        on(worker.get("host", ""), f"worker {worker['id']}")
        for queue in worker.get("prefill_queues", []):  # QueueLink maps (fields at their default left out)
            seen = queues.setdefault(
                queue["endpoint"],
                {
                    "endpoint": queue["endpoint"],
                    "live": False,
                    "queued": 0,
                    "prefill_workers": [],
                    "decode_workers": [],
                },
            )
            seen["decode_workers"].append(worker["id"])
            seen["live"] = seen["live"] or queue.get("live", False)
            seen["queued"] = max(seen["queued"], queue.get("queued", 0))
            seen["prefill_workers"] = sorted({*seen["prefill_workers"], *queue.get("prefill_workers", [])})
    for processor in processors:
        on(processor.get("host", ""), f"processor {processor['id']}")
    for router in routers:
        on(endpoint_host(router["endpoint"]), f"router {router['endpoint']}")
    prefill_workers: dict[str, str] = {}
    for endpoint, queue in queues.items():
        on(endpoint_host(endpoint), f"prefill-queue {endpoint}")
        for name in queue["prefill_workers"]:
            worker, _, host = name.rpartition("@")
            if worker not in prefill_workers:
                prefill_workers[worker] = host
                on(host, f"prefill-worker {worker}")
    return {
        "processors": processors,
        "routers": routers,
        "prefill_queues": list(queues.values()),
        "prefill_workers": [{"id": w, "host": h} for w, h in prefill_workers.items()],
        "hosts": {host: sorted(roles) for host, roles in sorted(hosts.items())},
    }
