"""``zdyn models`` (also ``python -m zdyn.models``): build a model folder and print its path on stdout."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from zdyn.models import SMOLLM2_NAME, build_tiny_llama, ensure_smollm2


def main(argv: list[str] | None = None) -> int:
    """Command line: build a model folder and print its path on stdout."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    try:
        path = _build(args)
    except (ImportError, OSError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


def _build(args: argparse.Namespace) -> Path:
    if args.command == "smollm2":
        return ensure_smollm2(args.dest)
    hidden, layers, seed = args.hidden_size, args.num_layers, args.seed
    return build_tiny_llama(args.dest, hidden_size=hidden, num_layers=layers, seed=seed)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zdyn models", description="Build a model folder zdyn can serve.")
    commands = parser.add_subparsers(dest="command", required=True)
    smollm2 = commands.add_parser("smollm2", help="convert the packaged SmolLM2-135M-Instruct GGUF (default)")
    smollm2.add_argument("--dest", type=Path, help=f"model folder (default: <cache>/models/{SMOLLM2_NAME})")
    tiny = commands.add_parser("tiny", help="build a tiny random-weight Llama for tests (weights only with torch)")
    tiny.add_argument("dest", type=Path, help="model folder")
    tiny.add_argument("--hidden-size", type=int, default=128, help="a multiple of 32 (default: 128)")
    tiny.add_argument("--num-layers", type=int, default=2, help="decoder layers (default: 2)")
    tiny.add_argument("--seed", type=int, default=0, help="weight initialisation seed (default: 0)")
    return parser
