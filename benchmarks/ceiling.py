"""The pipeline's own ceiling, with the peers in the same run.

Every system gets the same closed-loop load from ``zdyn bench`` (streaming chat, ~200 prompt tokens, 64
output tokens with ``ignore_eos``, concurrency 64, 500 measured requests after 32 warm-ups, keep-alive),
on the same 2 cores, one system at a time, alternating, ``--reps`` times:

* ``zdyn``: ``zdyn frontend`` (embedded processor) + 2 ``zdyn worker --engine mocker`` processes.
* ``dynamo``: NVIDIA Dynamo 1.6.1 (frontend with its round-robin router + 2 ``dynamo.mocker`` processes).
* ``bare-sse``: one uvicorn process (uvloop + httptools, like zdyn) with a starlette route that streams 64
  OpenAI chat chunks per request, no engine, no ZeroMQ: the HTTP ceiling of one Python process.
  ``bare-sse-1`` sends the 64 tokens as one chunk (what zdyn's frontend sends when all tokens of a request
  are already queued when it gets to them, i.e. at speedup 1e6).
* ``bare-zmq`` / ``bare-zmq-batched`` / ``zdyn-rpc``: the same number of requests x 64 tokens over
  ROUTER/DEALER with no HTTP, with 2 server processes (``benchmarks/transport.py``): one message per token,
  one message per loop turn for all streams, and zdyn's Hub/Spoke.

Both mockers run with Dynamo's defaults (block size 64, 16384 blocks, 256 seqs, 8192 batched tokens) at
``--speedup 1e6`` (no engine time). CPU seconds per process come from /proc over the measured window (from
the load generator's progress bar appearing, after the warm-ups, to its summary). Then, once each:
Dynamo with ``router_mode="kv"``; zdyn and Dynamo at speedup 1 (ITL means something there), and zdyn once
more with its clock scaled so that its decode step takes as long as Dynamo's (the two mockers' timing models
differ); aiperf and ``zdyn bench`` against the same zdyn deployment (speedup 1e6, then 1), with CPU per
process over each tool's measured window; py-spy profiles of zdyn's frontend and one worker.

/tmp/zdyn-bench.lock is held for one repetition of all systems at a time (start, measure, stop of each),
and for each later phase; other benchmarks may run in between.

    python -m benchmarks.ceiling                          # from the repo root; about 6-8 minutes
    python -m benchmarks.ceiling --phases main --reps 1   # a quick look
    python -m benchmarks.ceiling serve-sse --port 8000    # the bare SSE server alone
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from benchmarks.peers.aiperf import AiperfResult, run_aiperf
from benchmarks.peers.dynamo import DYNAMO_VERSION, DynamoDeployment
from benchmarks.transport import (
    BENCH_LOCK,
    REPO,
    RESULTS,
    ClientSpec,
    StreamSpec,
    bench_lock,
    code_version,
    endpoint_for,
    fmt,
    med_range,
    run_pair,
    system_busy_s,
    table,
)
from zdyn.launch import ProcessGroup, free_port, wait_for_workers

DEFAULT_MODEL = Path.home() / ".cache" / "zdyn" / "models" / "tiny-llama"
CLK_TCK = os.sysconf("SC_CLK_TCK")
MAIN_SYSTEMS = ("zdyn", "dynamo", "bare-sse", "bare-sse-1", "bare-zmq", "bare-zmq-batched", "zdyn-rpc")
ZMQ_SYSTEMS = {"bare-zmq": "bare", "bare-zmq-batched": "bare-batched", "zdyn-rpc": "zdyn"}
PHASES = ("main", "kv", "rate", "speedup1", "aiperf", "profile")
RATE_SYSTEMS = ("zdyn-rate", "dynamo-rate")
FAST = 1e6  # "no engine time" (Dynamo's 0 behaves like 1)
CLEAN_FOREIGN = 0.10  # a run is "clean" when other processes used less than this fraction of a core meanwhile
START_MARK = b"concurrency="  # zdyn bench's progress bar label: the measured phase has begun
END_MARK = b"Serving Benchmark Result"  # its summary: the measured phase is over


# ------------------------------------------------------------------------------------------ load settings
@dataclass(frozen=True, slots=True)
class Load:
    concurrency: int = 64
    requests: int = 500
    warmups: int = 32
    input_len: int = 200
    output_len: int = 64
    seed: int = 0
    request_rate: float | None = None  # open loop (Poisson) at this rate, capped at ``concurrency``


@dataclass(frozen=True, slots=True)
class Engine:
    """The mocker settings both systems get (Dynamo's mocker defaults)."""

    block_size: int = 64
    num_blocks: int = 16384
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    workers: int = 2


def bench_argv(base_url: str, model: str, tokenizer: Path, load: Load, result_json: Path, label: str) -> list[str]:
    return [
        "zdyn", "bench",
        "--base-url", base_url,
        "--model", model,
        "--tokenizer", str(tokenizer),
        "--input-len", str(load.input_len),
        "--output-len", str(load.output_len),
        "--ignore-eos",
        "--concurrency", str(load.concurrency),
        "--num-requests", str(load.requests),
        "--warmups", str(load.warmups),
        "--seed", str(load.seed),
        "--save-requests",
        "--result-json", str(result_json),
        "--label", label,
    ] + (["--request-rate", f"{load.request_rate:g}"] if load.request_rate else [])  # fmt: skip


# ----------------------------------------------------------------------------------------- CPU accounting
def group_cpu_s(pgid: int) -> float:
    """CPU seconds (user + system, all threads) of the live processes in process group ``pgid``."""
    total = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # state ppid pgrp session ... utime(11) stime(12)
        if int(fields[2]) == pgid:
            total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


@dataclass(slots=True)
class Snapshot:
    at: float
    busy_s: float
    cpu_s: dict[str, float]


def snapshot(groups: dict[str, int]) -> Snapshot:
    return Snapshot(time.monotonic(), system_busy_s(), {name: group_cpu_s(pgid) for name, pgid in groups.items()})


def _proc_table() -> list[tuple[int, int, str]]:
    """(pid, process group, command line) of every process."""
    out = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                stat = f.read()
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        out.append((int(entry.name), int(stat[stat.rindex(")") + 2 :].split()[2]), cmdline))
    return out


def _pid_cpu_s(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


class CpuSampler(threading.Thread):
    """Samples cumulative CPU per role every ``interval`` s (wall-clock stamped), so that CPU can be read over a
    window known only afterwards (aiperf's measured phase). Roles: the process groups given, plus every process
    in the process group of any process whose command line contains ``match`` (summed as ``match_role``).
    Processes are looked up once a second; CPU of a process that exits between samples is lost (none of the
    measured ones do)."""

    def __init__(
        self, groups: dict[str, int], match: str, match_role: str, interval: float = 0.05, detail: bool = False
    ) -> None:
        super().__init__(daemon=True)
        self.groups, self.match, self.match_role, self.interval = groups, match, match_role, interval
        self.samples: list[tuple[float, float, dict[str, float]]] = []  # (time.time(), busy, cpu per role)
        self.stopped = threading.Event()
        self.pids: dict[str, list[int]] = {}
        self.retired: dict[str, float] = {}  # CPU of processes seen before that have exited
        # detail: also one entry per matched process, keyed "<match_role>/<title> #<pid>" (not part of the roles)
        self.detail = detail
        self.titles: dict[int, str] = {}

    def _scan(self) -> None:
        pids: dict[str, list[int]] = {role: [] for role in (*self.groups, self.match_role)}
        by_pgid = {pgid: role for role, pgid in self.groups.items()}
        table = _proc_table()
        # aiperf renames its processes (setproctitle), so match the name, then take each match's process group
        matched = {pgid for pid, pgid, cmdline in table if self.match in cmdline and pid != os.getpid()}
        for pid, pgid, cmdline in table:
            if pgid in by_pgid:
                pids[by_pgid[pgid]].append(pid)
            elif pgid in matched:
                pids[self.match_role].append(pid)
                self.titles[pid] = " ".join(cmdline.split()[:2])[:48]
        self.pids = pids

    def run(self) -> None:
        last_scan = 0.0
        while not self.stopped.is_set():
            if time.monotonic() - last_scan > 1.0:
                self._scan()
                last_scan = time.monotonic()
            cpu = {role: sum(_pid_cpu_s(p) for p in pids) for role, pids in self.pids.items()}
            if self.detail:
                for p in self.pids.get(self.match_role, []):
                    cpu[f"{self.match_role}/{self.titles.get(p, '?')} #{p}"] = _pid_cpu_s(p)
            self.samples.append((time.time(), system_busy_s(), cpu))
            self.stopped.wait(self.interval)

    def stop(self) -> None:
        self.stopped.set()
        self.join(5)

    def window(self, t0: float, t1: float) -> tuple[float, dict[str, float]]:
        """(busy CPU seconds of the box, CPU seconds per role) between wall-clock times t0 and t1."""

        def at(t: float) -> tuple[float, dict[str, float]]:
            before = max((s for s in self.samples if s[0] <= t), key=lambda s: s[0], default=self.samples[0])
            after = min((s for s in self.samples if s[0] >= t), key=lambda s: s[0], default=self.samples[-1])
            w = 0.0 if after[0] == before[0] else (t - before[0]) / (after[0] - before[0])
            roles = set(before[2]) | set(after[2])
            cpu = {r: before[2].get(r, 0.0) * (1 - w) + after[2].get(r, 0.0) * w for r in roles}
            return before[1] * (1 - w) + after[1] * w, cpu

        (b0, c0), (b1, c1) = at(t0), at(t1)
        return b1 - b0, {r: c1.get(r, 0.0) - c0.get(r, 0.0) for r in c1}


# ---------------------------------------------------------------------------------------------- results
@dataclass(slots=True)
class Row:
    """One measured run of one system."""

    system: str
    rep: int
    speedup: float
    req_s: float
    tok_s: float
    ttft_p50: float
    ttft_p99: float
    e2e_p50: float
    e2e_p99: float
    itl_p50: float
    itl_p99: float
    tpot_p50: float
    chunks_per_req: float  # SSE token chunks per request (zmq rows: messages per request)
    out_tokens_per_req: float
    prompt_tokens_per_req: float
    completed: int
    failed: int
    window_s: float  # the CPU accounting window
    cpu_s: dict[str, float]  # per process role over the window
    foreign_cpu_s: float  # CPU of processes outside the run during the window
    command: str
    extra: dict[str, Any] = field(default_factory=dict)

    def cpu_pct(self, role: str) -> float:
        """Percent of one core; ``workers`` sums every worker-*."""
        if role == "workers":
            value = sum(v for k, v in self.cpu_s.items() if k.startswith("worker"))
        else:
            value = self.cpu_s.get(role, math.nan)
        return 100.0 * value / self.window_s if self.window_s > 0 else math.nan

    def cpu_ms_per_req(self, role: str) -> float:
        pct = self.cpu_pct(role)
        return pct / 100.0 * self.window_s / self.completed * 1000.0 if self.completed else math.nan


def row_from_bench(
    system: str, rep: int, speedup: float, result_json: Path, start: Snapshot, end: Snapshot, command: str
) -> Row:
    doc = json.loads(result_json.read_text())
    run = doc["runs"][0]
    m = run["metrics"]
    ok = [r for r in run["requests"] if r["success"]]
    cpu = {k: end.cpu_s[k] - start.cpu_s[k] for k in start.cpu_s}
    window = end.at - start.at
    itl = m["itl"]
    return Row(
        system=system,
        rep=rep,
        speedup=speedup,
        req_s=m["request_throughput"],
        tok_s=m["output_throughput"],
        ttft_p50=m["ttft"]["median"],
        ttft_p99=m["ttft"]["percentiles"]["p99"],
        e2e_p50=m["e2el"]["median"],
        e2e_p99=m["e2el"]["percentiles"]["p99"],
        itl_p50=itl["median"] if itl["count"] else math.nan,
        itl_p99=itl["percentiles"]["p99"] if itl["count"] else math.nan,
        tpot_p50=m["tpot"]["median"] if m["tpot"]["count"] else math.nan,
        chunks_per_req=statistics.fmean(r["num_chunks"] for r in ok) if ok else math.nan,
        out_tokens_per_req=statistics.fmean(r["output_tokens"] for r in ok) if ok else math.nan,
        prompt_tokens_per_req=statistics.fmean(r["prompt_tokens"] for r in ok) if ok else math.nan,
        completed=m["completed"],
        failed=m["failed"],
        window_s=window,
        cpu_s=cpu,
        foreign_cpu_s=max(0.0, end.busy_s - start.busy_s - sum(cpu.values())),
        command=command,
        extra={"duration_s": m["duration_s"], "errors": m["errors"], "max_concurrency": m["max_concurrency"]},
    )


# --------------------------------------------------------------------------------------- load generator
@dataclass(slots=True)
class Target:
    name: str
    base_url: str
    model: str
    groups: dict[str, int]  # process role -> process group id (each role runs as its own group leader)


def _reader(stream: IO[bytes], sink: list[bytes], mark: bytes, on_mark: Any) -> None:
    tail = b""
    seen = False
    while chunk := stream.read1(65536):  # type: ignore[attr-defined]
        sink.append(chunk)
        if not seen and mark in tail + chunk:
            seen = True
            on_mark()
        tail = chunk[-64:]


def run_bench(
    target: Target, system: str, rep: int, speedup: float, load: Load, tokenizer: Path, work: Path
) -> tuple[Row, str]:
    """One ``zdyn bench`` run against ``target``; CPU is read at the start and end marks of its output."""
    result = work / f"bench-{system}-{rep}-{speedup:g}-{uuid.uuid4().hex[:6]}.json"
    argv = bench_argv(target.base_url, target.model, tokenizer, load, result, f"{system} #{rep}")
    command = shlex.join(argv)
    proc = subprocess.Popen(
        [sys.executable, "-m", "zdyn.cli", *argv[1:]],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},  # the summary (end mark) must not wait in a pipe buffer
        start_new_session=True,
    )
    groups = {**target.groups, "load generator": proc.pid}
    marks: dict[str, Snapshot] = {}
    out: list[bytes] = []
    err: list[bytes] = []
    assert proc.stdout is not None and proc.stderr is not None

    def mark(name: str) -> None:
        marks.setdefault(name, snapshot(groups))

    readers = [
        threading.Thread(target=_reader, args=(proc.stderr, err, START_MARK, lambda: mark("start"))),
        threading.Thread(target=_reader, args=(proc.stdout, out, END_MARK, lambda: mark("end"))),
    ]
    for t in readers:
        t.start()
    try:
        code = proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
        for t in readers:
            t.join(10)
    stdout = b"".join(out).decode(errors="replace")
    if code != 0 or "start" not in marks or "end" not in marks:
        stderr = b"".join(err).decode(errors="replace")[-2000:]
        raise RuntimeError(f"zdyn bench against {system} failed ({code}):\n{stdout[-2000:]}\n{stderr}")
    row = row_from_bench(system, rep, speedup, result, marks["start"], marks["end"], command)
    row.extra["result_json"] = str(result)
    return row, stdout


# ------------------------------------------------------------------------------------------- deployments
@contextlib.contextmanager
def zdyn_deployment(
    model_dir: Path, speedup: float, engine: Engine, logs: Path, log_level: str, workers: int | None = None
) -> Iterator[Target]:
    """``zdyn frontend`` + one ``zdyn worker --engine mocker`` process per worker (as Dynamo's mockers)."""
    port, workers_port = free_port(), free_port()
    endpoint = f"tcp://127.0.0.1:{workers_port}"
    base = f"http://127.0.0.1:{port}"
    n = workers or engine.workers
    with ProcessGroup(logs) as group:
        frontend = ["zdyn", "frontend", "--model", str(model_dir), "--host", "127.0.0.1", "--port", str(port),
                    "--workers-endpoint", endpoint, "--log-level", log_level]  # fmt: skip
        group.start("frontend", frontend)
        # Workers after the frontend's hub is up: a worker that starts first re-announces itself after 3 s of
        # silence, and if that coincides with the hub coming up, the hub can drop it again right after
        # registering it (seen once: the whole run went to one worker).
        wait_http(base + "/health", group)
        for i in range(n):
            group.start(
                f"worker-{i}",
                [
                    "zdyn", "worker", "--engine", "mocker", "--model", str(model_dir), "--connect", endpoint,
                    "--worker-id", f"mocker-{i}", "--speedup", f"{speedup:g}",
                    "--block-size", str(engine.block_size), "--num-blocks", str(engine.num_blocks),
                    "--max-num-seqs", str(engine.max_num_seqs),
                    "--max-num-batched-tokens", str(engine.max_num_batched_tokens), "--log-level", log_level,
                ],
            )  # fmt: skip
        wait_for_workers(base, n, group, timeout_s=120)
        wait_stable_workers(base, n)
        yield Target("zdyn", base, model_dir.name, {name: p.pid for name, p in group.procs.items()})


def wait_http(url: str, group: ProcessGroup, timeout_s: float = 120.0) -> None:
    """Until ``url`` answers at all (any status)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        group.check_alive()
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except urllib.error.HTTPError:
            return  # 503 before any worker: the server is up
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer within {timeout_s:.0f} s")


def wait_stable_workers(base: str, n: int, stable_s: float = 2.0, timeout_s: float = 30.0) -> None:
    """Until /health has listed ``n`` workers for ``stable_s`` seconds in a row."""
    deadline = time.monotonic() + timeout_s
    since: float | None = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(base + "/health", timeout=2) as r:
                count = len(json.loads(r.read()).get("workers", []))
        except (OSError, ValueError):
            count = 0
        now = time.monotonic()
        since = (since or now) if count >= n else None
        if since is not None and now - since >= stable_s:
            return
        time.sleep(0.1)
    raise TimeoutError(f"{base}: {n} workers were not registered for {stable_s:g} s in a row")


@contextlib.contextmanager
def dynamo_deployment(model_dir: Path, speedup: float, engine: Engine, logs: Path, router: str) -> Iterator[Target]:
    with DynamoDeployment(
        model_dir,
        model_dir.name,
        num_workers=engine.workers,
        router_mode=router,
        speedup_ratio=speedup,
        block_size=engine.block_size,
        num_gpu_blocks=engine.num_blocks,
        max_num_seqs=engine.max_num_seqs,
        max_num_batched_tokens=engine.max_num_batched_tokens,
        log_dir=logs,
    ) as dyn:
        groups = {name.replace("mocker", "worker"): pid for name, pid in dyn.pids().items()}
        yield Target(f"dynamo-{router}", dyn.base_url, model_dir.name, groups)


@contextlib.contextmanager
def bare_sse_server(chunks: int, logs: Path) -> Iterator[Target]:
    port = free_port()
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / f"bare-sse-{chunks}.log", "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.ceiling", "serve-sse", "--port", str(port), "--chunks", str(chunks)],
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(base + "/v1/models", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"bare SSE server did not start; see {logs}")
            time.sleep(0.1)
        yield Target(f"bare-sse-{chunks}", base, "bare", {"frontend": proc.pid})
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# --------------------------------------------------------------------------------------- the bare SSE app
def sse_app(chunks_per_request: int) -> Any:
    """A minimal OpenAI-shaped streaming chat endpoint: ``max_tokens`` tokens in ``chunks_per_request``
    chunks (plus the role chunk, the usage chunk and [DONE]), JSON-encoded per chunk with msgspec as zdyn
    does. No engine, no tokenizer, no ZeroMQ, no disconnect watcher."""
    import msgspec
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    encode = msgspec.json.Encoder().encode
    headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]

    class Sse(Response):
        def __init__(self, chunks: Iterator[bytes]) -> None:
            self.status_code = 200
            self.raw_headers = list(headers)
            self.background = None
            self.chunks = chunks

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            for chunk in self.chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    def events(body: dict[str, Any]) -> Iterator[bytes]:
        n = int(body.get("max_tokens") or 16)
        base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk", "created": int(time.time()),
                "model": body.get("model", "bare")}  # fmt: skip

        def chunk(delta: dict[str, str], finish: str | None) -> bytes:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return b"data: " + encode({**base, "choices": [choice]}) + b"\n\n"

        yield chunk({"role": "assistant", "content": ""}, None)
        groups = min(n, chunks_per_request)
        for g in range(groups):
            tokens = n // groups + (1 if g < n % groups else 0)
            yield chunk({"content": " tok" * tokens}, "length" if g == groups - 1 else None)
        if (body.get("stream_options") or {}).get("include_usage"):
            usage = {"completion_tokens": n, "total_tokens": n}  # prompt not tokenized: the client uses its own
            yield b"data: " + encode({**base, "choices": [], "usage": usage}) + b"\n\n"
        yield b"data: [DONE]\n\n"

    async def chat(request: Request) -> Response:
        return Sse(events(msgspec.json.decode(await request.body())))

    async def models(request: Request) -> Response:
        listing = {"object": "list", "data": [{"id": "bare", "object": "model", "created": 0, "owned_by": "bench"}]}
        return Response(encode(listing), media_type="application/json")

    routes = [Route("/v1/chat/completions", chat, methods=["POST"]), Route("/v1/models", models, methods=["GET"])]
    return Starlette(routes=routes)


def serve_sse(port: int, chunks: int) -> None:
    """uvicorn on uvloop with httptools, as ``zdyn frontend`` runs (``zdyn.cli.run`` + ``uvicorn.Server``)."""
    import uvicorn
    import uvloop

    config = uvicorn.Config(
        sse_app(chunks), host="127.0.0.1", port=port, http="httptools", log_level="warning", access_log=False
    )
    gc.collect()
    gc.freeze()
    uvloop.run(uvicorn.Server(config).serve())


# --------------------------------------------------------------------------------------------- measuring
@dataclass(slots=True)
class Context:
    model_dir: Path
    load: Load
    engine: Engine
    work: Path
    log_level: str
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def zmq_row(ctx: Context, system: str, rep: int) -> Row:
    """The no-HTTP rows: transport.py's closed loop with 2 servers (unpinned, like the deployments)."""
    load = ctx.load
    stream = StreamSpec(
        concurrency=load.concurrency,
        requests=load.requests,
        deltas=load.output_len,
        prompt_tokens=load.input_len,
        warmup_requests=load.warmups,
    )
    impl = ZMQ_SYSTEMS[system]
    result = run_pair(impl, endpoint_for("tcp", f"ceiling-{impl}-{rep}"), ClientSpec(streams=[stream]), num_servers=2)
    s = result["streams"][0]
    cpu = {"load generator": s["client_cpu_s"], "workers": s["server_cpu_s"]}
    command = f"python -m benchmarks.transport (run_pair {impl!r}, 2 servers, {asdict(stream)})"
    return Row(
        system=system,
        rep=rep,
        speedup=math.inf,
        req_s=s["req_per_s"],
        tok_s=s["deltas_per_s"],
        ttft_p50=s["ttft_p50_ms"],
        ttft_p99=s["ttft_p99_ms"],
        e2e_p50=s["latency_p50_ms"],
        e2e_p99=s["latency_p99_ms"],
        itl_p50=math.nan,
        itl_p99=math.nan,
        tpot_p50=math.nan,
        chunks_per_req=s["server_messages"] / s["requests"],
        out_tokens_per_req=s["tokens"] / s["requests"],
        prompt_tokens_per_req=load.input_len,
        completed=s["requests"],
        failed=0,
        window_s=s["elapsed_s"],
        cpu_s=cpu,
        foreign_cpu_s=result["foreign_cpu_s"] * s["elapsed_s"] / result["wall_s"],  # prorated: measured per pair
        command=command,
        extra={"server_messages": s["server_messages"], "pair_wall_s": result["wall_s"]},
    )


@contextlib.contextmanager
def deployment(ctx: Context, system: str, speedup: float) -> Iterator[Target]:
    logs = ctx.work / "logs" / f"{system}-{speedup:g}-{uuid.uuid4().hex[:6]}"
    if system in ("zdyn", "zdyn-rate"):
        with zdyn_deployment(ctx.model_dir, speedup, ctx.engine, logs, ctx.log_level) as t:
            yield t
    elif system.startswith("dynamo"):
        router = "kv" if system == "dynamo-kv" else "round-robin"
        with dynamo_deployment(ctx.model_dir, speedup, ctx.engine, logs, router) as t:
            yield t
    elif system.startswith("bare-sse"):
        with bare_sse_server(1 if system == "bare-sse-1" else ctx.load.output_len, logs) as t:
            yield t
    else:
        raise ValueError(system)


def idle_workers(row: Row) -> list[str]:
    """Workers that did (almost) nothing while another worked: the run did not use every worker."""
    workers = {k: v for k, v in row.cpu_s.items() if k.startswith("worker-")}
    busiest = max(workers.values(), default=0.0)
    return sorted(k for k, v in workers.items() if busiest > 0 and v < 0.1 * busiest)


def measure(ctx: Context, system: str, rep: int, speedup: float = FAST, load: Load | None = None) -> Row:
    """Start ``system``, drive it with zdyn bench, stop it. The caller holds the shared lock."""
    if system in ZMQ_SYSTEMS:
        row = zmq_row(ctx, system, rep)
    else:
        with deployment(ctx, system, speedup) as target:
            row, _ = run_bench(target, system, rep, speedup, load or ctx.load, ctx.model_dir, ctx.work)
    idle = idle_workers(row)
    if idle:
        row.extra["invalid"] = f"idle during the run: {', '.join(idle)} (left out of every table)"
        print(f"  {system} rep {rep}: INVALID, {row.extra['invalid']}", file=sys.stderr)
    ctx.rows.append(row)
    print(
        f"  {system:17} rep {rep} speedup {speedup:g}: {row.req_s:7.1f} req/s {row.tok_s:9.0f} tok/s "
        f"TTFT p50 {row.ttft_p50:6.1f} ms p99 {row.ttft_p99:6.1f} ms chunks/req {row.chunks_per_req:5.1f} "
        f"failed {row.failed} foreign CPU {row.foreign_cpu_s:.2f} s",
        file=sys.stderr,
        flush=True,
    )
    return row


def aiperf_phase(ctx: Context, speedup: float) -> dict[str, Any]:
    """zdyn bench, then aiperf, then zdyn bench again, against one zdyn deployment (same load shape)."""
    load = ctx.load
    out: dict[str, Any] = {"speedup": speedup, "bench": [], "aiperf": []}
    with bench_lock(), deployment(ctx, "zdyn", speedup) as target:

        def bench(turn: int) -> None:
            row, _ = run_bench(target, "zdyn", turn, speedup, load, ctx.model_dir, ctx.work)
            out["bench"].append(asdict(row))

        bench(0)
        artifacts = ctx.work / f"aiperf-{speedup:g}"
        sampler = CpuSampler(target.groups, "aiperf", "load generator")
        sampler.start()
        res: AiperfResult = aiperf_on(ctx, target, load, artifacts)
        sampler.stop()
        figures: dict[str, Any] = res.figures()
        figures["command"] = (artifacts / "aiperf-run.log").read_text().splitlines()[0].removeprefix("$ ")
        figures.update(aiperf_window_cpu(artifacts / "profile_export.jsonl", sampler))
        out["aiperf"].append(figures)
        bench(1)
    return out


def aiperf_window_cpu(records: Path, sampler: CpuSampler) -> dict[str, Any]:
    """CPU per role over aiperf's measured phase (its 'profiling' records, wall-clock stamped)."""
    starts, ends = [], []
    for line in records.read_text().splitlines():
        meta = json.loads(line)["metadata"]
        if meta.get("benchmark_phase") == "profiling":
            starts.append(meta["request_start_ns"] / 1e9)
            ends.append(meta["request_end_ns"] / 1e9)
    if not starts or not sampler.samples:
        return {}
    t0, t1 = min(starts), max(ends)
    busy, cpu = sampler.window(t0, t1)
    roles = {k: v for k, v in cpu.items() if "/" not in k}
    detail = {k: v for k, v in cpu.items() if "/" in k}
    out: dict[str, Any] = {"window_s": t1 - t0, "cpu_s": roles, "foreign_cpu_s": max(0.0, busy - sum(roles.values()))}
    if detail:
        out["cpu_s_per_process"] = detail
    return out


# -------------------------------------------------------------------------------------- aiperf agreement
AGREE_OUT = RESULTS / "aiperf-agreement.json"
AGREE_TOOLS = ("zdyn bench", "aiperf")
# (label, key): both tools' own summary figures under one key; aiperf's "inter_token_latency" is per-request
# (latency - TTFT) / (OSL - 1), i.e. vLLM's TPOT, so it is compared with zdyn bench's TPOT
AGREE_METRICS = (
    ("req/s", "req_s"),
    ("output tok/s", "tok_s"),
    ("TTFT p50 ms", "ttft_p50"),
    ("TTFT p99 ms", "ttft_p99"),
    ("E2E p50 ms", "e2e_p50"),
    ("TPOT p50 ms (aiperf: inter_token_latency)", "tpot_p50"),
)
AGREE_TOLERANCE_PCT = 3.0  # "a few percent"


@dataclass(slots=True)
class ReqTimes:
    """One measured request as a load generator saw it: seconds on that run's clock."""

    start: float
    ttft: float
    last_token: float  # last content chunk, from start
    end: float  # stream end ([DONE]), absolute
    prompt_tokens: int
    output_tokens: int
    cached_tokens: int
    issued: float  # when the load generator decided to send it (aiperf: credit issued; zdyn bench: = start)


def bench_requests(result_json: Path) -> list[ReqTimes]:
    run = json.loads(result_json.read_text())["runs"][0]
    return [
        ReqTimes(r["start_s"], r["ttft_s"], r["ttft_s"] + sum(r["itl_s"]), r["end_s"], r["prompt_tokens"],
                 r["output_tokens"], r["cached_tokens"] or 0, r["start_s"])
        for r in run["requests"] if r["success"]
    ]  # fmt: skip


def aiperf_requests(records: Path) -> tuple[list[ReqTimes], dict[str, Any]]:
    """The profiling-phase records of aiperf's profile_export.jsonl, and aiperf-only details (credit latency:
    credit issued by its timing manager -> request start in its worker; connections opened)."""
    out, credit, reused, connecting = [], [], [], []
    for line in records.read_text().splitlines():
        rec = json.loads(line)
        meta, m = rec["metadata"], rec["metrics"]
        if meta.get("benchmark_phase") != "profiling" or "time_to_first_token" not in m:
            continue

        def val(name: str, default: float = 0.0, m: dict[str, Any] = m) -> Any:
            return m[name]["value"] if name in m else default

        start = meta["request_start_ns"] / 1e9
        ttft, last = val("time_to_first_token") / 1e3, val("request_latency") / 1e3
        tokens = (int(val("usage_prompt_tokens")), int(val("output_sequence_length")))
        cached = int(val("usage_prompt_cache_read_tokens"))
        out.append(
            ReqTimes(start, ttft, last, meta["request_end_ns"] / 1e9, *tokens, cached, meta["credit_issued_ns"] / 1e9)
        )
        credit.append((meta["request_start_ns"] - meta["credit_issued_ns"]) / 1e6)
        reused.append(val("http_req_connection_reused", 1.0))
        connecting.append(val("http_req_connecting"))
    extra = {
        "credit_to_start_ms_p50": statistics.median(credit) if credit else math.nan,
        "credit_to_start_ms_p99": float(_pct(credit, 99)),
        "connections_opened": int(sum(1 for r in reused if not r)),
        "connect_ms_max": max(connecting, default=0.0),
    }
    return out, extra


def _pct(values: Sequence[float], p: float) -> float:
    if not values:
        return math.nan
    import numpy as np

    return float(np.percentile(np.asarray(values, dtype=float), p))


def closed_loop_stats(reqs: Sequence[ReqTimes], concurrency: int) -> dict[str, float]:
    """The same figures for both tools, from their per-request records. In a closed loop request k + C starts
    when an earlier one has ended: ``pacing gap`` = (k + C)-th start - k-th end (both sorted), the load
    generator's own time between a slot freeing and its next request going out. Little's law ties it together:
    req/s = mean requests in flight / mean time per request."""
    if not reqs:
        return {}
    starts = sorted(r.start for r in reqs)
    ends = sorted(r.end for r in reqs)
    duration = max(ends) - min(starts)
    stream = [r.end - r.start for r in reqs]
    gaps = [1e3 * (starts[k + concurrency] - ends[k]) for k in range(len(reqs) - concurrency)]
    tpot = [(r.last_token - r.ttft) / (r.output_tokens - 1) for r in reqs if r.output_tokens > 1]
    return {
        "requests": len(reqs),
        "duration_s": duration,
        "req_s": len(reqs) / duration,
        "mean_in_flight": sum(stream) / duration,
        "mean_request_s": statistics.fmean(stream),
        "pacing_gap_ms_p50": _pct(gaps, 50),
        "pacing_gap_ms_p90": _pct(gaps, 90),
        "ramp_ms": 1e3 * (starts[min(concurrency, len(starts)) - 1] - starts[0]),
        "drain_ms": 1e3 * (max(ends) - max(starts)),
        "done_after_last_token_ms_p50": _pct([1e3 * (r.end - r.start - r.last_token) for r in reqs], 50),
        "ttft_ms_p50": _pct([1e3 * r.ttft for r in reqs], 50),
        "ttft_ms_p99": _pct([1e3 * r.ttft for r in reqs], 99),
        "e2e_last_token_ms_p50": _pct([1e3 * r.last_token for r in reqs], 50),
        "tpot_ms_p50": _pct([1e3 * t for t in tpot], 50),
        "prompt_tokens": statistics.fmean(r.prompt_tokens for r in reqs),
        "cached_tokens": statistics.fmean(r.cached_tokens for r in reqs),
        "output_tokens": statistics.fmean(r.output_tokens for r in reqs),
    }


def _cpu_pct(cpu_s: dict[str, float], foreign_s: float, window_s: float) -> dict[str, float]:
    pct = {k: 100.0 * v / window_s for k, v in cpu_s.items()}
    pct["other processes"] = 100.0 * foreign_s / window_s
    pct["box"] = 100.0 * (sum(cpu_s.values()) + foreign_s) / window_s
    return pct


def aiperf_on(ctx: Context, target: Target, load: Load, artifacts: Path, **extra: Any) -> AiperfResult:
    """aiperf against ``target`` with ``load``'s shape (closed loop, fixed lengths), artifacts in ``artifacts``."""
    return run_aiperf(
        target.base_url,
        model=target.model,
        tokenizer=ctx.model_dir,
        concurrency=load.concurrency,
        request_count=load.requests,
        input_tokens=load.input_len,
        output_tokens=load.output_len,
        warmup_request_count=load.warmups,
        artifact_dir=artifacts,
        **extra,
    )


def agree_bench_run(ctx: Context, target: Target, load: Load, rnd: int, speedup: float) -> dict[str, Any]:
    row, _ = run_bench(target, "zdyn", rnd, speedup, load, ctx.model_dir, ctx.work)
    reqs = bench_requests(Path(row.extra["result_json"]))
    pct = _cpu_pct(row.cpu_s, row.foreign_cpu_s, row.window_s)
    return {
        "tool": "zdyn bench",
        "round": rnd,
        "seed": load.seed,
        "command": row.command,
        "figures": {
            "req_s": row.req_s,
            "tok_s": row.tok_s,
            "ttft_p50": row.ttft_p50,
            "ttft_p99": row.ttft_p99,
            "e2e_p50": row.e2e_p50,
            "e2e_p99": row.e2e_p99,
            "tpot_p50": row.tpot_p50,
            "completed": row.completed,
            "failed": row.failed,
            "duration_s": row.extra["duration_s"],
        },
        "cpu": {"window_s": row.window_s, "pct": pct, "load_generator_busiest_process_pct": pct["load generator"]},
        "records": closed_loop_stats(reqs, load.concurrency),
        "result_json": row.extra["result_json"],
    }


def agree_aiperf_run(ctx: Context, target: Target, load: Load, rnd: int) -> dict[str, Any]:
    artifacts = ctx.work / f"aiperf-agree-{rnd}"
    sampler = CpuSampler(target.groups, "aiperf", "load generator", detail=True)
    sampler.start()
    try:
        res = aiperf_on(
            ctx, target, load, artifacts, random_seed=load.seed,
            # one distinct prompt per request, as zdyn bench sends (aiperf's default pool is 100 prompts, reused:
            # repeats would hit the mocker's prefix cache and shorten their prefill)
            extra_args=["--num-dataset-entries", str(load.requests + load.warmups)],
        )  # fmt: skip
    finally:
        sampler.stop()
    records = artifacts / "profile_export.jsonl"
    win = aiperf_window_cpu(records, sampler)
    pct = _cpu_pct(win["cpu_s"], win["foreign_cpu_s"], win["window_s"])
    per_process = {k.split("/", 1)[1]: 100.0 * v / win["window_s"] for k, v in win.get("cpu_s_per_process", {}).items()}
    reqs, extra = aiperf_requests(records)
    stats = closed_loop_stats(reqs, load.concurrency)
    stats.update(extra)
    return {
        "tool": "aiperf",
        "round": rnd,
        "seed": load.seed,
        "command": (artifacts / "aiperf-run.log").read_text().splitlines()[0].removeprefix("$ "),
        "figures": {
            "req_s": res.request_throughput,
            "tok_s": res.output_token_throughput,
            "ttft_p50": res.ttft_p50_ms,
            "ttft_p99": res.ttft_p99_ms,
            "e2e_p50": res.request_latency_p50_ms,
            "e2e_p99": res.request_latency_p99_ms,
            "tpot_p50": res.itl_p50_ms,
            "completed": res.completed_requests,
            "failed": res.error_requests,
            "duration_s": res.duration_s,
        },
        "cpu": {
            "window_s": win["window_s"],
            "pct": pct,
            "per_process_pct": per_process,
            "load_generator_busiest_process_pct": max(per_process.values(), default=math.nan),
        },
        "records": stats,
        "artifacts": str(artifacts),
    }


def agree_summary(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per figure: each tool's runs, their median and spread, and aiperf's median versus zdyn bench's."""
    out: dict[str, Any] = {}
    for _, key in AGREE_METRICS:
        per_tool = {t: [r["figures"][key] for r in runs if r["tool"] == t] for t in AGREE_TOOLS}
        med = {t: statistics.median(v) if v else math.nan for t, v in per_tool.items()}
        b, a = med["zdyn bench"], med["aiperf"]
        out[key] = {
            "runs": per_tool,
            "median": med,
            "spread_pct": {t: 100.0 * (max(v) - min(v)) / med[t] if v else math.nan for t, v in per_tool.items()},
            "aiperf_vs_bench_pct": 100.0 * (a - b) / b if b else math.nan,
        }
    return out


def agree_report(doc: dict[str, Any]) -> None:
    s, runs = doc["settings"], doc["runs"]
    load = s["load"]
    print(f"\naiperf vs zdyn bench on one zdyn deployment (frontend + {s['engine']['workers']} mocker workers at "
          f"speedup {s['speedup']:g}): closed loop, concurrency {load['concurrency']}, {load['requests']} measured "
          f"requests after {load['warmups']} warm-ups, {load['input_len']} in / {load['output_len']} out "
          f"(ignore_eos), streaming; runs alternate {' / '.join(r['tool'] for r in runs)}")  # fmt: skip
    summary = doc["summary"]
    rows = []
    for label, key in AGREE_METRICS:
        x = summary[key]
        diff = x["aiperf_vs_bench_pct"]
        rows.append([label, ", ".join(fmt(v) for v in x["runs"]["zdyn bench"]), fmt(x["median"]["zdyn bench"]),
                     ", ".join(fmt(v) for v in x["runs"]["aiperf"]), fmt(x["median"]["aiperf"]), f"{diff:+.1f}%",
                     f"{x['spread_pct']['zdyn bench']:.1f}% / {x['spread_pct']['aiperf']:.1f}%"])  # fmt: skip
    print(table(["figure (each tool's own summary)", "zdyn bench runs", "median", "aiperf runs", "median",
                 "aiperf vs bench", "spread of runs bench / aiperf"], rows))  # fmt: skip
    worst = max(abs(summary[k]["aiperf_vs_bench_pct"]) for _, k in AGREE_METRICS)
    print(f"largest difference of medians: {worst:.1f}% (tolerance {AGREE_TOLERANCE_PCT:g}%: "
          f"{'agree' if worst <= AGREE_TOLERANCE_PCT else 'DISAGREE'})")  # fmt: skip

    print("\nCPU over each measured window, % of one core (2 cores = 200%)")
    rows = []
    for r in runs:
        c = r["cpu"]["pct"]
        lg = r["cpu"].get("per_process_pct") or {}
        busiest = max(lg.items(), key=lambda kv: kv[1], default=None)
        rows.append([f"{r['tool']} #{r['round']}", f"{r['cpu']['window_s']:.1f}", f"{c.get('frontend', 0):.1f}",
                     f"{c.get('worker-0', 0):.1f}", f"{c.get('worker-1', 0):.1f}", f"{c.get('load generator', 0):.1f}",
                     f"{r['cpu']['load_generator_busiest_process_pct']:.1f}"
                     + (f" ({busiest[0].split(' #')[0]})" if busiest else ""),
                     f"{c['other processes']:.1f}", f"{c['box']:.1f}"])  # fmt: skip
    print(table(["run", "window s", "frontend", "worker-0", "worker-1", "load generator", "busiest load-gen process",
                 "other procs", "whole box"], rows))  # fmt: skip

    print("\nthe same figures recomputed from each tool's per-request records, one definition for both (medians of "
          "runs); E2E here = to the last content chunk, as aiperf's request_latency")  # fmt: skip
    keys = (
        ("req/s = requests / (last end - first start)", "req_s"),
        ("mean requests in flight (Little)", "mean_in_flight"),
        ("mean time per request, start to stream end, ms", "mean_request_s"),
        ("pacing gap p50 ms (slot freed -> next request sent)", "pacing_gap_ms_p50"),
        ("pacing gap p90 ms", "pacing_gap_ms_p90"),
        ("ramp ms (first to C-th start)", "ramp_ms"),
        ("drain ms (last start to last end)", "drain_ms"),
        ("[DONE] after last content chunk p50 ms", "done_after_last_token_ms_p50"),
        ("TTFT p50 ms", "ttft_ms_p50"),
        ("TTFT p99 ms", "ttft_ms_p99"),
        ("E2E p50 ms (to last content chunk)", "e2e_last_token_ms_p50"),
        ("TPOT p50 ms", "tpot_ms_p50"),
        ("prompt tokens / request (server count)", "prompt_tokens"),
        ("cached prompt tokens / request", "cached_tokens"),
        ("output tokens / request", "output_tokens"),
        ("aiperf: credit issued -> request start p50 ms", "credit_to_start_ms_p50"),
        ("aiperf: credit issued -> request start p99 ms", "credit_to_start_ms_p99"),
        ("aiperf: connections opened in the measured phase", "connections_opened"),
    )
    rows = []
    for label, key in keys:
        vals = {t: [r["records"][key] for r in runs if r["tool"] == t and key in r["records"]] for t in AGREE_TOOLS}
        scale = 1e3 if key == "mean_request_s" else 1.0
        med = {t: statistics.median(v) * scale if v else math.nan for t, v in vals.items()}
        b, a = med["zdyn bench"], med["aiperf"]
        diff = f"{100.0 * (a - b) / b:+.1f}%" if b and not math.isnan(a) and not math.isnan(b) else ""
        rows.append([label, fmt(b), fmt(a), diff])
    print(table(["from per-request records", "zdyn bench", "aiperf", "aiperf vs bench"], rows))

    print("\ncommands (from the repo root; URL, seeds and paths differ per run):")
    print(f"  reproduce:  {doc['command']}")
    for tool in AGREE_TOOLS:
        first = next((r for r in runs if r["tool"] == tool), None)
        if first:
            print(f"  {tool} #{first['round']}: {first['command']}")


def agree_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.ceiling agree",
        description="aiperf and zdyn bench, alternately, against one zdyn deployment under a calm load "
        "(neither load generator nor server CPU-bound); compares their figures.",
    )
    p.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL)
    p.add_argument("--speedup", type=float, default=1.0, help="mocker speedup (default 1: real time)")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--warmups", type=int, default=16)
    p.add_argument("--input-len", type=int, default=200)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3, help="runs of each tool, alternating (bench first)")
    p.add_argument("--zdyn-log-level", default="info")
    p.add_argument("--out", type=Path, default=AGREE_OUT)
    p.add_argument("--report", type=Path, default=None, help="only print the tables of a finished run's JSON")
    return p


