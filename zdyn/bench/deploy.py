"""zdyn deployments for tests and benchmarks, started the way ``examples/<scenario>/run.sh`` starts them.

Every role gets the command line its example script would run (``zdyn <role> -f config.yaml ...``, flags in the
same order, ``--worker-id worker0`` and the like, free ports instead of the fixed ones), in its own process group,
with its output in ``<log_dir>/<role>.log``. The config is the example's ``config.yaml`` with the spec's overrides
and metrics ports for the router and the prefill queue, copied to ``<log_dir>/config.yaml``. Start-up waits for the
frontend, router and prefill queue to answer before the workers start, then until the frontend lists every worker
(and the router and prefill queue theirs); a role that dies meanwhile fails the start with the end of its log.
Stopping sends SIGTERM to every role's process group, waits, then sends SIGKILL.

    with start(ZdynSpec("agg", workers=2, engine="mocker", model=tiny), tmp / "logs") as dep:
        httpx.post(f"{dep.base_url}/v1/completions", json={"model": dep.model, "prompt": "hi"})
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import yaml

from zdyn.bench.procs import (
    ProcessGroup,
    free_port_run,
    free_ports,
    get_json,
    http_up,
    live_workers,
    scrape,
    wait_until,
)
from zdyn.bench.results import REPO
from zdyn.security import KEYS_DIR_ENV, generate

EXAMPLES = REPO / "examples"
SCENARIOS = ("agg", "agg_route", "disagg", "disagg_route")
ENGINES = ("mocker", "vllm")
LOOPBACK = "127.0.0.1"
PREFILL_SETTLE_S = 1.5  # the prefill queue publishes its status once a second; until a decode worker has heard it,
# it prefills locally


@dataclass(frozen=True)
class ZdynSpec:
    """What to start: one of the four scenarios with N workers, as run.sh's environment variables would ask."""

    scenario: str = "agg"
    workers: int = 1  # agg, agg_route: workers; disagg, disagg_route: decode workers (ZDYN_NUM_WORKERS)
    prefill_workers: int = 1  # disagg, disagg_route (ZDYN_NUM_PREFILL_WORKERS)
    engine: str = "mocker"  # ZDYN_ENGINE
    model: str | None = None  # a model folder or id (ZDYN_MODEL); None: the config's default
    worker_args: tuple[str, ...] = ()  # run.sh's own arguments, which it passes to every worker
    processors: int = 0  # agg: separate processor processes (ZDYN_NUM_PROCESSORS)
    router_in_process: bool = False  # agg_route: the frontend routes itself (ZDYN_ROUTER_IN_PROCESS=1)
    router_mode: str | None = None  # agg_route, disagg_route: ZDYN_ROUTER_MODE (run.sh's default: kv)
    config: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # merged over the example's config.yaml
    env: Mapping[str, str] = field(default_factory=dict)  # added to every role's environment

    def __post_init__(self) -> None:
        if self.scenario not in SCENARIOS:
            raise ValueError(f"scenario must be one of {SCENARIOS}, not {self.scenario!r}")
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, not {self.engine!r}")
        if self.workers < 1:
            raise ValueError("a deployment needs at least one worker")
        if self.disagg and self.prefill_workers < 1:
            raise ValueError(f"{self.scenario} needs at least one prefill worker")
        if self.processors and self.scenario != "agg":
            raise ValueError("separate processors are an agg option")
        if self.router_in_process and self.scenario != "agg_route":
            raise ValueError("router_in_process is an agg_route option")
        if self.router_mode is not None and not self.routed:
            raise ValueError(f"{self.scenario} has no router")

    @property
    def routed(self) -> bool:
        return self.scenario.endswith("_route")

    @property
    def disagg(self) -> bool:
        return self.scenario.startswith("disagg")

    @property
    def router_process(self) -> bool:
        return self.routed and not self.router_in_process


