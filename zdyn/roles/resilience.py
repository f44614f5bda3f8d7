"""Flags of processors (and frontends with one inside): how requests survive failures, how much load is admitted."""

from __future__ import annotations

import argparse

from zdyn.admission import AdmissionConfig
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


def add_admission_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("admission control")
    group.add_argument(
        "--admission-overcommit",
        type=float,
        default=1.0,
        help="requests in flight per unit of the live workers' max_num_seqs; beyond it requests queue "
        "(0 = no admission control)",
    )
    group.add_argument(
        "--max-queued-requests", type=int, default=512, help="requests waiting for capacity; beyond it a 503"
    )
    group.add_argument(
        "--max-queue-time", type=float, default=10.0, help="seconds a request may wait for capacity before a 503"
    )


def admission_from_args(args: argparse.Namespace) -> AdmissionConfig:
    return AdmissionConfig(
        overcommit=args.admission_overcommit,
        max_queued=args.max_queued_requests,
        max_queue_time_s=args.max_queue_time,
    )
