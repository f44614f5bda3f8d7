"""Helpers for end-to-end tests: small vLLM settings, and zdyn deployments through the benchmark harness."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from helpers import eventually, wait_until  # re-exported: tests that import them from here keep working

from zdyn.bench.deploy import ZdynDeployment, ZdynSpec, start, vllm_scratch_env

__all__ = ["VLLM_TEST_ARGS", "deployment", "eventually", "scratch_env", "wait_until"]

scratch_env = vllm_scratch_env  # keep vLLM's caches and IPC files in the test's folder


# Small, fast vLLM settings for the tiny test model on CPU.
VLLM_TEST_ARGS = [
    "--enforce-eager",
    "--max-model-len", "1024",
    "--block-size", "32",
    "--kv-cache-memory-bytes", str(64 * 2**20),
    "--max-num-seqs", "16",
    "--enable-log-requests",
]  # fmt: skip


@contextmanager
def deployment(
    tmp: Path, model: Path | str | None, *, num_workers: int = 1, worker_args: list[str] | None = None
) -> Iterator[ZdynDeployment]:
    """examples/agg with ``num_workers`` vLLM workers (``model``; None: the embedded default), stopped on exit."""
    spec = ZdynSpec(
        "agg",
        workers=num_workers,
        engine="vllm",
        model=None if model is None else str(model),
        worker_args=tuple(VLLM_TEST_ARGS if worker_args is None else worker_args),
        env=scratch_env(tmp),
    )
    with start(spec, tmp / "logs", timeout_s=240) as dep:
        yield dep
