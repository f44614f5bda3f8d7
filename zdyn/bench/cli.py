"""``zdyn bench``: command line of the load generator (``run`` is the default, ``plot`` draws results)."""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import math
import sys
from collections.abc import Sequence
from typing import Any

from zdyn.bench.client import ClientConfig, OpenAIClient
from zdyn.bench.datasets import Dataset, PrefixDataset, RandomDataset, TraceDataset
from zdyn.bench.metrics import parse_goodput
from zdyn.bench.prompts import ENDPOINTS, RequestOptions
from zdyn.bench.report import command_line, format_summary, result_json, write_json
from zdyn.bench.runner import LoadPoint, RunSettings, run_sweep
from zdyn.bench.tokens import TokenSynth, load_tokenizer
from zdyn.bench.traces import BadLineError, load_azure, load_mooncake

log = logging.getLogger("zdyn.bench")

TRACE_DATASETS = ("mooncake", "azure")
DEFAULT_RANDOM_REQUESTS = 1000


def _number_list(cast: type[int] | type[float], name: str) -> Any:
    def parse(text: str) -> list[Any]:
        try:
            values = [cast(v) if v.strip().lower() != "inf" else math.inf for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name}: expected comma-separated numbers, got {text!r}") from None
        if not values or any(v <= 0 for v in values):
            raise argparse.ArgumentTypeError(f"{name}: values must be positive")
        return values

    return parse


