"""Run NVIDIA's aiperf load generator against an OpenAI-compatible URL and read back its key figures.

aiperf lives in its own virtual environment outside this repo (``benchmarks/peers/setup.sh``); this module
only uses the standard library. It runs ``aiperf profile`` as a subprocess (closed loop: ``concurrency``
requests in flight until ``request_count`` have been sent, synthetic prompts of about ``input_tokens``
tokens made with the given tokenizer, ``output_tokens`` tokens asked for) and parses the summary that aiperf
writes to ``<artifact dir>/profile_export_aiperf.json``: one object per metric, keyed by metric tag, e.g.
``"time_to_first_token": {"unit": "ms", "avg": ..., "p50": ..., "p99": ..., ...}`` and
``"request_throughput": {"unit": "requests/sec", "avg": ...}``.

    res = run_aiperf("http://127.0.0.1:8000", model="tiny", tokenizer="/tmp/peer-tiny",
                     concurrency=8, request_count=100, input_tokens=200, output_tokens=64)
    print(res.request_throughput, res.ttft_p50_ms)

Manual use (from the repo root): ``python -m benchmarks.peers.aiperf URL --model tiny --tokenizer DIR``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

AIPERF_VERSION = "0.13.0"
SUMMARY_JSON = "profile_export_aiperf.json"  # aiperf 0.13's default name for the summary export


def default_aiperf_venv() -> Path:
    base = os.environ.get("ZDYN_PEERS_DIR") or Path.home() / ".cache" / "zdyn" / "peers"
    return Path(base) / "aiperf-venv"


class AiperfError(RuntimeError):
    """aiperf failed or wrote no summary; the message names its log file."""


@dataclass(frozen=True)
class AiperfResult:
    """The key figures of one aiperf run (times in ms; NaN where aiperf reported no such metric)."""

    request_throughput: float  # completed requests per second
    output_token_throughput: float  # output tokens per second, all requests together
    ttft_p50_ms: float
    ttft_p99_ms: float
    itl_p50_ms: float  # inter-token latency (streaming only)
    itl_p99_ms: float
    request_latency_p50_ms: float
    request_latency_p99_ms: float
    completed_requests: int
    error_requests: int
    input_tokens_avg: float
    output_tokens_avg: float
    duration_s: float
    aiperf_version: str
    json_path: Path | None  # None when the artifacts were in a temporary folder, now removed
    raw: dict[str, Any] = field(repr=False, compare=False)

    def figures(self) -> dict[str, float | int]:
        """The numeric figures only (for tables and JSON reports)."""
        return {k: v for k, v in asdict(self).items() if isinstance(v, int | float) and not isinstance(v, bool)}


def _stat(summary: Mapping[str, Any], tag: str, stat: str) -> float:
    entry = summary.get(tag)
    if isinstance(entry, Mapping) and isinstance(entry.get(stat), int | float):
        return float(entry[stat])
    return math.nan


def _error_count(summary: Mapping[str, Any]) -> int:
    errs = _stat(summary, "error_request_count", "avg")
    if not math.isnan(errs):
        return int(errs)
    # error_summary: [{"error_details": {...}, "count": N}, ...]
    return sum(int(item.get("count", 1)) for item in summary.get("error_summary") or [] if isinstance(item, Mapping))


def parse_summary(summary: Mapping[str, Any], json_path: Path | None = None) -> AiperfResult:
    """Pick the key figures out of aiperf's profile_export_aiperf.json (already loaded)."""
    completed = _stat(summary, "completed_request_count", "avg")
    if math.isnan(completed):
        completed = _stat(summary, "request_count", "avg")
    return AiperfResult(
        request_throughput=_stat(summary, "request_throughput", "avg"),
        output_token_throughput=_stat(summary, "output_token_throughput", "avg"),
        ttft_p50_ms=_stat(summary, "time_to_first_token", "p50"),
        ttft_p99_ms=_stat(summary, "time_to_first_token", "p99"),
        itl_p50_ms=_stat(summary, "inter_token_latency", "p50"),
        itl_p99_ms=_stat(summary, "inter_token_latency", "p99"),
        request_latency_p50_ms=_stat(summary, "request_latency", "p50"),
        request_latency_p99_ms=_stat(summary, "request_latency", "p99"),
        completed_requests=0 if math.isnan(completed) else int(completed),
        error_requests=_error_count(summary),
        input_tokens_avg=_stat(summary, "input_sequence_length", "avg"),
        output_tokens_avg=_stat(summary, "output_sequence_length", "avg"),
        duration_s=_stat(summary, "benchmark_duration", "avg"),
        aiperf_version=str(summary.get("aiperf_version", "")),
        json_path=json_path,
        raw=dict(summary),
    )


