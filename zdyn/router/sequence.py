"""Sequence numbers of one KV-event publisher: apply in order, skip duplicates, spot gaps and restarts.

vLLM numbers its event batches 0, 1, 2, ... per process (one publisher per worker and DP rank). The caller's loop:

- ``observe(seq)`` on each live batch: APPLY it; skip a DUPLICATE; on RESTART clear the worker's index entries
  and any kept batches, then apply it; on GAP keep the batch (and later live ones, which also report GAP) and ask
  the publisher to replay from ``expected``.
- For each replayed batch, in order: if ``replay_incomplete(seq)`` (it starts beyond ``expected``: the batches
  in between are gone from the publisher's buffer) clear the worker's entries and ``reset(seq)``, rebuilding from
  there; then apply the batch if ``replayed(seq)``. An empty reply is ``replay_incomplete(None)``: clear the worker
  and ``reset(first kept live seq)``. Finally ``observe`` the kept live batches again, in order.

A restart whose batch 0 was lost looks like duplicates until the seq catches up; a caller that learns of a
restart another way (a new READY session) should ``reset()``.
"""

from __future__ import annotations

from enum import Enum


class SeqAction(Enum):
    APPLY = "apply"
    DUPLICATE = "duplicate"
    GAP = "gap"
    RESTART = "restart"


class SeqTracker:
    """Expected next sequence number of one publisher."""

    def __init__(self) -> None:
        self._expected: int | None = None  # None: nothing seen yet

    @property
    def expected(self) -> int:
        """The next seq to apply (0 before anything was applied)."""
        return self._expected or 0

    def reset(self, expected: int | None = None) -> None:
        """Forget the publisher (``None``: the next batch is treated as the first), or expect ``expected`` next."""
        self._expected = expected

    def observe(self, seq: int) -> SeqAction:
        """Classify a live batch; APPLY and RESTART advance ``expected`` past it."""
        if self._expected is None:
            if seq == 0:
                self._expected = 1
                return SeqAction.APPLY
            return SeqAction.GAP  # a late subscriber: replay from 0
        if seq == self._expected:
            self._expected += 1
            return SeqAction.APPLY
        if seq > self._expected:
            return SeqAction.GAP
        if seq == 0:
            self._expected = 1
            return SeqAction.RESTART
        return SeqAction.DUPLICATE

    def replay_incomplete(self, first_replayed_seq: int | None) -> bool:
        """True when a replay starting at ``first_replayed_seq`` (None: empty) cannot fill the gap."""
        return first_replayed_seq is None or first_replayed_seq > self.expected

    def replayed(self, seq: int) -> bool:
        """Whether to apply a replayed batch: only the expected one (earlier ones were applied already)."""
        if seq == self.expected:
            self._expected = seq + 1
            return True
        return False
