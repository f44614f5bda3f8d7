"""Start and stop an NVIDIA Dynamo 1.6.1 deployment on loopback, as a benchmark peer for zdyn.

The deployment is Dynamo's own HTTP frontend (with its round-robin or KV router) in front of N simulated
vLLM engines ("mocker"), all without etcd or NATS: discovery through a shared folder (file backend),
requests over TCP, KV events over ZeroMQ. Dynamo lives in its own virtual environment outside this repo,
made by ``benchmarks/peers/setup.sh``; this module only uses the standard library.

    with DynamoDeployment("/tmp/peer-tiny", "tiny", num_workers=2, http_port=0, speedup_ratio=1e6,
                          log_dir=Path("/tmp/logs")) as dyn:
        print(dyn.base_url)   # http://127.0.0.1:PORT, OpenAI-compatible (/v1/chat/completions, /v1/models)

Each worker is its own ``python -m dynamo.mocker`` process by default: like engines on separate GPUs (and
like zdyn's workers) each has its own interpreter, tokio runtime and event loop, and its CPU and memory can
be measured on its own. ``workers_in_one_process=True`` uses ``--num-workers N`` in a single process
instead; those workers share one tokio runtime and thread pool (and so one process's CPU share).

Manual use (from the repo root): ``python -m benchmarks.peers.dynamo MODEL_DIR --name tiny --workers 2``.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

DYNAMO_VERSION = "1.6.1"
ROUTER_MODES = ("round-robin", "random", "power-of-two", "kv", "direct", "least-loaded", "device-aware-weighted")
LOOPBACK = "127.0.0.1"


def peers_dir() -> Path:
    """Where ``setup.sh`` puts the peer virtual environments."""
    return Path(os.environ.get("ZDYN_PEERS_DIR") or Path.home() / ".cache" / "zdyn" / "peers")


def default_dynamo_venv() -> Path:
    return peers_dir() / "dynamo-venv"


class DynamoStartupError(RuntimeError):
    """The deployment did not become ready; the message names the log files to read."""


def free_port(host: str = LOOPBACK) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def process_group_rss_kib(pgid: int) -> int:
    """Resident memory of every process in a process group, in KiB (Linux /proc)."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            # fields after the parenthesised command name: state ppid pgrp ...
            fields = stat[stat.rindex(")") + 2 :].split()
            if int(fields[2]) != pgid:
                continue
            for line in (entry / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
                    break
        except (OSError, ValueError, IndexError):
            continue
    return total


class _Proc:
    """One child process, leader of its own process group, with its output in a log file."""

    def __init__(self, name: str, argv: list[str], env: Mapping[str, str], cwd: Path, log_path: Path) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self._log: IO[bytes] = open(log_path, "wb")  # noqa: SIM115 -- closed in close()
        self._log.write(("$ " + " ".join(argv) + "\n").encode())
        self._log.flush()
        self.popen = subprocess.Popen(
            argv,
            env=dict(env),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group: stop() signals the whole group
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def signal_group(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    def group_alive(self) -> bool:
        self.popen.poll()
        try:
            os.killpg(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def close(self) -> None:
        self.popen.poll()
        self._log.close()


class DynamoDeployment:
    """A Dynamo frontend plus ``num_workers`` mocker engines on 127.0.0.1, as a context manager.

    ``http_port=0`` picks a free port. ``log_dir`` receives ``frontend.log`` and ``mocker-<i>.log``; when it is
    None a temporary folder is used and removed on exit unless the start failed. ``speedup_ratio`` scales the
    mocker's timing model (1 = real time of its polynomial model; use a large value such as 1e6, not 0, for
    "no engine time": 0 behaves like 1 in 1.6.1).
    """

    def __init__(
        self,
        model_dir: str | os.PathLike[str],
        served_name: str,
        num_workers: int = 2,
        http_port: int = 0,
        router_mode: str = "round-robin",
        speedup_ratio: float = 1.0,
        block_size: int = 64,
        num_gpu_blocks: int = 16384,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 8192,
        extra_mocker_args: Sequence[str] = (),
        extra_frontend_args: Sequence[str] = (),
        venv: str | os.PathLike[str] | None = None,
        log_dir: str | os.PathLike[str] | None = None,
        workers_in_one_process: bool = False,
        ready_timeout: float = 60.0,
        stop_timeout: float = 10.0,
        extra_env: Mapping[str, str] | None = None,
    ) -> None:
        if router_mode not in ROUTER_MODES:
            raise ValueError(f"router_mode must be one of {ROUTER_MODES}, not {router_mode!r}")
        if num_workers < 1:
            raise ValueError("num_workers must be >= 1")
        self.model_dir = Path(model_dir).resolve()
        self.served_name = served_name
        self.num_workers = num_workers
        self.http_port = http_port
        self.router_mode = router_mode
        self.speedup_ratio = speedup_ratio
        self.block_size = block_size
        self.num_gpu_blocks = num_gpu_blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.extra_mocker_args = tuple(extra_mocker_args)
        self.extra_frontend_args = tuple(extra_frontend_args)
        self.venv = Path(venv) if venv is not None else default_dynamo_venv()
        self.workers_in_one_process = workers_in_one_process
        self.ready_timeout = ready_timeout
        self.stop_timeout = stop_timeout
        self.extra_env = dict(extra_env or {})
        self._log_dir_arg = Path(log_dir) if log_dir is not None else None
        self.log_dir: Path | None = None
        self._own_log_dir = False
        self._scratch: Path | None = None
        self.frontend: _Proc | None = None
        self.mockers: list[_Proc] = []
        self.startup_seconds: float | None = None

    # ----------------------------------------------------------------------------------------------- urls
    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT`` (aiperf's --url form)."""
        return f"http://{LOOPBACK}:{self.http_port}"

    @property
    def openai_base_url(self) -> str:
        """``http://127.0.0.1:PORT/v1`` (the openai client's base_url form)."""
        return self.base_url + "/v1"

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    @property
    def processes(self) -> list[_Proc]:
        return [p for p in [self.frontend, *self.mockers] if p is not None]

    def pids(self) -> dict[str, int]:
        return {p.name: p.pid for p in self.processes}

    def rss_mib(self) -> dict[str, float]:
        """Resident memory per process (group), in MiB."""
        return {p.name: process_group_rss_kib(p.pid) / 1024 for p in self.processes}

    # ----------------------------------------------------------------------------------------- lifecycle
    def __enter__(self) -> DynamoDeployment:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _env(self) -> dict[str, str]:
        assert self._scratch is not None
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
        env.update(
            {
                "PATH": f"{self.venv / 'bin'}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}",
                "VIRTUAL_ENV": str(self.venv),
                # the frontend caches model cards under $HOME/.cache/dynamo and ignores XDG_CACHE_HOME
                "HOME": str(self._scratch / "home"),
                "XDG_CACHE_HOME": str(self._scratch / "home" / ".cache"),
                "TMPDIR": str(self._scratch / "tmp"),
                # no etcd, no NATS: discovery in a shared folder, requests over TCP, events over ZeroMQ
                "DYN_DISCOVERY_BACKEND": "file",
                "DYN_FILE_KV": str(self._scratch / "kv"),
                "DYN_REQUEST_PLANE": "tcp",
                "DYN_EVENT_PLANE": "zmq",
                "DYN_LOG": "warn",
                # advertise loopback (by default Dynamo advertises the first non-loopback address)
                "DYN_TCP_RPC_HOST": LOOPBACK,
                "DYN_TCP_RESPONSE_STREAM_HOST": LOOPBACK,
                "DYN_EVENT_PLANE_HOST": LOOPBACK,
                "DYN_SDK_DISABLE_ANSI_LOGGING": "1",
                # silences "self_host_metadata is ON but DYN_SYSTEM_PORT is unset" (it falls back anyway)
                "DYN_SELF_HOST_METADATA": "0",
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.update(self.extra_env)
        return env

    def _mocker_argv(self, num_workers_in_process: int) -> list[str]:
        argv = [
            str(self.python), "-m", "dynamo.mocker",
            "--model-path", str(self.model_dir),
            "--model-name", self.served_name,
            "--speedup-ratio", repr(float(self.speedup_ratio)),
            "--block-size", str(self.block_size),
            "--num-gpu-blocks-override", str(self.num_gpu_blocks),
            "--max-num-seqs", str(self.max_num_seqs),
            "--max-num-batched-tokens", str(self.max_num_batched_tokens),
            "--discovery-backend", "file", "--request-plane", "tcp", "--event-plane", "zmq",
        ]  # fmt: skip
        if num_workers_in_process > 1:
            argv += ["--num-workers", str(num_workers_in_process)]
        return argv + list(self.extra_mocker_args)

    def _frontend_argv(self) -> list[str]:
        argv = [
            str(self.python), "-m", "dynamo.frontend",
            "--http-host", LOOPBACK,
            "--http-port", str(self.http_port),
            "--router-mode", self.router_mode,
            "--kv-cache-block-size", str(self.block_size),
            "--discovery-backend", "file", "--request-plane", "tcp", "--event-plane", "zmq",
        ]  # fmt: skip
        return argv + list(self.extra_frontend_args)

    def start(self) -> None:
        if self.frontend is not None:
            raise RuntimeError("deployment already started")
        if not self.python.exists():
            raise DynamoStartupError(
                f"no Dynamo venv at {self.venv}: run benchmarks/peers/setup.sh (or pass venv=/ set ZDYN_PEERS_DIR)"
            )
        if not (self.model_dir / "config.json").exists():
            raise DynamoStartupError(f"{self.model_dir} has no config.json (needs config.json and a tokenizer)")
        if self.http_port == 0:
            self.http_port = free_port()
        elif not _port_is_free(LOOPBACK, self.http_port):
            raise DynamoStartupError(f"port {LOOPBACK}:{self.http_port} is already in use")

        self._scratch = Path(tempfile.mkdtemp(prefix="zdyn-dynamo-"))
        for sub in ("home", "kv", "tmp"):  # a fresh DYN_FILE_KV: stale registrations would attract requests
            (self._scratch / sub).mkdir()
        if self._log_dir_arg is None:
            self.log_dir = Path(tempfile.mkdtemp(prefix="zdyn-dynamo-logs-"))
            self._own_log_dir = True
        else:
            self.log_dir = self._log_dir_arg
            self.log_dir.mkdir(parents=True, exist_ok=True)
        atexit.register(self.stop)

        env, cwd, logs = self._env(), self._scratch, self.log_dir
        t0 = time.monotonic()
        try:
            if self.workers_in_one_process:
                self.mockers.append(_Proc("mocker", self._mocker_argv(self.num_workers), env, cwd, logs / "mocker.log"))
            else:
                for i in range(self.num_workers):
                    self.mockers.append(_Proc(f"mocker-{i}", self._mocker_argv(1), env, cwd, logs / f"mocker-{i}.log"))
            self.frontend = _Proc("frontend", self._frontend_argv(), env, cwd, logs / "frontend.log")
            self._wait_ready(t0 + self.ready_timeout)
        except BaseException:
            self.stop(keep_logs=True)
            raise
        self.startup_seconds = time.monotonic() - t0

    # ------------------------------------------------------------------------------------------- readiness
    def _http(self, method: str, path: str, body: dict[str, Any] | None = None, timeout: float = 5.0) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base_url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())

    def _check_alive(self) -> None:
        for p in self.processes:
            code = p.popen.poll()
            if code is not None:
                raise DynamoStartupError(
                    f"Dynamo {p.name} exited with code {code} during startup; see {p.log_path}:\n{_tail(p.log_path)}"
                )

    def _generate_instances(self) -> int:
        """How many worker 'generate' endpoints the frontend's /health lists."""
        health = self._http("GET", "/health")
        return sum(1 for inst in health.get("instances", []) if inst.get("endpoint") == "generate")

    def _wait_ready(self, deadline: float) -> None:
        """Until all workers are registered, /v1/models lists the model and a tiny chat request succeeds."""
        stage = "the frontend's HTTP port"
        last_error = ""
        while True:
            self._check_alive()
            try:
                registered = self._generate_instances()
                last_error = ""
                stage = f"{self.num_workers} workers in /health ({registered} so far)"
                if registered >= self.num_workers:
                    stage = f"model {self.served_name!r} in /v1/models"
                    models = self._http("GET", "/v1/models")
                    if any(m.get("id") == self.served_name for m in models.get("data", [])):
                        stage = "a chat completion"
                        reply = self._http(
                            "POST",
                            "/v1/chat/completions",
                            {
                                "model": self.served_name,
                                "messages": [{"role": "user", "content": "hi"}],
                                "max_tokens": 2,
                            },
                            timeout=10.0,
                        )
                        if reply.get("choices"):
                            return
                        last_error = f"unexpected reply {reply!r}"
            except (urllib.error.URLError, OSError, ValueError) as e:
                last_error = f"{type(e).__name__}: {e}"
            if time.monotonic() > deadline:
                logs = ", ".join(str(p.log_path) for p in self.processes)
                assert self.frontend is not None
                raise DynamoStartupError(
                    f"Dynamo not ready after {self.ready_timeout:g} s, waiting for {stage} ({last_error or '-'}); "
                    f"logs: {logs}\n--- {self.frontend.log_path} (tail):\n{_tail(self.frontend.log_path)}"
                )
            time.sleep(0.1)

    # ------------------------------------------------------------------------------------------------ stop
    def stop(self, keep_logs: bool = False) -> None:
        """SIGTERM every process group, wait up to stop_timeout, then SIGKILL; remove the temp folders."""
        procs = self.processes
        for p in procs:  # frontend first: it stops taking requests before the workers go
            p.signal_group(signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout
        while any(p.group_alive() for p in procs) and time.monotonic() < deadline:
            time.sleep(0.05)
        for p in procs:
            if p.group_alive():
                p.signal_group(signal.SIGKILL)
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.popen.wait(timeout=5)
            p.close()
        self.frontend = None
        self.mockers = []
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None
        if self._own_log_dir and self.log_dir is not None and not keep_logs:
            shutil.rmtree(self.log_dir, ignore_errors=True)
        atexit.unregister(self.stop)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.peers.dynamo",
        description="Start a Dynamo 1.6.1 deployment (frontend + mocker workers) on 127.0.0.1 until Ctrl-C.",
    )
    ap.add_argument("model_dir", help="folder with config.json and a tokenizer (e.g. python -m zdyn.models tiny DIR)")
    ap.add_argument("--name", default=None, help="served model name (default: the folder's name)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--port", type=int, default=8000, help="HTTP port (0: pick a free one)")
    ap.add_argument("--router-mode", default="round-robin", choices=ROUTER_MODES)
    ap.add_argument("--speedup-ratio", type=float, default=1.0)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--num-gpu-blocks", type=int, default=16384)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--one-process", action="store_true", help="all workers in one mocker process (--num-workers)")
    ap.add_argument("--venv", default=None, help=f"Dynamo venv (default {default_dynamo_venv()})")
    ap.add_argument("--log-dir", default=None, help="where frontend.log and mocker-*.log go (default: a temp dir)")
    ap.add_argument("--exit-when-ready", action="store_true", help="print the figures and stop at once")
    args, extra = ap.parse_known_args(argv)

    dep = DynamoDeployment(
        args.model_dir,
        args.name or Path(args.model_dir).resolve().name,
        num_workers=args.workers,
        http_port=args.port,
        router_mode=args.router_mode,
        speedup_ratio=args.speedup_ratio,
        block_size=args.block_size,
        num_gpu_blocks=args.num_gpu_blocks,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        extra_mocker_args=extra,
        venv=args.venv,
        log_dir=args.log_dir,
        workers_in_one_process=args.one_process,
    )
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored (`cmd &`)
    signal.signal(signal.SIGTERM, _interrupt)  # SIGTERM (e.g. from a wrapper) cleans up like Ctrl-C
    try:
        with dep:
            rss = ", ".join(f"{k} {v:.0f} MiB" for k, v in dep.rss_mib().items())
            print(
                f"Dynamo {DYNAMO_VERSION} ready in {dep.startup_seconds:.1f} s at {dep.base_url} "
                f"(model {dep.served_name!r}, {args.workers} workers, router {args.router_mode})",
                flush=True,
            )
            print(f"  pids: {dep.pids()}\n  RSS: {rss}\n  logs: {dep.log_dir}", flush=True)
            if args.exit_when_ready:
                return 0
            print("Ctrl-C to stop", flush=True)
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        print("stopped", flush=True)
    except DynamoStartupError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_main())