def parse_profile_export(path: str | os.PathLike[str]) -> AiperfResult:
    """Read an aiperf artifact folder (or its profile_export_aiperf.json) and return its key figures."""
    p = Path(path)
    if p.is_dir():
        p = p / SUMMARY_JSON
    return parse_summary(json.loads(p.read_text()), json_path=p)


def aiperf_argv(
    url: str,
    *,
    model: str,
    tokenizer: str | os.PathLike[str],
    concurrency: int,
    request_count: int,
    input_tokens: int,
    output_tokens: int,
    artifact_dir: Path,
    input_tokens_stddev: int = 0,
    streaming: bool = True,
    ignore_eos: bool = True,
    warmup_request_count: int = 0,
    use_server_token_count: bool = True,
    server_metrics: bool = False,
    random_seed: int | None = 0,
    endpoint_type: str = "chat",
    workers_max: int | None = None,
    extra_args: Sequence[str] = (),
    venv: Path | None = None,
) -> list[str]:
    exe = (venv or default_aiperf_venv()) / "bin" / "aiperf"
    argv = [
        str(exe), "profile",
        "--model", model,
        "--url", url,
        "--endpoint-type", endpoint_type,
        "--tokenizer", str(tokenizer),
        "--concurrency", str(concurrency),
        "--request-count", str(request_count),
        "--synthetic-input-tokens-mean", str(input_tokens),
        "--synthetic-input-tokens-stddev", str(input_tokens_stddev),
        "--output-tokens-mean", str(output_tokens),
        "--artifact-dir", str(artifact_dir),
        "--ui-type", "none",
        "--no-gpu-telemetry",
    ]  # fmt: skip
    if streaming:
        argv.append("--streaming")
    if ignore_eos:
        argv += ["--extra-inputs", "ignore_eos:true"]
    if warmup_request_count > 0:
        argv += ["--warmup-request-count", str(warmup_request_count)]
    if use_server_token_count:
        # the server's usage counts, not a re-tokenisation of the streamed text (which, with a tiny random
        # model, differs from the tokens generated by several percent and makes aiperf warn)
        argv.append("--use-server-token-count")
    if not server_metrics:
        argv.append("--no-server-metrics")  # by default aiperf scrapes URL/metrics during the run
    if random_seed is not None:
        argv += ["--random-seed", str(random_seed)]
    if workers_max is not None:
        argv += ["--workers-max", str(workers_max)]
    return argv + list(extra_args)