def agree_main(argv: Sequence[str]) -> int:
    args = agree_parser().parse_args(argv)
    if args.report is not None:
        agree_report(json.loads(args.report.read_text()))
        return 0
    command = shlex.join(["python", "-m", "benchmarks.ceiling", "agree", *argv])
    if not (args.model_dir / "config.json").exists():
        print(f"no model at {args.model_dir}: python -m zdyn.models tiny {args.model_dir}", file=sys.stderr)
        return 2
    load = Load(concurrency=args.concurrency, requests=args.requests, warmups=args.warmups,
                input_len=args.input_len, output_len=args.output_len)  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix="zdyn-agree-"))
    ctx = Context(args.model_dir, load, Engine(), work, args.zdyn_log_level)
    doc: dict[str, Any] = {
        "benchmark": "aiperf-agreement",
        "command": command,
        "cwd": str(REPO),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": {"node": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "code": code_version(),
        "settings": {"load": asdict(load), "engine": asdict(Engine()), "speedup": args.speedup,
                     "rounds": args.rounds, "zdyn_log_level": args.zdyn_log_level, "lock": BENCH_LOCK,
                     "work_dir": str(work), "tolerance_pct": AGREE_TOLERANCE_PCT,
                     "seeds": "round k: zdyn bench --seed k+1, aiperf --random-seed k+101 (fresh prompts per run)"},
        "runs": [],
    }  # fmt: skip
    t0 = time.monotonic()
    print(f"agree: zdyn at speedup {args.speedup:g}; {args.rounds} x (zdyn bench, aiperf), one deployment",
          file=sys.stderr)  # fmt: skip
    with bench_lock(), deployment(ctx, "zdyn", args.speedup) as target:
        for rnd in range(args.rounds):
            for tool in AGREE_TOOLS:
                if tool == "zdyn bench":
                    run = agree_bench_run(ctx, target, Load(**{**asdict(load), "seed": rnd + 1}), rnd, args.speedup)
                else:
                    run = agree_aiperf_run(ctx, target, Load(**{**asdict(load), "seed": rnd + 101}), rnd)
                doc["runs"].append(run)
                f, c = run["figures"], run["cpu"]["pct"]
                print(f"  {tool:10} #{rnd}: {f['req_s']:.2f} req/s {f['tok_s']:.0f} tok/s TTFT p50 {f['ttft_p50']:.1f} "
                      f"p99 {f['ttft_p99']:.1f} E2E p50 {f['e2e_p50']:.1f} TPOT p50 {f['tpot_p50']:.2f} ms; CPU "
                      f"frontend {c.get('frontend', 0):.0f}% load generator {c.get('load generator', 0):.0f}% "
                      f"box {c['box']:.0f}%", file=sys.stderr, flush=True)  # fmt: skip
    doc["wall_s"] = time.monotonic() - t0
    doc["summary"] = agree_summary(doc["runs"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    agree_report(doc)
    print(f"\nresults: {args.out}")
    return 0


# ----------------------------------------------------------------------------------------------- profile
PROFILE_BUCKETS = (
    ("tokenize: chat template + encode", "tokenize (zdyn/processor.py"),
    ("  of which apply_chat_template", "apply_chat_template ("),
    ("detokenize (Detokenizer.step/finish)", "zdyn/detokenizer.py"),
    ("HTTP: uvicorn httptools protocol", "uvicorn/protocols/http/httptools_impl.py"),
    ("starlette routing/request", "starlette/"),
    ("frontend: parse_request", "parse_request (zdyn/frontend/openai.py"),
    ("frontend: SSE chunks + JSON", "_stream (zdyn/frontend/app.py"),
    ("Hub._read: ZMQ recv + decode + dispatch", "_read (zdyn/rpc.py"),
    ("Hub.stream / _Stream.next", "stream (zdyn/rpc.py"),
    ("pyzmq (zmq/_future.py)", "zmq/_future.py"),
    ("logging", "logging/__init__.py"),
    ("prometheus metrics", "prometheus_client/"),
    ("Spoke._serve / _flush (worker side)", "_serve (zdyn/rpc.py"),
    ("mocker engine step", "zdyn/engines/mocker/"),
)


def summarize_profile(raw: Path, top: int = 25) -> dict[str, Any]:
    """py-spy raw (collapsed) stacks -> total samples, top self frames, inclusive share of named buckets."""
    self_counts: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    buckets: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")[1:]]  # drop the thread frame and lines
        if frames:
            self_counts[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
        joined = ";".join(frames)
        for label, pattern in PROFILE_BUCKETS:
            if pattern in joined:
                buckets[label] += count
    share = {k: round(100.0 * v / total, 1) for k, v in buckets.most_common()} if total else {}
    return {
        "samples": total,
        "bucket_pct_inclusive": share,
        "top_self": [(f, round(100.0 * c / total, 1)) for f, c in self_counts.most_common(top)],
        "top_inclusive": [(f, round(100.0 * c / total, 1)) for f, c in inclusive.most_common(top)],
    }


def profile_phase(ctx: Context, seconds: float = 5.0, rate: int = 200) -> dict[str, Any]:
    """py-spy (``--nonblocking``, ``rate`` Hz) on zdyn's frontend and worker-0 for ``seconds``, started once the
    measured phase of a longer run of the same load has begun."""
    long = Load(**{**asdict(ctx.load), "requests": max(ctx.load.requests, 8000)})
    out: dict[str, Any] = {"seconds": seconds, "rate_hz": rate, "load": asdict(long)}
    files = {role: RESULTS / f"ceiling-pyspy-{role}.txt" for role in ("frontend", "worker-0")}
    with bench_lock(), deployment(ctx, "zdyn", FAST) as target:
        result = ctx.work / "bench-profile.json"
        argv = bench_argv(target.base_url, target.model, ctx.model_dir, long, result, "zdyn profile")
        bench = subprocess.Popen(
            [sys.executable, "-m", "zdyn.cli", *argv[1:]],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            start_new_session=True,
        )
        started = threading.Event()
        assert bench.stderr is not None
        reader = threading.Thread(target=_reader, args=(bench.stderr, [], START_MARK, started.set))
        reader.start()
        if not started.wait(120):
            bench.kill()
            raise RuntimeError("the profiling load never started")
        spies = [
            subprocess.Popen(
                [
                    "py-spy",
                    "record",
                    "-p",
                    str(target.groups[role]),
                    "-d",
                    f"{seconds:g}",
                    "-r",
                    str(rate),
                    "-f",
                    "raw",
                    "-o",
                    str(path),
                    "--nonblocking",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )  # fmt: skip
            for role, path in files.items()
        ]
        for spy in spies:
            spy.wait(seconds + 30)
        still_running = bench.poll() is None
        bench.wait(600)
        reader.join(10)
        out["load_still_running_when_profiling_ended"] = still_running
        out["py_spy_command"] = f"py-spy record -p PID -d {seconds:g} -r {rate} -f raw -o FILE --nonblocking"
        for role, path in files.items():
            out[role] = summarize_profile(path) if path.exists() else {"error": "py-spy wrote nothing"}
            out[role]["file"] = str(path.relative_to(REPO))
    return out


# ------------------------------------------------------------------------------------------------ report
def rows_of(rows: Sequence[Row], system: str, speedup: float | None = FAST) -> list[Row]:
    """The valid runs of ``system`` at ``speedup`` (runs that left a worker idle are not comparable)."""
    return [
        r
        for r in rows
        if r.system == system
        and (speedup is None or r.speedup == speedup or system in ZMQ_SYSTEMS)
        and not idle_workers(r)
    ]


def median_of(rows: Sequence[Row], attr: str) -> float:
    values = [getattr(r, attr) for r in rows if not math.isnan(getattr(r, attr))]
    return med_range(values)[0] if values else math.nan


def mr(rows: Sequence[Row], attr: str) -> str:
    values = [getattr(r, attr) for r in rows if not math.isnan(getattr(r, attr))]
    if not values:
        return "n/a"
    m, lo, hi = med_range(values)
    return fmt(m) if len(values) == 1 else f"{fmt(m)} ({fmt(lo)}-{fmt(hi)})"


def cpu_cell(rows: Sequence[Row], role: str) -> str:
    values = [r.cpu_pct(role) for r in rows if not math.isnan(r.cpu_pct(role))]
    if not values or all(v == 0 for v in values):
        return "-"
    m, lo, hi = med_range(values)
    per_req = statistics.median(r.cpu_ms_per_req(role) for r in rows)
    return f"{m:.0f}% ({lo:.0f}-{hi:.0f}) {per_req:.2f} ms/req"


LABELS = {
    "zdyn": "zdyn (frontend + 2 mocker procs)",
    "dynamo": "Dynamo 1.6.1 round-robin",
    "dynamo-kv": "Dynamo 1.6.1 kv router (info)",
    "zdyn-rate": "zdyn, open loop",
    "dynamo-rate": "Dynamo 1.6.1 round-robin, open loop",
    "bare-sse": "bare uvicorn SSE, 64 chunks",
    "bare-sse-1": "bare uvicorn SSE, 1 chunk",
    "bare-zmq": "bare pyzmq, msg/token (no HTTP)",
    "bare-zmq-batched": "bare pyzmq, msg/step (no HTTP)",
    "zdyn-rpc": "zdyn Hub/Spoke (no HTTP)",
}


def main_table(rows: Sequence[Row], systems: Sequence[str]) -> str:
    out = []
    for s in systems:
        rs = rows_of(rows, s)
        if rs:
            out.append([LABELS.get(s, s), str(len(rs)), mr(rs, "req_s"), mr(rs, "tok_s"), mr(rs, "ttft_p50"),
                        mr(rs, "ttft_p99"), mr(rs, "e2e_p50"), mr(rs, "chunks_per_req"),
                        str(sum(r.failed for r in rs))])  # fmt: skip
    headers = [
        "system",
        "n",
        "req/s",
        "output tok/s",
        "TTFT p50 ms",
        "TTFT p99 ms",
        "E2E p50 ms",
        "chunks/req",
        "failed",
    ]
    return table(headers, out)


def cpu_table(rows: Sequence[Row], systems: Sequence[str]) -> str:
    out = []
    for s in systems:
        rs = rows_of(rows, s)
        if rs:
            foreign = statistics.median(100 * r.foreign_cpu_s / r.window_s for r in rs)
            out.append([LABELS.get(s, s), cpu_cell(rs, "frontend"), cpu_cell(rs, "workers"),
                        cpu_cell(rs, "load generator"), f"{foreign:.0f}%",
                        f"{statistics.median(r.window_s for r in rs):.2f}"])  # fmt: skip
    headers = ["system", "frontend CPU", "workers CPU (sum)", "load generator CPU", "other procs", "window s"]
    return table(headers, out)


def ratio(a: float, b: float) -> float:
    return a / b if b else math.nan


def comparisons(rows: Sequence[Row]) -> dict[str, Any]:
    z, d = rows_of(rows, "zdyn"), rows_of(rows, "dynamo")
    sse, sse1 = rows_of(rows, "bare-sse"), rows_of(rows, "bare-sse-1")
    out: dict[str, Any] = {}
    if z and d:
        out["zdyn_over_dynamo"] = {
            "req_s": ratio(median_of(z, "req_s"), median_of(d, "req_s")),
            "tok_s": ratio(median_of(z, "tok_s"), median_of(d, "tok_s")),
            "ttft_p50": ratio(median_of(z, "ttft_p50"), median_of(d, "ttft_p50")),
            "ttft_p99": ratio(median_of(z, "ttft_p99"), median_of(d, "ttft_p99")),
            "e2e_p50": ratio(median_of(z, "e2e_p50"), median_of(d, "e2e_p50")),
        }
        # per-repetition ratios (the runs of one repetition were back to back)
        pairs = [(a, b) for a in z for b in d if a.rep == b.rep]
        out["zdyn_over_dynamo_per_rep_req_s"] = [round(a.req_s / b.req_s, 3) for a, b in pairs]
    for name, ref in (("bare-sse", sse), ("bare-sse-1", sse1)):
        if z and ref:
            out[f"zdyn_vs_{name}"] = {
                "ttft_p50_added_ms": median_of(z, "ttft_p50") - median_of(ref, "ttft_p50"),
                "req_s_fraction": ratio(median_of(z, "req_s"), median_of(ref, "req_s")),
            }
    return out


def print_comparisons(cmp: dict[str, Any], which: str) -> None:
    if "zdyn_over_dynamo" in cmp:
        r = cmp["zdyn_over_dynamo"]
        target = "target: req/s and tok/s >= 1.0, TTFT p50 <= 1.0"
        print(f"\nzdyn / Dynamo (medians of {which}; {target})")
        print(table(["req/s", "output tok/s", "TTFT p50", "TTFT p99", "E2E p50", "req/s per repetition"],
                    [[fmt(r["req_s"]), fmt(r["tok_s"]), fmt(r["ttft_p50"]), fmt(r["ttft_p99"]), fmt(r["e2e_p50"]),
                      ", ".join(f"{x:.2f}" for x in cmp["zdyn_over_dynamo_per_rep_req_s"])]]))  # fmt: skip
    rows = []
    for name in ("bare-sse", "bare-sse-1"):
        c = cmp.get(f"zdyn_vs_{name}")
        if c:
            rows.append([LABELS[name], f"{c['ttft_p50_added_ms']:+.1f}", f"{100 * c['req_s_fraction']:.0f}%"])
    if rows:
        print(f"\nzdyn versus the bare HTTP ceiling (medians of {which})")
        print(table(["reference", "zdyn TTFT p50 added (ms)", "zdyn req/s as % of it"], rows))


def real_time_rows(rows: Sequence[Row]) -> list[Row]:
    """Valid runs with engine time (speedup below 1e6), in the order they ran."""
    return [r for r in rows if r.speedup < FAST and r.system not in ZMQ_SYSTEMS and not idle_workers(r)]


def speedup1_table(rows: Sequence[Row]) -> str:
    out = []
    for r in real_time_rows(rows):
        out.append([LABELS[r.system].split(" (")[0], f"{r.speedup:g}", fmt(r.req_s), fmt(r.tok_s), fmt(r.ttft_p50),
                    fmt(r.ttft_p99), fmt(r.itl_p50), fmt(r.itl_p99), fmt(r.tpot_p50), fmt(r.e2e_p50),
                    fmt(r.chunks_per_req), f"{r.cpu_pct('frontend'):.0f}%"])  # fmt: skip
    headers = ["system", "speedup", "req/s", "output tok/s", "TTFT p50", "TTFT p99", "ITL p50", "ITL p99",
               "TPOT p50", "E2E p50", "chunks/req", "frontend CPU"]  # fmt: skip
    return table(headers, out)


def aiperf_table(phase: dict[str, Any]) -> str:
    benches = phase["bench"]
    ai = phase["aiperf"][0]

    def b(key: str) -> float:
        return statistics.fmean(x[key] for x in benches)

    rows_spec = [
        ("req/s", b("req_s"), ai["request_throughput"]),
        ("output tok/s", b("tok_s"), ai["output_token_throughput"]),
        ("TTFT p50 ms", b("ttft_p50"), ai["ttft_p50_ms"]),
        ("TTFT p99 ms", b("ttft_p99"), ai["ttft_p99_ms"]),
        ("ITL p50 ms: bench ITL (chunk gaps) vs aiperf ITL", b("itl_p50"), ai["itl_p50_ms"]),
        ("ITL p50 ms: bench TPOT (per request) vs aiperf ITL", b("tpot_p50"), ai["itl_p50_ms"]),
        ("E2E / request latency p50 ms", b("e2e_p50"), ai["request_latency_p50_ms"]),
        ("prompt tokens / request", b("prompt_tokens_per_req"), ai["input_tokens_avg"]),
        ("output tokens / request", b("out_tokens_per_req"), ai["output_tokens_avg"]),
    ]
    if ai.get("cpu_s"):
        bench_rows = [Row(**x) for x in benches]
        for role in ("frontend", "workers", "load generator"):
            ai_cpu = sum(
                v for k, v in ai["cpu_s"].items() if k == role or (role == "workers" and k.startswith("worker"))
            )
            rows_spec.append(
                (f"CPU % of a core: {role}", statistics.fmean(r.cpu_pct(role) for r in bench_rows),
                 100.0 * ai_cpu / ai["window_s"])
            )  # fmt: skip
        rows_spec.append(("measured window s", statistics.fmean(r.window_s for r in bench_rows), ai["window_s"]))
    out = []
    for name, bench_value, aiperf_value in rows_spec:
        diff = 100.0 * (aiperf_value - bench_value) / bench_value if abs(bench_value) > 0.01 else math.nan
        out.append([name, fmt(bench_value), fmt(aiperf_value), "n/a" if math.isnan(diff) else f"{diff:+.1f}%"])
    bench_runs = ", ".join(f"{x['req_s']:.0f}" for x in benches)
    out.append(["(zdyn bench req/s, each run)", bench_runs, "", ""])
    return table(["metric", "zdyn bench (mean of 2)", "aiperf", "aiperf vs bench"], out)


PLOT_LABELS = {
    "zdyn": "zdyn",
    "dynamo": "Dynamo\nround-robin",
    "dynamo-kv": "Dynamo kv\n(info)",
    "bare-sse": "bare SSE\n64 chunks",
    "bare-sse-1": "bare SSE\n1 chunk",
    "bare-zmq": "pyzmq\nmsg/token",
    "bare-zmq-batched": "pyzmq\nmsg/step",
    "zdyn-rpc": "zdyn\nHub/Spoke",
    "zdyn-rate": "zdyn",
    "dynamo-rate": "Dynamo",
}


def _color(system: str) -> str:
    return "C0" if system.startswith("zdyn") else "C1" if system.startswith("dynamo") else "C7"


def plot(doc: dict[str, Any], out: Path) -> None:
    """2 x 3 panels: throughput, TTFT, CPU (speedup 1e6); same-load latency; engine-time runs; aiperf vs bench."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = [Row(**r) for r in doc["rows"]]
    systems = [s for s in (*MAIN_SYSTEMS, "dynamo-kv") if rows_of(rows, s)]
    fig, axes = plt.subplots(2, 3, figsize=(20, 10))
    x = np.arange(len(systems))
    labels = [PLOT_LABELS.get(s, s) for s in systems]

    ax = axes[0][0]
    med = [median_of(rows_of(rows, s), "req_s") for s in systems]
    lo = [m - min(r.req_s for r in rows_of(rows, s)) for m, s in zip(med, systems, strict=True)]
    hi = [max(r.req_s for r in rows_of(rows, s)) - m for m, s in zip(med, systems, strict=True)]
    ax.bar(x, med, yerr=[lo, hi], capsize=4, color=[_color(s) for s in systems])
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylabel("req/s")
    ax.set_title("speedup 1e6: request throughput (median, range)")
    ax.grid(axis="y", alpha=0.3)

    ax = axes[0][1]
    for k, (attr, label) in enumerate((("ttft_p50", "TTFT p50"), ("ttft_p99", "TTFT p99"), ("e2e_p50", "E2E p50"))):
        ax.bar(x + (k - 1) * 0.27, [median_of(rows_of(rows, s), attr) for s in systems], 0.27, label=label)
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylabel("ms")
    ax.set_title("speedup 1e6: latency (medians; zmq rows: first / last delta)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)

    ax = axes[0][2]
    rate = [s for s in RATE_SYSTEMS if rows_of(rows, s)]
    if rate:
        xr = np.arange(3)
        for k, s in enumerate(rate):
            vals = [median_of(rows_of(rows, s), a) for a in ("ttft_p50", "ttft_p99", "e2e_p50")]
            ax.bar(xr + (k - 0.5) * 0.4, vals, 0.4, label=PLOT_LABELS[s], color=_color(s))
        ax.set_xticks(xr, ["TTFT p50", "TTFT p99", "E2E p50"])
        ax.set_ylabel("ms")
        rl = doc["settings"].get("rate_load", {})
        ax.set_title(f"same offered load: {rl.get('request_rate', 0):g} req/s Poisson (medians)")
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    else:
        ax.axis("off")

    ax = axes[1][0]
    bottom = np.zeros(len(systems))
    for role, color in (("frontend", "C0"), ("workers", "C2"), ("load generator", "C3")):
        shares = np.array([statistics.median(r.cpu_pct(role) if not math.isnan(r.cpu_pct(role)) else 0.0
                                             for r in rows_of(rows, s)) for s in systems])  # fmt: skip
        ax.bar(x, shares, bottom=bottom, label=role, color=color)
        bottom += shares
    foreign = np.array([statistics.median(100 * r.foreign_cpu_s / r.window_s for r in rows_of(rows, s))
                        for s in systems])  # fmt: skip
    ax.bar(x, foreign, bottom=bottom, label="other processes", color="C7", alpha=0.5)
    ax.axhline(200, color="k", lw=0.8, ls="--")
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylabel("% of one core (2 cores = 200 %)")
    ax.set_title("speedup 1e6: CPU over the measured window (medians)")
    ax.legend(fontsize=8, loc="lower right")

    ax = axes[1][1]
    s1 = real_time_rows(rows)
    if s1:
        names = [f"{PLOT_LABELS.get(r.system, r.system)}\nspeedup {r.speedup:g}" for r in s1]
        xs = np.arange(len(s1))
        attrs = (("ttft_p50", "TTFT p50"), ("itl_p50", "ITL p50"), ("itl_p99", "ITL p99"), ("tpot_p50", "TPOT p50"))
        for k, (attr, label) in enumerate(attrs):
            ax.bar(xs + (k - 1.5) * 0.2, [getattr(r, attr) for r in s1], 0.2, label=label)
        ax.set_yscale("log")
        ax.set_xticks(xs, names, fontsize=8)
        ax.set_ylabel("ms (log)")
        ax.set_title("with engine time (each mocker's own timing model)")
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    else:
        ax.axis("off")

    ax = axes[1][2]
    phases = doc.get("aiperf", [])
    if phases:
        metrics = (
            ("req/s", "req_s", "request_throughput"),
            ("TTFT p50", "ttft_p50", "ttft_p50_ms"),
            ("E2E p50", "e2e_p50", "request_latency_p50_ms"),
            ("TPOT/ITL p50", "tpot_p50", "itl_p50_ms"),
        )
        xa = np.arange(len(metrics))
        for k, ph in enumerate(phases):
            bench = {m: statistics.fmean(b[m] for b in ph["bench"]) for _, m, _ in metrics}
            ai = ph["aiperf"][0]
            vals = [ai[a] / bench[m] if bench[m] > 0.01 else math.nan for _, m, a in metrics]
            ax.bar(xa + (k - 0.5) * 0.4, vals, 0.4, label=f"speedup {ph['speedup']:g}")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(xa, [m[0] for m in metrics])
        ax.set_ylabel("aiperf / zdyn bench")
        ax.set_title("aiperf vs zdyn bench, same zdyn deployment")
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    else:
        ax.axis("off")

    load = doc["settings"]["load"]
    fig.suptitle(f"zdyn vs Dynamo 1.6.1 and bare ceilings: concurrency {load['concurrency']}, {load['requests']} "
                 f"requests, {load['input_len']} in / {load['output_len']} out, 2 mocker workers, 2 cores")  # fmt: skip
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


# -------------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ceiling", description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL, help="config + tokenizer (default %(default)s)")
    p.add_argument("--reps", type=int, default=3, help="repetitions of the main systems, alternating")
    p.add_argument("--systems", default=",".join(MAIN_SYSTEMS), help="main systems (default: all)")
    p.add_argument("--phases", default=",".join(PHASES), help=f"which of {', '.join(PHASES)} (default: all)")
    p.add_argument("--requests", type=int, default=500)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--warmups", type=int, default=32)
    p.add_argument("--rate", type=float, default=400.0, help="offered load of the 'rate' phase, req/s")
    p.add_argument("--rate-reps", type=int, default=3, help="repetitions of the 'rate' phase")
    p.add_argument("--zdyn-log-level", default="info", help="zdyn's log level (default info, as shipped)")
    p.add_argument("--out", type=Path, default=RESULTS / "ceiling.json")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve-sse"]:
        sp = argparse.ArgumentParser(prog="python -m benchmarks.ceiling serve-sse")
        sp.add_argument("--port", type=int, default=8000)
        sp.add_argument("--chunks", type=int, default=64, help="content chunks per response")
        a = sp.parse_args(argv[1:])
        serve_sse(a.port, a.chunks)
        return 0
    if argv[:1] == ["agree"]:
        return agree_main(argv[1:])
    if argv[:1] == ["report"]:  # report RESULT.json: print the tables and redraw the plot of a finished run
        path = Path(argv[1]) if len(argv) > 1 else RESULTS / "ceiling.json"
        done: dict[str, Any] = json.loads(path.read_text())
        done["comparisons"] = {
            "all": comparisons([Row(**r) for r in done["rows"]]),
            "clean": comparisons([r for r in (Row(**x) for x in done["rows"]) if is_clean(r)]),
            "clean_threshold_foreign_cpu_fraction": CLEAN_FOREIGN,
        }
        path.write_text(json.dumps(done, indent=1, default=str) + "\n")
        report(done)
        plot(done, path.with_suffix(".png"))
        print(f"\nresults: {path}\nplot:    {path.with_suffix('.png')}\nmeasured with (from {REPO}): {done['command']}")
        return 0
    args = build_parser().parse_args(argv)
    command = shlex.join(["python", "-m", "benchmarks.ceiling", *argv])
    if not (args.model_dir / "config.json").exists():
        print(f"no model at {args.model_dir}: python -m zdyn.models tiny {args.model_dir}", file=sys.stderr)
        return 2
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    load = Load(concurrency=args.concurrency, requests=args.requests, warmups=args.warmups)
    work = Path(tempfile.mkdtemp(prefix="zdyn-ceiling-"))
    ctx = Context(args.model_dir, load, Engine(), work, args.zdyn_log_level)
    doc: dict[str, Any] = {
        "benchmark": "ceiling",
        "command": command,
        "cwd": str(REPO),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": {"node": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "code": code_version(),
        "settings": {
            "load": asdict(load),
            "engine": asdict(Engine()),
            "speedup": FAST,
            "systems": systems,
            "reps": args.reps,
            "zdyn_log_level": args.zdyn_log_level,
            "dynamo_version": DYNAMO_VERSION,
            "lock": BENCH_LOCK,
            "work_dir": str(work),
            "zdyn_bench_command_example": shlex.join(
                bench_argv("http://127.0.0.1:PORT", args.model_dir.name, args.model_dir, load, Path("OUT.json"), "L")
            ),
        },
    }
    t0 = time.monotonic()
    if "main" in phases:
        print(f"main: {len(systems)} systems x {args.reps} repetitions, alternating", file=sys.stderr)
        for rep in range(args.reps):
            order = systems[rep % len(systems) :] + systems[: rep % len(systems)]  # rotate who goes first
            with bench_lock():  # one repetition of every system back to back; others may run in between
                for system in order:
                    measure(ctx, system, rep)
    if "kv" in phases:
        print("kv: Dynamo with its KV router, once", file=sys.stderr)
        with bench_lock():
            measure(ctx, "dynamo-kv", 0)
    if "rate" in phases:
        rate_load = Load(**{**asdict(load), "requests": 2 * load.requests, "request_rate": args.rate})
        doc["settings"]["rate_load"] = asdict(rate_load)
        print(f"rate: zdyn and Dynamo at the same offered load ({args.rate:g} req/s Poisson, at most "
              f"{load.concurrency} in flight), {args.rate_reps} alternating repetitions", file=sys.stderr)  # fmt: skip
        for rep in range(args.rate_reps):
            with bench_lock():
                for system in RATE_SYSTEMS if rep % 2 == 0 else tuple(reversed(RATE_SYSTEMS)):
                    measure(ctx, system, rep, FAST, rate_load)
    if "speedup1" in phases:
        print("speedup1: zdyn and Dynamo at speedup 1, once each; zdyn again with its decode step matched",
              file=sys.stderr)  # fmt: skip
        with bench_lock():
            z = measure(ctx, "zdyn", 0, 1.0)
            d = measure(ctx, "dynamo", 0, 1.0)
            # zdyn's mocker ports an older Dynamo polynomial (decode ~19.4 ms/step at low KV use); Dynamo 1.6.1's
            # built-in model is faster. Scale zdyn's clock so its decode step matches Dynamo's measured ITL.
            matched = round(z.itl_p50 / d.itl_p50, 2) if d.itl_p50 > 0 else 1.0
            measure(ctx, "zdyn", 1, matched)
            doc["speedup_matched"] = {"zdyn_speedup": matched, "zdyn_itl_p50_at_1": z.itl_p50,
                                      "dynamo_itl_p50_at_1": d.itl_p50}  # fmt: skip
    if "aiperf" in phases:
        print("aiperf: aiperf vs zdyn bench against one zdyn deployment (speedup 1e6, then 1)", file=sys.stderr)
        doc["aiperf"] = [aiperf_phase(ctx, FAST), aiperf_phase(ctx, 1.0)]
    if "profile" in phases:
        print("profile: py-spy on zdyn's frontend and worker-0 under the same load", file=sys.stderr)
        doc["profile"] = profile_phase(ctx)
    doc["wall_s"] = time.monotonic() - t0
    doc["rows"] = [asdict(r) for r in ctx.rows]
    doc["comparisons"] = {
        "all": comparisons(ctx.rows),
        "clean": comparisons([r for r in ctx.rows if is_clean(r)]),
        "clean_threshold_foreign_cpu_fraction": CLEAN_FOREIGN,
    }
    report(doc)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    png = args.out.with_suffix(".png")
    if doc["rows"]:
        plot(doc, png)
    print(f"\nresults: {args.out}\nplot:    {png}\nreproduce (from {REPO}): {command}")
    return 0


def is_clean(row: Row) -> bool:
    """Processes outside the run used less than CLEAN_FOREIGN of a core during the measured window."""
    return row.window_s > 0 and row.foreign_cpu_s / row.window_s < CLEAN_FOREIGN


def report(doc: dict[str, Any]) -> None:
    rows = [Row(**r) for r in doc["rows"]]
    shown = [s for s in (*MAIN_SYSTEMS, "dynamo-kv") if rows_of(rows, s)]
    load = doc["settings"]["load"]
    for r in rows:
        if idle_workers(r):
            print(f"left out: {r.system} rep {r.rep} speedup {r.speedup:g} ({r.req_s:.0f} req/s): "
                  f"{', '.join(idle_workers(r))} idle during the run")  # fmt: skip
    if shown:
        print(f"\nspeedup 1e6: concurrency {load['concurrency']}, {load['requests']} requests after "
              f"{load['warmups']} warm-ups, {load['input_len']} in / {load['output_len']} out; "
              "median (range) over all repetitions")  # fmt: skip
        print(main_table(rows, shown))
        clean = [r for r in rows if is_clean(r)]
        if len(clean) < len(rows):
            print(f"\nthe same, only repetitions where other processes used < {100 * CLEAN_FOREIGN:.0f}% of a core "
                  f"({len(rows) - len(clean)} of {len(rows)} runs left out)")  # fmt: skip
            print(main_table(clean, shown))
        print("\nCPU over the measured window (all repetitions): % of one core, median (range), and CPU ms per request")
        print(cpu_table(rows, shown))
        print_comparisons(comparisons(rows), "all repetitions")
        if len(clean) < len(rows):
            print_comparisons(comparisons(clean), f"repetitions with < {100 * CLEAN_FOREIGN:.0f}% foreign CPU")
    rate_rows = [r for sys_ in RATE_SYSTEMS for r in rows_of(rows, sys_)]
    if rate_rows:
        rl = doc["settings"].get("rate_load", {})
        print(f"\nsame offered load: {rl.get('request_rate', 0):g} req/s Poisson (at most {rl.get('concurrency')} in "
              f"flight), {rl.get('requests')} requests; median (range) over repetitions")  # fmt: skip
        print(main_table(rows, RATE_SYSTEMS))
        print(cpu_table(rows, RATE_SYSTEMS))
        z, d = rows_of(rows, "zdyn-rate"), rows_of(rows, "dynamo-rate")
        if z and d:
            ratios = [[fmt(ratio(median_of(z, a), median_of(d, a))) for a in ("ttft_p50", "ttft_p99", "e2e_p50")]]
            print(table(["zdyn/Dynamo TTFT p50", "TTFT p99", "E2E p50"], ratios))
    if real_time_rows(rows):
        print(
            "\nwith engine time (speedup 1 = each mocker's polynomial timing in real time), same load, one run each; ms"
        )
        print(speedup1_table(rows))
        if "speedup_matched" in doc:
            m = doc["speedup_matched"]
            zi, di = m["zdyn_itl_p50_at_1"], m["dynamo_itl_p50_at_1"]
            print(f"zdyn at speedup {m['zdyn_speedup']:g} = its ITL p50 at speedup 1 ({zi:.1f} ms) / Dynamo's "
                  f"({di:.1f} ms): both engines then take about as long per decode step")  # fmt: skip
    for phase in doc.get("aiperf", []):
        print(f"\naiperf vs zdyn bench against the same zdyn deployment, speedup {phase['speedup']:g}")
        print(aiperf_table(phase))
    prof = doc.get("profile")
    if prof:
        for role in ("frontend", "worker-0"):
            p = prof.get(role, {})
            if "bucket_pct_inclusive" in p:
                print(f"\npy-spy {role} ({p['samples']} samples; inclusive % of samples; buckets overlap)")
                print(table(["bucket", "%"], [[k, f"{v:.1f}"] for k, v in p["bucket_pct_inclusive"].items()]))
                print("top self frames: " + "; ".join(f"{f} {v}%" for f, v in p["top_self"][:10]))
    print(
        "\nload generator command (each run; URL and file differ):\n  " + doc["settings"]["zdyn_bench_command_example"]
    )


if __name__ == "__main__":
    sys.exit(main())
