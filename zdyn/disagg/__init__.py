"""Disaggregated prefill: the prefill queue, the conditional-disaggregation policy, and their processes."""

from zdyn.disagg.policy import Decision, DisaggPolicy
from zdyn.disagg.queue import Job, PrefillQueue, PrefillWorker

__all__ = ["Decision", "DisaggPolicy", "Job", "PrefillQueue", "PrefillWorker"]
