"""Does any role other than the frontend fail a request when it dies, drains or restarts under load?

For each scenario, started as its run.sh starts it (mocker workers, 2 of each role that can be 2), a steady
Poisson load of streaming chat requests runs while each role in turn gets kill -9 (and is restarted 2 s later,
as run.sh's supervision would) and then SIGTERM (it drains, exits, and is restarted). Per event: requests that
started within its window, failed ones, re-issued ones (retries before the first token and migrations after,
from the frontend's and processors' counters), the worst end-to-end latency against the undisturbed median, and
the time until the frontend listed every worker again.

    python -m benchmarks.chaos                                  # 4 scenarios, ~6 min
    python -m benchmarks.chaos --scenarios disagg --rate 12     # one scenario
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import statistics
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from zdyn.bench.client import ClientConfig, OpenAIClient
from zdyn.bench.deploy import ZdynDeployment, ZdynSpec, start
from zdyn.bench.host import bench_lock
from zdyn.bench.procs import live_workers, scrape
from zdyn.bench.records import RequestRecord
from zdyn.bench.results import RESULTS, command, footer, provenance, table, write_json
from zdyn.models import build_tiny_llama, cache_dir

OUT = RESULTS / "chaos"
SPECS = {
    "agg": dict(workers=2, processors=2),
    "agg_route": dict(workers=2),
    "disagg": dict(workers=2, prefill_workers=2),
    "disagg_route": dict(workers=2, prefill_workers=2),
}
SIGNALS = {"kill -9": signal.SIGKILL, "SIGTERM": signal.SIGTERM}


@dataclass
class Event:
    scenario: str
    role: str
    action: str
    at: float = 0.0
    requests: int = 0
    failed: int = 0
    reissued: int = 0
    max_added_latency_s: float = 0.0
    recover_s: float | None = None
    errors: dict[str, int] = field(default_factory=dict)  # failed requests by error


class Load:
    """Poisson arrivals of streaming chat requests in a thread of its own, until ``stop()``."""

    def __init__(self, base_url: str, model: str, rate: float, max_tokens: int) -> None:
        self.base_url, self.model, self.rate, self.max_tokens = base_url, model, rate, max_tokens
        self.records: list[RequestRecord] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(120)

    async def _run(self) -> None:
        import random

        rng = random.Random(0)
        tasks: list[asyncio.Task[RequestRecord]] = []
        async with OpenAIClient(ClientConfig(self.base_url, timeout_s=120)) as client:
            i = 0
            while not self._stop.is_set():
                body = {
                    "model": self.model,
                    "messages": [{"role": "user", "content": f"request {i}: tell me about {rng.random()}"}],
                    "max_tokens": self.max_tokens,
                    "ignore_eos": True,
                    "stream": True,
                }
                tasks.append(asyncio.create_task(client.stream("v1/chat/completions", body, i, 0)))
                i += 1
                await asyncio.sleep(rng.expovariate(self.rate))
            self.records = list(await asyncio.gather(*tasks))


def reissued(dep: ZdynDeployment) -> float:
    """Requests re-issued so far, over every role that counts them."""
    total = 0.0
    for url in dep.metrics.values():
        try:
            metrics = scrape(url)
        except OSError:
            continue
        total += sum(v for k, v in metrics.items() if k.startswith("zdyn_reissued_requests_total"))
    return total


def run_scenario(name: str, args: argparse.Namespace, model: Path) -> list[Event]:
    spec = ZdynSpec(name, model=str(model), worker_args=("--speedup", str(args.speedup)), **SPECS[name])  # type: ignore[arg-type]
    events: list[Event] = []
    with start(spec, OUT / "logs" / name) as dep:
        roles = [r for r in dep.group.procs if r != "frontend"]
        load = Load(dep.base_url, dep.model, args.rate, args.max_tokens)
        t0 = time.perf_counter()
        load.start()
        time.sleep(args.window)  # undisturbed
        for role in roles:
            for action, sig in SIGNALS.items():
                event = Event(name, role, action, at=time.perf_counter() - t0)
                before = reissued(dep)
                print(f"  {name}: {action} {role} at {event.at:.0f}s", flush=True)
                dep.group.kill(role, sig)
                if sig != signal.SIGKILL:
                    dep.group.procs[role].wait(60)  # it drains, then exits
                time.sleep(2.0)  # run.sh restarts a dead role after 1-2 s
                dep.group.start(role, dep.group.argv[role], spec.env)
                restarted = time.perf_counter()
                while live_workers(dep.base_url) < spec.workers and time.perf_counter() - restarted < args.window:
                    time.sleep(0.1)
                event.recover_s = round(time.perf_counter() - t0 - event.at, 2)
                time.sleep(max(0.0, args.window - (time.perf_counter() - t0 - event.at)))
                event.reissued = int(reissued(dep) - before)
                events.append(event)
        load.stop()
        score(events, load.records, t0, args.window)
    return events


def score(events: list[Event], records: list[RequestRecord], t0: float, window: float) -> None:
    ok = [r.latency for r in records if r.success and r.start - t0 < window]
    baseline = statistics.median(ok) if ok else 0.0
    for e in events:
        mine = [r for r in records if e.at <= r.start - t0 < e.at + window]
        e.requests = len(mine)
        e.failed = sum(not r.success for r in mine)
        e.errors = dict(Counter(f"{r.error}: {r.error_detail[:80]}" for r in mine if not r.success))
        e.max_added_latency_s = round(max((r.latency - baseline for r in mine if r.success), default=0.0), 2)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.chaos", description=__doc__)
    parser.add_argument("--scenarios", default="agg,agg_route,disagg,disagg_route")
    parser.add_argument("--rate", type=float, default=12.0, help="requests per second")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--speedup", type=float, default=2.0, help="mocker speedup (1 = Dynamo's timings)")
    parser.add_argument("--window", type=float, default=8.0, help="seconds each event is watched")
    args = parser.parse_args(argv)
    cmd = command("benchmarks.chaos", list(sys.argv[1:] if argv is None else argv))
    model = build_tiny_llama(cache_dir() / "models" / "tiny-llama")
    events: list[Event] = []
    with bench_lock():
        for name in args.scenarios.split(","):
            print(f"{name}: starting", flush=True)
            events += run_scenario(name, args, model)
    rows = [
        [str(v) for v in (e.scenario, e.role, e.action, e.requests, e.failed, e.reissued, e.max_added_latency_s,
                          e.recover_s)]
        for e in events
    ]  # fmt: skip
    headers = ["scenario", "role", "event", "requests", "failed", "re-issued", "max added latency s", "recover s"]
    print(table(headers, rows))
    total = sum(e.requests for e in events)
    for e in events:
        for error, n in e.errors.items():
            print(f"  {e.scenario} {e.action} {e.role}: {n} x {error}")
    print(f"\n{sum(e.failed for e in events)} failed of {total} requests during {len(events)} events")
    path = write_json(OUT / "chaos.json", {"provenance": provenance(), "command": cmd, "args": vars(args),
                                           "events": [asdict(e) for e in events]})  # fmt: skip
    print(footer(cmd, path))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
