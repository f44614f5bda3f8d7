"""Real vLLM, the embedded SmolLM2: kill -9 the worker serving a stream, and the client's text completes,
greedy-identical to an undisturbed run (the request migrates with its tokens so far)."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest
from e2e import deployment

from zdyn.bench.procs import get_json, scrape

pytestmark = pytest.mark.slow

PROMPT = [{"role": "user", "content": "Write a long story about a lighthouse keeper and the sea."}]
MAX_TOKENS = 96
ARGS = ["--enforce-eager", "--max-model-len", "2048", "--kv-cache-memory-bytes", str(256 * 2**20)]


def stream(dep: Any, on_chunk: Any = None) -> tuple[str, int]:
    chunks = dep.client().chat.completions.create(
        model=dep.model,
        messages=PROMPT,
        max_tokens=MAX_TOKENS,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    text, usage, n = "", 0, 0
    for chunk in chunks:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            n += 1
            if on_chunk is not None:
                on_chunk(n)
        if chunk.usage is not None:
            usage = chunk.usage.completion_tokens
    return text, usage


def test_a_killed_worker_s_stream_completes_greedy_identical(tmp_path: Path) -> None:
    with deployment(tmp_path, None, num_workers=2, worker_args=ARGS) as dep:
        undisturbed, tokens = stream(dep)
        assert tokens == MAX_TOKENS
        killed: list[str] = []

        def kill_the_busy_worker(n: int) -> None:
            if n == 24 and not killed:
                workers = get_json(f"{dep.base_url}/health")[1]["workers"]
                [busy] = [w["id"] for w in workers if w["in_flight"]]
                os.killpg(dep.roles()[busy], signal.SIGKILL)
                killed.append(busy)

        disturbed, tokens = stream(dep, kill_the_busy_worker)
        assert killed and tokens == MAX_TOKENS
        assert disturbed == undisturbed
        metrics = scrape(dep.metrics["frontend"])
        assert metrics.get('zdyn_reissued_requests_total{cause="peer_lost",kind="migration",role="frontend"}') == 1