@dataclass(frozen=True)
class Ports:
    http: int
    workers: int  # the frontend's hub (without separate processors)
    processors: int  # the frontend's processor hub; processor i's workers hub is +1+i (run.sh's layout)
    router: int  # where processors ask; workers register at +1
    queue: int  # prefill queue jobs; prefill workers +1, status +2 (the decode workers derive +2)
    router_metrics: int
    queue_metrics: int

    @classmethod
    def free(cls, spec: ZdynSpec) -> Ports:
        processors = free_port_run(1 + spec.processors)
        router, queue = free_port_run(2), free_port_run(3)
        taken = {*range(processors, processors + 1 + spec.processors), router, router + 1, *range(queue, queue + 3)}
        http, workers, router_metrics, queue_metrics = [p for p in free_ports(4 + len(taken)) if p not in taken][:4]
        return cls(http, workers, processors, router, queue, router_metrics, queue_metrics)


@dataclass(frozen=True)
class Role:
    name: str
    argv: list[str]


def config_for(spec: ZdynSpec, ports: Ports) -> dict[str, Any]:
    """The example's config.yaml with the spec's sections merged over it and the metrics ports set."""
    config: dict[str, Any] = yaml.safe_load((EXAMPLES / spec.scenario / "config.yaml").read_text())
    if spec.router_process:
        config.setdefault("Router", {})["metrics-port"] = ports.router_metrics
    if spec.disagg:
        config.setdefault("PrefillQueue", {})["metrics-port"] = ports.queue_metrics
    for section, values in spec.config.items():
        config.setdefault(section, {}).update(values)
    return config


def plan(spec: ZdynSpec, ports: Ports, config: Path, bind_host: str = LOOPBACK) -> list[Role]:
    """The roles in run.sh's order with the command lines run.sh and the role scripts would run (pure)."""
    cfg = ["-f", str(config)]
    model = ["--model", spec.model] if spec.model is not None else []
    frontend = ["zdyn", "frontend", *cfg, *model, "--port", str(ports.http), "--host", bind_host]
    hub = f"tcp://{LOOPBACK}:{ports.workers}"
    router_hub = f"tcp://{LOOPBACK}:{ports.router + 1}"
    mode = spec.router_mode or "kv"
    roles: list[Role] = []
    if spec.router_process:
        router_argv = ["--endpoint", f"tcp://*:{ports.router}", "--workers-endpoint", f"tcp://*:{ports.router + 1}"]
        roles.append(Role("router", ["zdyn", "router", *cfg, *router_argv, "--router-mode", mode]))

    if spec.scenario == "agg" and spec.processors:
        roles.append(Role("frontend", [*frontend, "--processors-endpoint", f"tcp://*:{ports.processors}"]))
        connect = []
        for i in range(spec.processors):
            port = ports.processors + 1 + i
            argv = ["zdyn", "processor", *cfg, *model, "--frontend", f"tcp://{LOOPBACK}:{ports.processors}"]
            roles.append(Role(f"processor{i}", [*argv, "--workers-endpoint", f"tcp://*:{port}", "--processor-id",
                                                f"processor{i}"]))  # fmt: skip
            connect.append(f"tcp://{LOOPBACK}:{port}")
    elif spec.scenario == "agg":
        roles.append(Role("frontend", [*frontend, "--workers-endpoint", f"tcp://*:{ports.workers}"]))
        connect = [hub]
    elif spec.router_in_process:
        argv = [*frontend, "--workers-endpoint", f"tcp://*:{ports.workers}", "--router-endpoint", ""]
        roles.append(Role("frontend", [*argv, "--router-mode", mode]))
        connect = [hub]
    else:
        argv = [*frontend, "--workers-endpoint", f"tcp://*:{ports.workers}"]
        router = ["--router-endpoint", f"tcp://{LOOPBACK}:{ports.router}"] if spec.routed else []
        roles.append(Role("frontend", [*argv, *router]))
        connect = [hub, router_hub] if spec.routed else [hub]

    engine = ["--engine", spec.engine]
    if not spec.disagg:
        for i in range(spec.workers):
            argv = ["zdyn", "worker", *cfg, *model, *engine, "--connect", ",".join(connect)]
            roles.append(Role(f"worker{i}", [*argv, "--worker-id", f"worker{i}", *spec.worker_args]))
        return roles

    q = ports.queue
    queue = ["--jobs-endpoint", f"tcp://*:{q}", "--prefill-workers-endpoint", f"tcp://*:{q + 1}"]
    roles.append(
        Role("prefill_queue", ["zdyn", "prefill-queue", *cfg, *queue, "--status-endpoint", f"tcp://*:{q + 2}"])
    )
    for i in range(spec.prefill_workers):
        argv = ["zdyn", "worker", *cfg, "--prefill", *model, *engine, "--connect", f"tcp://{LOOPBACK}:{q + 1}"]
        roles.append(Role(f"prefill{i}", [*argv, "--worker-id", f"prefill{i}", *spec.worker_args]))
    for i in range(spec.workers):
        argv = ["zdyn", "worker", *cfg, *model, *engine, "--connect", ",".join(connect)]
        argv += ["--prefill-queue", f"tcp://{LOOPBACK}:{q}", "--worker-id", f"decode{i}", *spec.worker_args]
        roles.append(Role(f"decode{i}", argv))
    return roles