def run_aiperf(
    url: str,
    *,
    model: str,
    tokenizer: str | os.PathLike[str],
    concurrency: int,
    request_count: int,
    input_tokens: int,
    output_tokens: int,
    input_tokens_stddev: int = 0,
    streaming: bool = True,
    ignore_eos: bool = True,
    warmup_request_count: int = 0,
    use_server_token_count: bool = True,
    server_metrics: bool = False,
    random_seed: int | None = 0,
    endpoint_type: str = "chat",
    workers_max: int | None = None,
    extra_args: Sequence[str] = (),
    artifact_dir: str | os.PathLike[str] | None = None,
    venv: str | os.PathLike[str] | None = None,
    timeout: float | None = 1800.0,
) -> AiperfResult:
    """Run ``aiperf profile`` once and return its key figures.

    ``url`` is the server's base URL without /v1 (e.g. http://127.0.0.1:8000). ``artifact_dir`` keeps aiperf's
    files (summary JSON and CSV, per-request profile_export.jsonl, aiperf-run.log with its console output);
    when None they go to a temporary folder that is removed after parsing. Raises AiperfError on failure.
    """
    venv_path = Path(venv) if venv is not None else default_aiperf_venv()
    if not (venv_path / "bin" / "aiperf").exists():
        raise AiperfError(f"no aiperf at {venv_path}/bin/aiperf: run benchmarks/peers/setup.sh")
    scratch = Path(tempfile.mkdtemp(prefix="zdyn-aiperf-"))
    own_artifacts = artifact_dir is None
    out_dir = scratch / "artifacts" if artifact_dir is None else Path(artifact_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    argv = aiperf_argv(
        url,
        model=model,
        tokenizer=tokenizer,
        concurrency=concurrency,
        request_count=request_count,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        artifact_dir=out_dir,
        input_tokens_stddev=input_tokens_stddev,
        streaming=streaming,
        ignore_eos=ignore_eos,
        warmup_request_count=warmup_request_count,
        use_server_token_count=use_server_token_count,
        server_metrics=server_metrics,
        random_seed=random_seed,
        endpoint_type=endpoint_type,
        workers_max=workers_max,
        extra_args=extra_args,
        venv=venv_path,
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    # aiperf 0.13 fails to load a local tokenizer folder when HF_HUB_OFFLINE=1 is set
    env.pop("HF_HUB_OFFLINE", None)
    env["TMPDIR"] = str(scratch)  # aiperf leaves its memory-mapped dataset (aiperf_mmap_<id>/) in $TMPDIR
    env["VIRTUAL_ENV"] = str(venv_path)
    env["PATH"] = f"{venv_path / 'bin'}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}"
    log_path = out_dir / "aiperf-run.log"
    failed = True  # a failed run keeps its temporary artifacts, so that the log named in the error survives
    try:
        with open(log_path, "wb") as log:
            log.write(("$ " + " ".join(argv) + "\n").encode())
            log.flush()
            t0 = time.monotonic()
            try:
                proc = subprocess.run(
                    argv,
                    env=env,
                    cwd=scratch,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    timeout=timeout,
                    start_new_session=True,
                )
            except subprocess.TimeoutExpired as e:
                raise AiperfError(f"aiperf did not finish within {timeout} s; see {log_path}") from e
        json_path = out_dir / SUMMARY_JSON
        if proc.returncode != 0 or not json_path.exists():
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-20:])
            raise AiperfError(
                f"aiperf exited with code {proc.returncode} after {time.monotonic() - t0:.0f} s"
                f"{'' if json_path.exists() else ' and wrote no ' + SUMMARY_JSON}; see {log_path}:\n{tail}"
            )
        result = parse_profile_export(json_path)
        failed = False
        return parse_summary(result.raw, json_path=None) if own_artifacts else result
    finally:
        if not (failed and own_artifacts):
            shutil.rmtree(scratch, ignore_errors=True)


def _main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.peers.aiperf", description="Run aiperf once, print figures")
    ap.add_argument("url", help="server base URL without /v1, e.g. http://127.0.0.1:8000")
    ap.add_argument("--model", required=True)
    ap.add_argument("--tokenizer", required=True, help="tokenizer folder (or hub id)")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--request-count", type=int, default=100)
    ap.add_argument("--isl", type=int, default=200, help="synthetic input tokens (mean)")
    ap.add_argument("--osl", type=int, default=64, help="output tokens")
    ap.add_argument("--warmup", type=int, default=0, help="warm-up requests")
    ap.add_argument("--no-streaming", action="store_true")
    ap.add_argument("--artifact-dir", default=None)
    ap.add_argument("--venv", default=None)
    args, extra = ap.parse_known_args(argv)
    try:
        res = run_aiperf(
            args.url,
            model=args.model,
            tokenizer=args.tokenizer,
            concurrency=args.concurrency,
            request_count=args.request_count,
            input_tokens=args.isl,
            output_tokens=args.osl,
            warmup_request_count=args.warmup,
            streaming=not args.no_streaming,
            artifact_dir=args.artifact_dir,
            venv=args.venv,
            extra_args=extra,
        )
    except AiperfError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(res.figures(), indent=2))
    if res.json_path is not None:
        print(f"summary: {res.json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(_main())
