"""NVIDIA Dynamo 1.6.1 as a deployment to measure zdyn against: Dynamo's HTTP frontend (round-robin or KV router)
in front of N simulated vLLM engines (``dynamo.mocker``), on loopback, without etcd or NATS (discovery through a
shared folder, requests over TCP, KV events over ZeroMQ). Dynamo lives in its own venv outside the repo, made by
``benchmarks/peers/setup.sh``.

Each worker is its own ``python -m dynamo.mocker`` process (roles ``worker0``, ``worker1``, ...; like engines on
separate GPUs, and like zdyn's workers); ``one_process`` uses ``--num-workers N`` in a single process instead.

    python -m zdyn.bench.dynamo_peer MODEL_DIR --workers 2 --router-mode kv     # by hand, until Ctrl-C
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zdyn.bench.deploy import LOOPBACK, Deployment
from zdyn.bench.procs import ProcessGroup, free_port, wait_until

DYNAMO_VERSION = "1.6.1"
ROUTER_MODES = ("round-robin", "random", "power-of-two", "kv", "direct", "least-loaded", "device-aware-weighted")


def peers_dir() -> Path:
    """Where ``benchmarks/peers/setup.sh`` puts the peers' venvs: ``$ZDYN_PEERS_DIR`` or ~/.cache/zdyn/peers."""
    return Path(os.environ.get("ZDYN_PEERS_DIR") or Path.home() / ".cache" / "zdyn" / "peers")


@dataclass(frozen=True)
class DynamoSpec:
    """A Dynamo deployment with the mocker settings zdyn's mocker benchmarks use (Dynamo's defaults). ``speedup``
    scales the mocker's timing model: use a large value such as 1e6 for "no engine time" (0 behaves like 1)."""

    model_dir: Path
    served_name: str = ""  # default: the folder's name
    workers: int = 2
    router_mode: str = "round-robin"
    speedup: float = 1.0
    block_size: int = 64
    num_blocks: int = 16384
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    mocker_args: tuple[str, ...] = ()
    frontend_args: tuple[str, ...] = ()
    one_process: bool = False

    def __post_init__(self) -> None:
        if self.router_mode not in ROUTER_MODES:
            raise ValueError(f"router_mode must be one of {ROUTER_MODES}, not {self.router_mode!r}")
        if self.workers < 1:
            raise ValueError("a deployment needs at least one worker")

    @property
    def name(self) -> str:
        return self.served_name or Path(self.model_dir).resolve().name


def mocker_argv(spec: DynamoSpec, python: Path, workers_in_process: int) -> list[str]:
    argv = [
        str(python), "-m", "dynamo.mocker", "--model-path", str(Path(spec.model_dir).resolve()),
        "--model-name", spec.name, "--speedup-ratio", repr(float(spec.speedup)),
        "--block-size", str(spec.block_size), "--num-gpu-blocks-override", str(spec.num_blocks),
        "--max-num-seqs", str(spec.max_num_seqs), "--max-num-batched-tokens", str(spec.max_num_batched_tokens),
        "--discovery-backend", "file", "--request-plane", "tcp", "--event-plane", "zmq",
    ]  # fmt: skip
    if workers_in_process > 1:
        argv += ["--num-workers", str(workers_in_process)]
    return argv + list(spec.mocker_args)


def frontend_argv(spec: DynamoSpec, python: Path, port: int) -> list[str]:
    return [
        str(python), "-m", "dynamo.frontend", "--http-host", LOOPBACK, "--http-port", str(port),
        "--router-mode", spec.router_mode, "--kv-cache-block-size", str(spec.block_size),
        "--discovery-backend", "file", "--request-plane", "tcp", "--event-plane", "zmq", *spec.frontend_args,
    ]  # fmt: skip


def dynamo_env(venv: Path, scratch: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    return env | {
        "PATH": f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}",
        "VIRTUAL_ENV": str(venv),
        # the frontend caches model cards under $HOME/.cache/dynamo and ignores XDG_CACHE_HOME
        "HOME": str(scratch / "home"),
        "XDG_CACHE_HOME": str(scratch / "home" / ".cache"),
        "TMPDIR": str(scratch / "tmp"),
        # no etcd, no NATS: discovery in a fresh folder (stale registrations would attract requests), requests over
        # TCP, events over ZeroMQ, everything advertised on loopback (Dynamo's default is the first other address)
        "DYN_DISCOVERY_BACKEND": "file",
        "DYN_FILE_KV": str(scratch / "kv"),
        "DYN_REQUEST_PLANE": "tcp",
        "DYN_EVENT_PLANE": "zmq",
        "DYN_LOG": "warn",
        "DYN_TCP_RPC_HOST": LOOPBACK,
        "DYN_TCP_RESPONSE_STREAM_HOST": LOOPBACK,
        "DYN_EVENT_PLANE_HOST": LOOPBACK,
        "DYN_SDK_DISABLE_ANSI_LOGGING": "1",
        "DYN_SELF_HOST_METADATA": "0",  # silences a warning about DYN_SYSTEM_PORT (it falls back anyway)
        "PYTHONUNBUFFERED": "1",
    }


