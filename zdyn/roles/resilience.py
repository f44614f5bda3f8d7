"""Flags for how requests survive failures (processors and frontends) and how much load is admitted."""

from __future__ import annotations

import argparse

from zdyn.choice import Resilience


def add_resilience_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("fault tolerance")
    group.add_argument(
        "--migration-limit",
        type=int,
        default=3,
        help="times one request may be re-issued to another worker (retry before its first token, migration "
        "after) when a worker dies, drains or fails; 0 = never",
    )
    group.add_argument(
        "--worker-wait",
        type=float,
        default=30.0,
        help="seconds a request waits for a worker when none is live (a restart) before it fails with a 503",
    )


def resilience_from_args(args: argparse.Namespace) -> Resilience:
    return Resilience(migration_limit=args.migration_limit, worker_wait_s=args.worker_wait)
