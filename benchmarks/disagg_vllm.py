"""Is a remote prefill through zdyn's own disagg deployment (real vLLM on CPU, KV over NIXL) as fast as a local one?

examples/disagg is started as its run.sh starts it: the frontend, the prefill queue, one decode and one prefill
worker, both vLLM with the embedded SmolLM2-135M-Instruct (float32 on CPU) and prefix caching off, so every prompt
is computed. For each prompt length the same kind of request (greedy, 8 output tokens, token-id prompt, a new prompt
each time) runs with the decode worker's ``max-local-prefill-length`` above the prompt (local prefill) and below it
(remote: the prefill worker computes the prompt and the decode worker pulls its KV through NIXL), alternating. The
limit is switched at run time through the decode worker's ``--disagg-settings`` file. Reported per length: client-
side TTFT and end-to-end latency (medians), the decode worker's wait for the remote prefill (from its log), and
whether the greedy outputs of the two paths are equal. The benchmark lock is held throughout.

    python -m benchmarks.disagg_vllm                         # ~4 min
    python -m benchmarks.disagg_vllm --sizes 256,2000 --reps 3
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from zdyn.bench.deploy import ZdynSpec, start, vllm_scratch_env
from zdyn.bench.host import bench_lock
from zdyn.bench.results import RESULTS, command, footer, provenance, pyplot, save_figure, write_json

REMOTE_TOOK = re.compile(r"request (\w+): remote prefill \([^)]*\) took ([\d.]+)s")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="256,1024,2000,3500", help="prompt lengths in tokens")
    p.add_argument("--reps", type=int, default=3, help="requests per length and path")
    p.add_argument("--output-tokens", type=int, default=8)
    p.add_argument("--out", type=Path, default=RESULTS / "disagg-vllm.json", help="also OUT.png; logs in OUT/logs/")
    return p.parse_args()


def prompt_of(n: int, salt: int) -> list[int]:
    """``n`` ordinary token ids (SmolLM2's vocabulary is 49,152), different for every salt."""
    return [1000 + (i * 7919 + salt * 104729) % 40000 for i in range(n)]


class Settings:
    """The decode worker's ``--disagg-settings`` file, switched between local and remote prefill."""

    def __init__(self, path: Path, log: Path) -> None:
        self.path, self.log = path, log
        self.path.write_text("max-local-prefill-length: 100000\n")

    def use(self, limit: int) -> None:
        seen = self._read_count(limit)
        self.path.write_text(f"max-local-prefill-length: {limit}\n")
        deadline = time.monotonic() + 15
        while self._read_count(limit) <= seen:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the decode worker did not re-read {self.path}")
            time.sleep(0.05)

    def _read_count(self, limit: int) -> int:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return text.count(f"max_local_prefill_length={limit} ")


def timed_completion(base_url: str, prompt: list[int], max_tokens: int) -> dict[str, Any]:
    """Stream one greedy completion; client-side TTFT and end-to-end seconds, the output text, the request id."""
    body = {"model": "SmolLM2-135M-Instruct", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True}  # fmt: skip
    started = time.perf_counter()
    ttft, text, rid = None, [], ""
    with httpx.stream("POST", f"{base_url}/v1/completions", json=body, timeout=120) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            rid = chunk["id"].removeprefix("cmpl-")
            piece = chunk["choices"][0]["text"] if chunk["choices"] else ""
            if ttft is None:
                ttft = time.perf_counter() - started
            text.append(piece)
    return {"ttft_s": ttft, "e2e_s": time.perf_counter() - started, "text": "".join(text), "request_id": rid}


def measure(args: argparse.Namespace, sizes: list[int]) -> dict[str, Any]:
    log_dir = args.out.with_suffix("") / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    settings = Settings(log_dir / "disagg-settings.yaml", log_dir / "decode0.log")
    flags = ("--disagg-settings", str(settings.path.resolve()), "--no-enable-prefix-caching")
    spec = ZdynSpec("disagg", engine="vllm", worker_args=flags, env=vllm_scratch_env(log_dir / "scratch"))
    rows: list[dict[str, Any]] = []
    with start(spec, log_dir, timeout_s=600) as dep:
        print(f"ready in {dep.info['start_s']:.0f}s at {dep.base_url}", flush=True)
        for salt, limit in enumerate((100_000, 64)):  # warm-up, local and remote: the first pull shakes hands
            settings.use(limit)
            timed_completion(dep.base_url, prompt_of(300, salt), args.output_tokens)
        salt = 2
        for n in sizes:
            for rep in range(args.reps):
                salt += 1
                for path, limit in (("local", 100_000), ("remote", 64))[:: 1 if rep % 2 == 0 else -1]:
                    settings.use(limit)
                    r = timed_completion(dep.base_url, prompt_of(n, salt), args.output_tokens)
                    rows.append({"tokens": n, "rep": rep, "path": path, **r})
                    print(f"  {n:>5} tokens  {path:<6}  TTFT {r['ttft_s'] * 1e3:7.1f} ms  "
                          f"E2E {r['e2e_s'] * 1e3:7.1f} ms", flush=True)  # fmt: skip
    decode_log = (log_dir / "decode0.log").read_text(errors="replace")
    waits = {rid: float(s) for rid, s in REMOTE_TOOK.findall(decode_log)}
    for row in rows:
        row["remote_wait_s"] = waits.get(row["request_id"]) if row["path"] == "remote" else None
        if row["path"] == "remote" and row["remote_wait_s"] is None:
            raise RuntimeError(f"request {row['request_id']} was not prefilled remotely; see {log_dir}")
    return {"rows": rows, "killed_on_stop": dep.info["killed_on_stop"]}


def summarize(rows: list[dict[str, Any]], sizes: list[int]) -> list[dict[str, Any]]:
    out = []
    for n in sizes:
        by = {p: [r for r in rows if r["tokens"] == n and r["path"] == p] for p in ("local", "remote")}
        med = {p: {k: statistics.median(r[k] for r in by[p]) for k in ("ttft_s", "e2e_s")} for p in by}
        same = all(a["text"] == b["text"] for a, b in zip(by["local"], by["remote"], strict=True))
        out.append({
            "tokens": n,
            "local_ttft_ms": round(med["local"]["ttft_s"] * 1e3, 1),
            "remote_ttft_ms": round(med["remote"]["ttft_s"] * 1e3, 1),
            "remote_over_local": round(med["remote"]["ttft_s"] / med["local"]["ttft_s"], 2),
            "local_e2e_ms": round(med["local"]["e2e_s"] * 1e3, 1),
            "remote_e2e_ms": round(med["remote"]["e2e_s"] * 1e3, 1),
            "remote_wait_ms": round(statistics.median(r["remote_wait_s"] for r in by["remote"]) * 1e3, 1),
            "same_output": same,
        })  # fmt: skip
    return out


def table(summary: list[dict[str, Any]]) -> str:
    lines = [
        "| prompt tokens | local TTFT ms | remote TTFT ms | remote / local | decode worker's wait for the remote "
        "prefill ms | local E2E ms | remote E2E ms | same greedy output |",
        "|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for s in summary:
        cells = [f"{s['tokens']:,}", f"{s['local_ttft_ms']:,.1f}", f"{s['remote_ttft_ms']:,.1f}",
                 f"{s['remote_over_local']:.2f}", f"{s['remote_wait_ms']:,.1f}", f"{s['local_e2e_ms']:,.1f}",
                 f"{s['remote_e2e_ms']:,.1f}", "yes" if s["same_output"] else "no"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(summary: list[dict[str, Any]], path: Path) -> Path:
    fig, ax = pyplot().subplots(figsize=(7, 4))
    x = range(len(summary))
    ax.bar([i - 0.2 for i in x], [s["local_ttft_ms"] for s in summary], 0.4, label="local prefill")
    ax.bar([i + 0.2 for i in x], [s["remote_ttft_ms"] for s in summary], 0.4, label="remote prefill (NIXL)")
    ax.set_xticks(list(x), [f"{s['tokens']:,}" for s in summary])
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("TTFT, median (ms)")
    ax.legend()
    return save_figure(fig, path, "zdyn disagg, SmolLM2-135M fp32 on vLLM CPU: remote vs local prefill")


def main() -> int:
    args = parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    cmd = command("benchmarks.disagg_vllm", sys.argv[1:])
    with bench_lock():
        measured = measure(args, sizes)
    summary = summarize(measured["rows"], sizes)
    settings = {"sizes": sizes, "reps": args.reps, "output_tokens": args.output_tokens, "prefix_caching": False,
                "model": "embedded SmolLM2-135M-Instruct (float32 on CPU)"}  # fmt: skip
    doc = {"command": cmd, **provenance(), "settings": settings, "summary": summary, **measured}
    write_json(args.out, doc)
    print(table(summary))
    print(footer(cmd, args.out, plot(summary, args.out.with_suffix(".png"))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
