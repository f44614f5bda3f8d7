"""Hosts on one machine: Linux network namespaces on a bridge, for multi-host tests and benchmarks (needs root).

    with NetnsHosts(3) as hosts:                     # h0 10.213.N.1, h1 .2, h2 .3; this process is .254
        group.start("frontend", hosts.argv(0, ["zdyn", "frontend", "--host", hosts.ip(0), ...]))
        hosts.partition(2)                           # h2's cable pulled ...
        hosts.heal(2)                                # ... and plugged back in

Every name carries this process's id, so parallel runs do not meet; ``close()`` (or leaving the ``with``)
deletes the namespaces, their veth pairs and the bridge, also after a failure half-way through setting up.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Sequence


def available() -> str | None:
    """Why network namespaces cannot be made here, or None when they can."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    if shutil.which("ip") is None:
        return "needs iproute2's ip"
    return None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=10)


class NetnsHosts:
    """``n`` namespaces ``h0..h{n-1}`` on a bridge, addresses 10.213.X.1.. (X from the pid)."""

    def __init__(self, n: int) -> None:
        if n < 1 or n > 200:
            raise ValueError(f"between 1 and 200 hosts, not {n}")
        self.n = n
        tag = os.getpid() % 100000
        self.subnet = f"10.213.{os.getpid() % 250}"
        self.bridge = f"zb{tag}"
        self.namespaces = [f"zdyn{tag}h{i}" for i in range(n)]
        self.host_ends = [f"zv{tag}h{i}" for i in range(n)]  # the bridge side of each host's cable
        self._made: list[tuple[str, str]] = []  # ("netns" | "link", name), to undo in reverse

    def ip(self, i: int) -> str:
        return f"{self.subnet}.{i + 1}"

    @property
    def gateway(self) -> str:
        """This (root) namespace's address on the bridge: the test's own view of the hosts."""
        return f"{self.subnet}.254"

    def open(self) -> NetnsHosts:
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            self._made.append(("link", self.bridge))
            _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
            for i, (ns, end) in enumerate(zip(self.namespaces, self.host_ends, strict=True)):
                _ip("netns", "add", ns)
                self._made.append(("netns", ns))
                _ip("link", "add", end, "type", "veth", "peer", "name", "eth0", "netns", ns)
                self._made.append(("link", end))
                _ip("link", "set", end, "master", self.bridge)
                _ip("link", "set", end, "up")
                _ip("-n", ns, "addr", "add", f"{self.ip(i)}/24", "dev", "eth0")
                _ip("-n", ns, "link", "set", "eth0", "up")
                _ip("-n", ns, "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        for kind, name in reversed(self._made):
            if kind == "netns":
                _ip("netns", "del", name, check=False)
            else:
                _ip("link", "del", name, check=False)
        self._made.clear()

    def __enter__(self) -> NetnsHosts:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def argv(self, i: int, argv: Sequence[str]) -> list[str]:
        """``argv`` run on host ``i`` (``zdyn ...`` as ``python -m zdyn.cli ...`` of this interpreter)."""
        argv = list(argv)
        if argv and argv[0] == "zdyn":
            argv = [sys.executable, "-m", "zdyn.cli", *argv[1:]]
        return ["ip", "netns", "exec", self.namespaces[i], *argv]

    def partition(self, i: int) -> None:
        """Cut host ``i`` off from the others (its cable's bridge end goes down; its sockets stay open)."""
        _ip("link", "set", self.host_ends[i], "down")

    def heal(self, i: int) -> None:
        _ip("link", "set", self.host_ends[i], "up")

    def exists(self) -> bool:
        """Whether any of this object's namespaces or links is still there."""
        names = _ip("netns", "list", check=False).stdout
        links = _ip("-o", "link", "show", check=False).stdout
        return any(ns in names for ns in self.namespaces) or f" {self.bridge}:" in links
