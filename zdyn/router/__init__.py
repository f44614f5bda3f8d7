"""KV-aware routing: the pure logic (index, sequence tracking, policy, router). Sockets live elsewhere."""

from zdyn.router.core import KvRouter
from zdyn.router.hashing import hash_blocks
from zdyn.router.indexer import KvIndexer
from zdyn.router.policy import ActiveRequests, Decision, RoutingPolicy, WorkerState
from zdyn.router.sequence import SeqAction, SeqTracker

__all__ = [
    "ActiveRequests",
    "Decision",
    "KvIndexer",
    "KvRouter",
    "RoutingPolicy",
    "SeqAction",
    "SeqTracker",
    "WorkerState",
    "hash_blocks",
]