def vllm_scratch_env(folder: Path) -> dict[str, str]:
    """Keep vLLM's caches and IPC files of a run in ``folder`` (for zdyn's vLLM workers and vLLM's own server).
    torch's compiled kernels stay in torch's own cache, shared by all runs: a zdyn worker compiles vLLM's logprobs
    kernel at warm-up, ~10 s the first time and ~2 s from the cache."""
    env = {"VLLM_CACHE_ROOT": str(folder / "vllm-cache"), "VLLM_RPC_BASE_PATH": str(folder / "rpc")}
    for path in env.values():
        Path(path).mkdir(parents=True, exist_ok=True)
    return env


# ---------------------------------------------------------------------------------------------- deployments
@dataclass
class Deployment:
    """A started system: its OpenAI-compatible URL, the served model name and its processes (role -> process
    group). zdyn's scenarios, NVIDIA Dynamo, vLLM's own server and the bare baselines all start as one."""

    base_url: str
    model: str
    group: ProcessGroup
    metrics: dict[str, str] = field(default_factory=dict)  # role -> its Prometheus URL
    info: dict[str, Any] = field(default_factory=dict)  # what was started (for result files)

    @property
    def log_dir(self) -> Path:
        return self.group.log_dir

    def roles(self) -> dict[str, int]:
        """Role -> process group id."""
        return self.group.pids()

    def client(self, **kw: Any) -> Any:
        """An ``openai.OpenAI`` client for this deployment (the openai package is a test dependency)."""
        import openai

        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key="none", max_retries=0, **kw)


@dataclass
class ZdynDeployment(Deployment):
    spec: ZdynSpec = field(default_factory=ZdynSpec)
    ports: Ports | None = None
    config: Path | None = None

    def add_worker(self, name: str | None = None, worker_args: tuple[str, ...] | None = None) -> str:
        """Start one more worker (agg, agg_route) with the command line run.sh gives its workers."""
        assert self.ports is not None and self.config is not None and not self.spec.disagg
        taken = [r for r in self.group.procs if r.startswith("worker")]
        name = name or f"worker{len(taken)}"
        extra = self.spec.worker_args if worker_args is None else worker_args
        [template] = [r for r in plan(self.spec, self.ports, self.config) if r.name == "worker0"]
        argv = template.argv[: template.argv.index("--worker-id")] + ["--worker-id", name, *extra]
        self.group.start(name, argv, self.spec.env)
        return name


