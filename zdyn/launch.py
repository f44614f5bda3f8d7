"""Start and stop zdyn processes as a group: used by tests and benchmarks (the examples use run.sh)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports free on this host right now (held open together, so never the same one twice)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


class ProcessGroup:
    """Child processes with log files; ``stop()`` ends them all (SIGTERM, bounded wait, SIGKILL)."""

    def __init__(self, log_dir: str | Path) -> None:
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start ``argv`` (``zdyn ...`` becomes ``python -m zdyn.cli ...``) in its own process group."""
        if argv and argv[0] == "zdyn":
            argv = [sys.executable, "-m", "zdyn.cli", *argv[1:]]
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - the child owns it
        proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, start_new_session=True
        )
        log.close()
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                tail = "\n".join(self.log(name).splitlines()[-30:])
                raise RuntimeError(f"{name} exited with {proc.returncode}; its log ends:\n{tail}")

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Signal a child's whole process group (the worker and its vLLM EngineCore)."""
        proc = self.procs[name]
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        if sig == signal.SIGKILL:
            proc.wait(10)

    def stop(self, timeout_s: float = 15.0) -> None:
        live = [p for p in self.procs.values() if p.poll() is None]
        for proc in live:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout_s
        for proc in live:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for proc in self.procs.values():
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # stragglers and grandchildren
            except (ProcessLookupError, PermissionError):
                pass
            if proc.poll() is None:
                proc.wait(10)

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def get_json(url: str, timeout_s: float = 2.0) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def wait_for_workers(base_url: str, n: int, group: ProcessGroup | None = None, timeout_s: float = 180.0) -> None:
    """Wait until the frontend's /health lists ``n`` live workers; fail early if a child died."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        if group is not None:
            group.check_alive()
        try:
            status, body = get_json(f"{base_url}/health")
            last = body
            if status == 200 and _num_workers(body) >= n:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.25)
    raise TimeoutError(f"{base_url}: fewer than {n} workers after {timeout_s:.0f}s; last /health: {last}")


def _num_workers(health: Any) -> int:
    return len(health.get("workers", [])) if isinstance(health, dict) else 0
