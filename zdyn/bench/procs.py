"""Child processes for tests and benchmarks: each role in its own process group with its own log file, ports,
and HTTP readiness probes that fail early (with the role's log tail) when a child dies."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from zdyn.bench.host import process_table


class ChildExited(RuntimeError):
    """A child process ended while we waited for it; the message ends with its log tail."""


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


def free_port_run(n: int, attempts: int = 100) -> int:
    """The first of ``n`` consecutive ports free right now (for roles that derive ports as base + i)."""
    for _ in range(attempts):
        base = free_port()
        if base + n > 65536:
            continue
        socks = [socket.socket() for _ in range(n)]
        try:
            for port, sock in zip(range(base, base + n), socks, strict=True):
                sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError(f"found no {n} consecutive free ports in {attempts} attempts")


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def live_groups(pgids: Iterable[int]) -> set[int]:
    """Those of ``pgids`` that still hold a live (not zombie) process."""
    wanted = set(pgids)
    return {p.pgid for p in process_table().values() if p.pgid in wanted and p.state != "Z"}


class ProcessGroup:
    """Child processes with log files; ``stop()`` ends them all (SIGTERM, bounded wait, SIGKILL)."""

    def __init__(self, log_dir: str | Path) -> None:
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.argv: dict[str, list[str]] = {}

    def start(
        self,
        name: str,
        argv: list[str],
        env: Mapping[str, str] | None = None,
        *,
        cwd: str | Path | None = None,
        base_env: Mapping[str, str] | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` (``zdyn ...`` becomes ``python -m zdyn.cli ...``) as the leader of its own process group,
        output to ``NAME.log``. The environment is ``base_env`` (default: ours) updated with ``env``."""
        if argv and argv[0] == "zdyn":
            argv = [sys.executable, "-m", "zdyn.cli", *argv[1:]]
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - the child owns it
        proc = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**(os.environ if base_env is None else base_env), **(env or {})},
            cwd=cwd,
            start_new_session=True,
        )
        log.close()
        self.procs[name] = proc
        self.argv[name] = argv
        return proc

    def log(self, name: str) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def pids(self) -> dict[str, int]:
        """Role name -> pid, which is also the role's process group id."""
        return {name: proc.pid for name, proc in self.procs.items()}

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                tail = log_tail(self.log_dir / f"{name}.log")
                raise ChildExited(f"{name} exited with {proc.returncode}; its log ends:\n{tail}")

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Signal a child's whole process group (the worker and its vLLM EngineCore)."""
        proc = self.procs[name]
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        if sig == signal.SIGKILL:
            proc.wait(10)

    def stop(self, timeout_s: float = 15.0) -> list[str]:
        """SIGTERM to every process group, up to ``timeout_s`` for them to end, then SIGKILL to what is left.
        Returns the roles that had to be killed."""
        for proc in self.procs.values():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.1, deadline - time.monotonic()))
        pgids = [p.pid for p in self.procs.values()]
        while (alive := live_groups(pgids)) and time.monotonic() < deadline:
            time.sleep(0.05)  # grandchildren (vLLM's EngineCore) end after their leader
        killed = []
        for name, proc in self.procs.items():
            if proc.pid in alive:
                killed.append(name)
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
            if proc.poll() is None:
                proc.wait(10)
        return killed

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ------------------------------------------------------------------------------------------------- HTTP probes
def get_json(url: str, timeout_s: float = 2.0) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def scrape(url: str, timeout_s: float = 5.0) -> dict[str, float]:
    """Prometheus text at ``url`` -> {'name{labels}': value} (histogram buckets left out); {} if unreachable."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            text = response.read().decode()
    except OSError:
        return {}
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#") or "_bucket{" in line or "_created" in line:
            continue
        name, _, value = line.rpartition(" ")
        with contextlib.suppress(ValueError):
            out[name] = float(value)
    return out


def wait_until(
    check: Callable[[], Any], what: str, timeout_s: float, group: ProcessGroup | None = None, interval_s: float = 0.2
) -> Any:
    """Poll ``check`` until it returns something truthy (returned); ChildExited as soon as a child of ``group``
    has died, TimeoutError(``what``) after ``timeout_s``. Connection errors count as not yet."""
    deadline = time.monotonic() + timeout_s
    while True:
        if group is not None:
            group.check_alive()
        with contextlib.suppress(OSError, ValueError):
            if result := check():
                return result
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what} after {timeout_s:.0f} s")
        time.sleep(interval_s)


def live_workers(base_url: str) -> int:
    """Workers a zdyn frontend's /health lists (0 while it does not answer)."""
    try:
        status, body = get_json(f"{base_url}/health")
    except (OSError, ValueError):
        return 0
    return len(body.get("workers", [])) if status == 200 and isinstance(body, dict) else 0


def wait_for_workers(base_url: str, n: int, group: ProcessGroup | None = None, timeout_s: float = 180.0) -> None:
    """Wait until the frontend's /health lists ``n`` live workers; fail early if a child died."""
    wait_until(lambda: live_workers(base_url) >= n, f"{base_url}: fewer than {n} workers", timeout_s, group, 0.25)


def http_up(url: str) -> bool:
    """Whether ``url`` answers at all (any HTTP status)."""
    try:
        with urllib.request.urlopen(url, timeout=1):
            return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False