def _http(base_url: str, path: str, body: dict[str, Any] | None = None, timeout: float = 5.0) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(base_url + path, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def _serves(base_url: str, spec: DynamoSpec) -> bool:
    """All workers in /health, the model in /v1/models, and a 2-token chat completion answered."""
    health = _http(base_url, "/health")
    if sum(1 for i in health.get("instances", []) if i.get("endpoint") == "generate") < spec.workers:
        return False
    if not any(m.get("id") == spec.name for m in _http(base_url, "/v1/models").get("data", [])):
        return False
    chat = {"model": spec.name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    return bool(_http(base_url, "/v1/chat/completions", chat, timeout=10.0).get("choices"))


@contextlib.contextmanager
def start_dynamo(
    spec: DynamoSpec, log_dir: Path, timeout_s: float = 60.0, venv: Path | None = None
) -> Iterator[Deployment]:
    """Start ``spec`` (logs ``frontend.log``, ``worker<i>.log`` in ``log_dir``), wait until it serves, stop it on
    exit (SIGTERM to every process group, up to 10 s, then SIGKILL) and remove its scratch folders."""
    venv = venv or peers_dir() / "dynamo-venv"
    python = venv / "bin" / "python"
    if not python.exists():
        raise RuntimeError(f"no Dynamo venv at {venv}: run benchmarks/peers/setup.sh (or set ZDYN_PEERS_DIR)")
    if not (Path(spec.model_dir) / "config.json").exists():
        raise RuntimeError(f"{spec.model_dir} has no config.json (needs config.json and a tokenizer)")
    scratch = Path(tempfile.mkdtemp(prefix="zdyn-dynamo-"))
    for sub in ("home", "kv", "tmp"):
        (scratch / sub).mkdir()
    env, port = dynamo_env(venv, scratch), free_port()
    group = ProcessGroup(log_dir)
    base_url = f"http://{LOOPBACK}:{port}"
    t0 = time.monotonic()
    try:
        if spec.one_process:
            group.start("worker", mocker_argv(spec, python, spec.workers), cwd=scratch, base_env=env)
        else:
            for i in range(spec.workers):
                group.start(f"worker{i}", mocker_argv(spec, python, 1), cwd=scratch, base_env=env)
        group.start("frontend", frontend_argv(spec, python, port), cwd=scratch, base_env=env)
        wait_until(lambda: _serves(base_url, spec), f"Dynamo not serving (logs in {log_dir})", timeout_s, group, 0.1)
        info = {"system": f"Dynamo {DYNAMO_VERSION}", "start_s": round(time.monotonic() - t0, 2),
                "commands": group.argv}  # fmt: skip
        yield Deployment(base_url, spec.name, group, info=info)
    finally:
        group.stop(10.0)
        shutil.rmtree(scratch, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m zdyn.bench.dynamo_peer", description="Start Dynamo until Ctrl-C.")
    p.add_argument("model_dir", type=Path, help="config.json and a tokenizer (python -m zdyn.models tiny DIR)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--router-mode", default="round-robin", choices=ROUTER_MODES)
    p.add_argument("--speedup", type=float, default=1.0)
    p.add_argument("--one-process", action="store_true", help="all workers in one mocker process (--num-workers)")
    p.add_argument("--log-dir", type=Path, default=Path("dynamo-logs"))
    args, mocker_args = p.parse_known_args(argv)
    spec = DynamoSpec(args.model_dir, workers=args.workers, router_mode=args.router_mode, speedup=args.speedup,
                      mocker_args=tuple(mocker_args), one_process=args.one_process)  # fmt: skip
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    with contextlib.suppress(KeyboardInterrupt), start_dynamo(spec, args.log_dir) as dyn:
        print(f"Dynamo {DYNAMO_VERSION} serving {dyn.model!r} at {dyn.base_url}; logs in {args.log_dir}; Ctrl-C stops")
        while True:
            time.sleep(3600)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