def _header(text: str) -> tuple[str, str]:
    name, sep, value = text.partition(":")
    if not sep:
        raise argparse.ArgumentTypeError(f"header {text!r}: expected NAME:VALUE")
    return name.strip(), value.strip()


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"--extra-body: invalid JSON ({e.msg})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("--extra-body: expected a JSON object")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="zdyn bench",
        description="Load generator for OpenAI-compatible endpoints, with vLLM 'bench serve' metrics. "
        "'zdyn bench plot RESULT.json ... -o out.png' draws results.",
    )
    g = p.add_argument_group("target")
    g.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root (default %(default)s)")
    g.add_argument("--api", choices=("chat", "completions"), default="chat", help="default %(default)s")
    g.add_argument("--endpoint", help="path overriding the API's default (/v1/chat/completions, /v1/completions)")
    g.add_argument("--model", help="model name (default: the first one /v1/models lists)")
    g.add_argument("--api-key", help="sent as 'Authorization: Bearer KEY'")
    g.add_argument("--header", type=_header, action="append", default=[], metavar="NAME:VALUE")

    g = p.add_argument_group("requests")
    g.add_argument(
        "--prompt-format",
        choices=("text", "tokens"),
        default="text",
        help="completions only: prompt as text or as a list of token ids (default %(default)s)",
    )
    g.add_argument("--ignore-eos", action="store_true", help="send ignore_eos=true so output lengths are honoured")
    g.add_argument("--temperature", type=float, default=0.0, help="default %(default)s")
    g.add_argument(
        "--extra-body",
        type=_json_object,
        default={},
        metavar="JSON",
        help='merged into every body, e.g. \'{"nvext": {"ignore_eos": true}}\' for Dynamo',
    )

    g = p.add_argument_group("dataset")
    g.add_argument("--dataset", choices=("random", "prefix", *TRACE_DATASETS), default="random")
    g.add_argument("--dataset-path", help="trace file (mooncake JSONL, azure CSV)")
    g.add_argument(
        "--tokenizer",
        required=True,
        metavar="DIR",
        help="local Hugging Face tokenizer folder (no hub access)",
    )
    g.add_argument("--input-len", type=int, default=1024, help="random: prompt tokens (default %(default)s)")
    g.add_argument("--output-len", type=int, default=128, help="random, prefix: max_tokens (default %(default)s)")
    g.add_argument("--range-ratio", type=float, default=0.0, help="random: lengths uniform in len·(1±r)")
    g.add_argument("--num-prefixes", type=int, default=10, help="prefix: shared system prompts")
    g.add_argument("--users-per-prefix", type=int, default=4, help="prefix: sessions per system prompt")
    g.add_argument("--turns", type=int, default=3, help="prefix: turns per session")
    g.add_argument("--prefix-len", type=int, default=256, help="prefix: system prompt tokens")
    g.add_argument("--suffix-len", type=int, default=64, help="prefix: tokens of each new user message")
    g.add_argument(
        "--history",
        choices=("model", "synthetic"),
        default="model",
        help="prefix: previous answers resent as generated (model) or synthetic of output-len tokens",
    )
    g.add_argument("--block-size", type=int, default=512, help="mooncake: tokens per hash id (default %(default)s)")
    g.add_argument(
        "--on-bad-line",
        choices=("skip", "stop"),
        default="stop",
        help="malformed trace line: skip it (counted, logged) or stop (default %(default)s)",
    )

    g = p.add_argument_group("load (comma-separated lists sweep: one result per combination)")
    g.add_argument(
        "--request-rate",
        type=_number_list(float, "--request-rate"),
        default=None,
        metavar="R[,R..]",
        help="open-loop requests/s, 'inf' = all at once (default inf)",
    )
    g.add_argument("--burstiness", type=float, default=1.0, help="Gamma shape of gaps; 1 = Poisson (default 1)")
    g.add_argument(
        "--concurrency",
        type=_number_list(int, "--concurrency"),
        default=None,
        metavar="C[,C..]",
        help="max requests in flight (closed loop when the rate is inf)",
    )
    g.add_argument(
        "--speed",
        type=_number_list(float, "--speed"),
        default=None,
        metavar="S[,S..]",
        help="traces: replay at timestamp/S (default 1)",
    )
    g.add_argument(
        "--num-requests",
        type=int,
        help=f"measured requests (random default {DEFAULT_RANDOM_REQUESTS}; others: the whole dataset)",
    )
    g.add_argument("--duration", type=float, help="stop sending after this many seconds")
    g.add_argument("--warmups", type=int, default=0, help="warm-up requests before each point, not measured")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument(
        "--reuse-prompts",
        action="store_true",
        help="same token content at every sweep point (default: fresh content, same lengths)",
    )

    g = p.add_argument_group("client")
    g.add_argument("--timeout", type=float, default=600.0, help="per-request timeout in s (default %(default)s)")
    g.add_argument("--no-keep-alive", action="store_true", help="a new connection per request")
    g.add_argument("--max-connections", type=int, default=0, help="connection pool limit, 0 = none")

    g = p.add_argument_group("output")
    g.add_argument("--result-json", metavar="FILE", help="write config, metrics and command line here")
    g.add_argument("--save-requests", action="store_true", help="add per-request records to the JSON")
    g.add_argument("--label", default="", help="name of this run in plots")
    g.add_argument("--goodput", nargs="+", default=[], metavar="NAME:MS", help="SLOs, e.g. ttft:500 tpot:50 e2el:5000")
    g.add_argument(
        "--percentiles",
        type=_number_list(float, "--percentiles"),
        default=[50.0, 90.0, 99.0],
        metavar="P[,P..]",
        help="reported percentiles (default 50,90,99)",
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--log-level", default="WARNING")
    return p


def build_plot_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zdyn bench plot", description="Latency CDFs and sweep curves of results.")
    p.add_argument("results", nargs="+", metavar="RESULT.json")
    p.add_argument("-o", "--output", required=True, metavar="OUT.png")
    p.add_argument("--labels", help="comma-separated names for the result files")
    return p


def _validate(p: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, float]:
    """Exits with a usage error on inconsistent flags; returns the goodput SLOs."""
    is_trace = args.dataset in TRACE_DATASETS
    if is_trace and not args.dataset_path:
        p.error(f"--dataset {args.dataset} needs --dataset-path")
    if is_trace and args.request_rate:
        p.error("trace datasets replay their own timestamps: use --speed instead of --request-rate")
    if not is_trace and args.speed:
        p.error("--speed only applies to trace datasets")
    if args.prompt_format == "tokens" and args.api != "completions":
        p.error("--prompt-format tokens needs --api completions")
    if args.burstiness <= 0 or args.timeout <= 0 or (args.duration is not None and args.duration <= 0):
        p.error("--burstiness, --timeout and --duration must be positive")
    if args.num_requests is not None and args.num_requests < 1:
        p.error("--num-requests must be at least 1")
    try:
        return parse_goodput(args.goodput)
    except ValueError as e:
        p.error(str(e))


def load_points(args: argparse.Namespace) -> list[LoadPoint]:
    rates = args.request_rate or [math.inf]
    concurrencies: list[int | None] = list(args.concurrency or [None])
    speeds: list[float | None] = list(args.speed or [1.0]) if args.dataset in TRACE_DATASETS else [None]
    return [
        LoadPoint(request_rate=r, concurrency=c, speed=s) for r, c, s in itertools.product(rates, concurrencies, speeds)
    ]


def load_dataset(args: argparse.Namespace) -> tuple[Dataset, int]:
    """The dataset and the number of malformed trace lines skipped."""
    if args.dataset == "random":
        return RandomDataset(args.input_len, args.output_len, args.range_ratio), 0
    if args.dataset == "prefix":
        prefix = PrefixDataset(
            args.num_prefixes,
            args.users_per_prefix,
            args.turns,
            args.prefix_len,
            args.suffix_len,
            args.output_len,
        )
        return prefix, 0
    if args.dataset == "mooncake":
        trace = load_mooncake(
            args.dataset_path,
            block_size=args.block_size,
            on_bad_line=args.on_bad_line,
            limit=args.num_requests,
        )
    else:
        trace = load_azure(args.dataset_path, on_bad_line=args.on_bad_line, limit=args.num_requests)
    if not trace.entries:
        raise ValueError(f"{args.dataset_path}: no usable requests")
    return TraceDataset(tuple(trace.entries), args.block_size), len(trace.bad_lines)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "inf" if value > 0 else str(value)
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


async def _run(args: argparse.Namespace, argv: Sequence[str], slos: dict[str, float]) -> int:
    dataset, skipped_lines = load_dataset(args)
    synth = TokenSynth(load_tokenizer(args.tokenizer), seed=args.seed)
    if not synth.exact:
        log.warning("tokenizer has no exact word pool: prompt lengths are fitted by re-tokenizing (approximate)")
    headers = dict(args.header)
    if args.api_key:
        headers["Authorization"] = f"Bearer {args.api_key}"
    client_config = ClientConfig(args.base_url, not args.no_keep_alive, args.max_connections, args.timeout, headers)
    num_requests = args.num_requests
    if num_requests is None and args.dataset == "random" and args.duration is None:
        num_requests = DEFAULT_RANDOM_REQUESTS
    points = load_points(args)
    command = command_line(argv)
    print(f"Command: {command}", flush=True)
    async with OpenAIClient(client_config) as client:
        model = args.model or await _first_model(client)
        options = RequestOptions(
            model, args.api, args.prompt_format, args.ignore_eos, args.temperature, args.extra_body
        )
        settings = RunSettings(
            path=args.endpoint or ENDPOINTS[args.api],
            options=options,
            num_requests=num_requests,
            duration_s=args.duration,
            burstiness=args.burstiness,
            num_warmups=args.warmups,
            seed=args.seed,
            history=args.history,
            reuse_prompts=args.reuse_prompts,
            progress=not args.no_progress,
            goodput_slos_ms=slos,
            percentiles=args.percentiles,
        )
        results = await run_sweep(client, dataset, synth, points, settings)
    if skipped_lines:
        print(f"Skipped malformed trace lines: {skipped_lines}")
    for result in results:
        print(format_summary(result.metrics, result.point.label() if len(results) > 1 else ""))
        for sample in [r for r in result.records if not r.success][:3]:
            print(f"  failed request {sample.index}: {sample.error} {sample.error_detail}")
    print(f"Command: {command}")
    if args.result_json:
        config = {k: v for k, v in vars(args).items() if k not in ("header", "api_key")}
        config.update(
            model=model,
            num_requests=num_requests,
            header_names=sorted(headers),
            points=[p.to_json() for p in points],
            skipped_trace_lines=skipped_lines,
        )
        write_json(
            args.result_json,
            result_json(argv, _jsonable(config), results, label=args.label, save_requests=args.save_requests),
        )
        print(f"Results written to {args.result_json}")
    return 0 if all(r.metrics.completed > 0 for r in results) else 1


async def _first_model(client: OpenAIClient) -> str:
    listing = await client.get_json("/v1/models")
    try:
        return str(listing["data"][0]["id"])
    except (KeyError, IndexError, TypeError):
        raise ValueError(f"/v1/models lists no model: {listing!r}; pass --model") from None


def _plot(argv: Sequence[str]) -> int:
    from zdyn.bench.plots import load_results, plot_results

    args = build_plot_parser().parse_args(argv)
    labels = args.labels.split(",") if args.labels else None
    out = plot_results(load_results(args.results, labels), args.output)
    print(f"Plot written to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["plot"]:
        return _plot(argv[1:])
    if argv[:1] == ["run"]:
        argv = argv[1:]
    parser = build_parser()
    args = parser.parse_args(argv)
    slos = _validate(parser, args)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        return asyncio.run(_run(args, argv, slos))
    except BadLineError as e:
        print(f"error: malformed trace line: {e}", file=sys.stderr)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
    return 1
