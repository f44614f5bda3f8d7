"""Where does zdyn's frontend spend its CPU at the ceiling load? py-spy on the frontend and one worker.

The ceiling's deployment (examples/agg, 2 mocker workers at speedup 1e6) under its load (concurrency 64, 200 in / 64
out), long enough that py-spy (``--nonblocking``, ``--rate`` Hz, ``--seconds``) samples the middle of it. Reported per
process: the inclusive share of samples in named buckets (tokenization, HTTP, starlette, detokenization, SSE, pyzmq,
...; buckets overlap) and the top frames. Needs ``py-spy`` (``pip install py-spy``). Holds the benchmark lock.

    python -m benchmarks.frontend_profile               # ~1 min
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from zdyn.bench.deploy import ZdynSpec, start
from zdyn.bench.host import bench_lock
from zdyn.bench.inputs import LONG_MODEL_LEN, long_context_model, model_or_tiny
from zdyn.bench.procs import ProcessGroup
from zdyn.bench.results import RESULTS, command, footer, provenance, table, write_json
from zdyn.bench.runs import Load, bench_argv

BUCKETS = (
    ("tokenize: chat template + encode", "tokenize (zdyn/processor.py"),
    ("tokenize: Rust encode (its own thread for long prompts)", "_encode_one (zdyn/processor.py"),
    ("threads other than the event loop's", "Thread._bootstrap ("),
    ("  of which apply_chat_template", "apply_chat_template ("),
    ("detokenize (Detokenizer.step/finish)", "zdyn/detokenizer.py"),
    ("HTTP: uvicorn httptools protocol", "uvicorn/protocols/http/httptools_impl.py"),
    ("starlette routing/request", "starlette/"),
    ("frontend: OpenAI request parsing", "zdyn/frontend/openai.py"),
    ("frontend: SSE chunks + JSON", "zdyn/frontend/app.py"),
    ("rpc: hub and spoke", "zdyn/rpc/"),
    ("pyzmq (zmq/_future.py)", "zmq/_future.py"),
    ("logging", "logging/__init__.py"),
    ("prometheus metrics", "prometheus_client/"),
    ("mocker engine step", "zdyn/engines/mocker/"),
)


def summarize(raw: Path, top: int = 25) -> dict[str, Any]:
    """py-spy raw (collapsed) stacks -> samples, inclusive share of the buckets, top self and inclusive frames."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    buckets: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")]  # without line numbers
        if frames:
            own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
        for label, pattern in BUCKETS:
            if pattern in stack:
                buckets[label] += count

    def share(counter: Counter[str], n: int | None = None) -> list[tuple[str, float]]:
        return [(k, round(100.0 * v / total, 1)) for k, v in counter.most_common(n)] if total else []

    return {"samples": total, "buckets_pct": dict(share(buckets)), "top_self": share(own, top),
            "top_inclusive": share(inclusive, top)}  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m benchmarks.frontend_profile", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="config + tokenizer (default: the tiny Llama)")
    p.add_argument("--seconds", type=float, default=5.0, help="py-spy's recording time")
    p.add_argument("--rate", type=int, default=200, help="py-spy's samples per second")
    p.add_argument("--requests", type=int, default=8000, help="measured requests of the load (outlasts the recording)")
    p.add_argument("--input-len", type=int, default=200, help="prompt tokens (> 2000: tiny-llama-262k)")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--processors", type=int, default=0, help="separate processor processes (also profiled)")
    p.add_argument("--out", type=Path, default=RESULTS / "frontend-profile.json")
    args = p.parse_args(argv)
    cmd = command("benchmarks.frontend_profile", argv)
    model = args.model or (long_context_model() if args.input_len > 2000 else model_or_tiny(None))
    load = Load(requests=args.requests, input_len=args.input_len, concurrency=args.concurrency)
    work = Path(tempfile.mkdtemp(prefix="zdyn-profile-"))
    roles = ("frontend", *(f"processor{i}" for i in range(args.processors)), "worker0")
    files = {role: args.out.with_name(f"{args.out.stem}-{role}.txt") for role in roles}
    spy = ["py-spy", "record", "-d", f"{args.seconds:g}", "-r", str(args.rate), "-f", "raw", "--nonblocking"]
    doc: dict[str, Any] = {"benchmark": "frontend-profile", "command": cmd, **provenance(), "py_spy": " ".join(spy)}
    worker_args = ("--speedup", "1e6", "--max-model-len", str(LONG_MODEL_LEN if args.input_len > 2000 else 2048))
    spec = ZdynSpec("agg", workers=2, model=str(model), worker_args=worker_args, processors=args.processors)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with bench_lock(), start(spec, work / "logs") as dep, ProcessGroup(work / "load") as group:
        bench = bench_argv(dep.base_url, model, work / "bench.json", "profile", *load.flags(), "--no-progress")
        group.start("bench", bench)
        time.sleep(1.0 + args.input_len / 4000)  # past the warm-ups: serving at full load
        spies = []
        for role, path in files.items():
            with open(work / f"py-spy-{role}.log", "wb") as err:
                argv = [*spy, "-p", str(dep.roles()[role]), "-o", str(path)]
                spies.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err))
        for s in spies:
            s.wait(args.seconds + 30)
        doc["load_outlasted_the_recording"] = group.procs["bench"].poll() is None
    for role, path in files.items():
        doc[role] = summarize(path) if path.exists() else {"error": "py-spy wrote nothing"}
    write_json(args.out, doc)
    for role in files:
        if "buckets_pct" in doc[role]:
            print(f"\npy-spy {role}: {doc[role]['samples']} samples; inclusive % of samples (buckets overlap)")
            print(table(["bucket", "%"], [[k, f"{v:.1f}"] for k, v in doc[role]["buckets_pct"].items()]))
            print("top self frames: " + "; ".join(f"{f} {v}%" for f, v in doc[role]["top_self"][:10]))
    print(footer(cmd, args.out, *files.values()))
    return 0 if doc["load_outlasted_the_recording"] else 1


if __name__ == "__main__":
    sys.exit(main())