def _ready(spec: ZdynSpec, dep: ZdynDeployment, timeout_s: float, stable_s: float) -> None:
    group = dep.group
    deadline = time.monotonic() + timeout_s

    def left() -> float:
        return max(1.0, deadline - time.monotonic())

    want = spec.workers
    wait_until(
        lambda: live_workers(dep.base_url) >= want, f"fewer than {want} workers at {dep.base_url}", left(), group
    )
    if stable_s > 0:  # the count must hold: a worker that re-announced itself can be dropped once more
        since = time.monotonic()
        while time.monotonic() - since < stable_s:
            if live_workers(dep.base_url) < want:
                wait_until(lambda: live_workers(dep.base_url) >= want, "workers dropped out", left(), group)
                since = time.monotonic()
            time.sleep(0.1)
    if spec.router_process:
        url = dep.metrics["router"]
        wait_until(lambda: scrape(url).get("zdyn_router_workers", 0) >= want, "router lacks workers", left(), group)
    if spec.disagg:
        url, p = dep.metrics["prefill_queue"], spec.prefill_workers
        wait_until(lambda: scrape(url).get("zdyn_prefill_queue_workers", 0) >= p, "prefill workers", left(), group)
        time.sleep(PREFILL_SETTLE_S)
    status, models = get_json(f"{dep.base_url}/v1/models")
    dep.model = models["data"][0]["id"]


@contextlib.contextmanager
def start(
    spec: ZdynSpec, log_dir: Path, timeout_s: float = 180.0, stable_s: float = 1.0, bind_host: str = LOOPBACK
) -> Iterator[ZdynDeployment]:
    """Start ``spec`` (logs and config in ``log_dir``), wait until it serves, stop it on exit. Like run.sh, the
    roles get CURVE keys (made in ``log_dir/keys``) unless ``spec.env`` says otherwise (``ZDYN_KEYS_DIR=""``
    with ``ZDYN_INSECURE=1`` runs without)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    if KEYS_DIR_ENV not in spec.env:
        generate(log_dir / "keys")
        spec = dataclasses.replace(spec, env={KEYS_DIR_ENV: str((log_dir / "keys").resolve()), **spec.env})
    ports = Ports.free(spec)
    config = (log_dir / "config.yaml").resolve()
    config.write_text(yaml.safe_dump(config_for(spec, ports), sort_keys=False))
    roles = plan(spec, ports, config, bind_host)
    group = ProcessGroup(log_dir)
    metrics = {"frontend": f"http://{LOOPBACK}:{ports.http}/metrics"}
    if spec.router_process:
        metrics["router"] = f"http://{LOOPBACK}:{ports.router_metrics}/metrics"
    if spec.disagg:
        metrics["prefill_queue"] = f"http://{LOOPBACK}:{ports.queue_metrics}/metrics"
    dep = ZdynDeployment(f"http://{LOOPBACK}:{ports.http}", "", group, metrics, spec=spec, ports=ports, config=config)
    t0 = time.monotonic()
    try:
        for role in roles:
            if role.argv[1] == "worker":
                _wait_for_services(dep, timeout_s)
            group.start(role.name, role.argv, spec.env)
        _ready(spec, dep, timeout_s - (time.monotonic() - t0), stable_s)
        dep.info = {"scenario": spec.scenario, "start_s": round(time.monotonic() - t0, 2), "config": str(config),
                    "commands": {r.name: r.argv for r in roles}}  # fmt: skip
        yield dep
    finally:
        dep.info["killed_on_stop"] = group.stop()


def _wait_for_services(dep: ZdynDeployment, timeout_s: float) -> None:
    """Workers start once the frontend, router and prefill queue answer: a worker that comes first re-announces
    itself after its heartbeats time out, which can coincide with the hub coming up."""
    for role, url in dep.metrics.items():
        if role in dep.group.procs:
            wait_until(partial(http_up, url), f"{role} did not answer at {url}", timeout_s, dep.group, 0.1)
