"""Helpers for end-to-end tests: start zdyn roles as real processes on loopback."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import openai

from zdyn.launch import ProcessGroup, free_port, wait_for_workers


def wait_until(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll ``check`` until it holds; TimeoutError(``what``) after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.05)


async def eventually(check: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """``wait_until`` for asyncio tests: the event loop keeps running while it waits."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


# Small, fast vLLM settings for the tiny test model on CPU.
VLLM_TEST_ARGS = [
    "--enforce-eager",
    "--max-model-len", "1024",
    "--block-size", "32",
    "--kv-cache-memory-bytes", str(64 * 2**20),
    "--max-num-seqs", "16",
    "--enable-log-requests",
]  # fmt: skip


@dataclass
class Deployment:
    base_url: str
    workers_endpoint: str
    group: ProcessGroup
    model: str
    workers: list[str] = field(default_factory=list)

    def client(self, **kw: object) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key="none", max_retries=0, **kw)  # type: ignore[arg-type]

    def add_worker(self, model: Path | str | None, extra: list[str] | None = None, name: str | None = None) -> str:
        name = name or f"worker{len(self.workers)}"
        argv = ["zdyn", "worker", "--connect", self.workers_endpoint]
        if model is not None:
            argv += ["--model", str(model)]
        self.group.start(name, argv + (extra if extra is not None else VLLM_TEST_ARGS))
        self.workers.append(name)
        return name


def scratch_env(tmp: Path) -> dict[str, str]:
    """Keep vLLM's caches and IPC files in the test's folder."""
    return {
        "VLLM_CACHE_ROOT": str(tmp / "vllm-cache"),
        "TORCHINDUCTOR_CACHE_DIR": str(tmp / "inductor"),
        "VLLM_RPC_BASE_PATH": str(tmp),
    }


@contextmanager
def deployment(
    tmp: Path,
    model: Path | str | None,
    *,
    num_workers: int = 1,
    worker_args: list[str] | None = None,
    frontend_args: list[str] | None = None,
) -> Iterator[Deployment]:
    """Frontend (embedded processor) plus ``num_workers`` vLLM workers, stopped on exit."""
    port = free_port()
    workers_endpoint = f"tcp://127.0.0.1:{free_port()}"
    group = ProcessGroup(tmp / "logs")
    os.environ.update(scratch_env(tmp))
    argv = ["zdyn", "frontend", "--port", str(port), "--host", "127.0.0.1", "--workers-endpoint", workers_endpoint]
    argv += ["--model", str(model)] if model is not None else []
    group.start("frontend", argv + (frontend_args or []))
    dep = Deployment(f"http://127.0.0.1:{port}", workers_endpoint, group, "")
    try:
        for _ in range(num_workers):
            dep.add_worker(model, worker_args)
        wait_for_workers(dep.base_url, num_workers, group, timeout_s=240)
        dep.model = dep.client().models.list().data[0].id
        yield dep
    finally:
        group.stop()
