"""The prefill queue's bookkeeping: jobs in arrival order, prefill workers with credits, nothing lost.

A prefill worker takes a job only while it has a free slot (its credit: ``capacity`` jobs at once), and the
emptiest worker takes the next job, so no job waits behind a busy worker while another is idle. A job stays
owned by the queue until its worker reports it done: when the worker dies the job goes back to the front of
the queue (up to ``max_attempts`` runs), unlike a queue that acknowledges on fetch and loses it. Jobs whose
deadline passes before a worker takes them are dropped: their decode worker has prefilled locally by then.
No sockets, no clock of its own: the caller passes ``now``.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True, eq=False)
class Job:
    request_id: str
    model: str
    deadline: float  # absolute, the caller's clock; math.inf for none
    payload: Any = None  # whatever the caller needs to run it (zdyn: the PrefillJob message)
    received: float = 0.0  # when the caller got it, the caller's clock
    attempts: int = 0  # runs started so far
    worker: str | None = None  # the prefill worker running it


@dataclass(slots=True, eq=False)
class PrefillWorker:
    id: str
    model: str
    capacity: int
    running: set[str] = field(default_factory=set)
    order: int = 0  # join order, so that equally busy workers are taken in turn

    @property
    def free(self) -> int:
        return self.capacity - len(self.running)


class PrefillQueue:
    def __init__(self, max_attempts: int = 2) -> None:
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        self.max_attempts = max_attempts
        self.workers: dict[str, PrefillWorker] = {}
        self._queued: deque[Job] = deque()
        self._jobs: dict[str, Job] = {}  # queued and running, by request id
        self._turn = itertools.count()

    @property
    def queued(self) -> int:
        return len(self._queued)

    @property
    def running(self) -> int:
        return len(self._jobs) - len(self._queued)

    @property
    def capacity(self) -> int:
        return sum(w.capacity for w in self.workers.values())

    def job(self, request_id: str) -> Job | None:
        return self._jobs.get(request_id)

    def submit(self, job: Job) -> bool:
        """Queue a job at the back; False (and ignored) when its request id is already queued or running."""
        if job.request_id in self._jobs:
            return False
        self._jobs[job.request_id] = job
        self._queued.append(job)
        return True

    def add_worker(self, worker: str, model: str, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"prefill worker {worker} needs capacity >= 1, got {capacity}")
        self.workers[worker] = PrefillWorker(worker, model, capacity, order=next(self._turn))

    def remove_worker(self, worker: str) -> list[Job]:
        """Forget a worker; its running jobs are returned and stay running until ``failed`` or ``done``."""
        gone = self.workers.pop(worker, None)
        return [self._jobs[r] for r in gone.running if r in self._jobs] if gone else []

    def assign(self, now: float) -> tuple[Job, PrefillWorker] | None:
        """The next job to start and the worker to run it (marked running), or None when nothing can start.

        Jobs are taken in order, skipping those no worker of their model has room for. Among the workers with
        room, the least loaded (fraction of capacity in use) wins; equally loaded ones take turns."""
        self.expire(now)
        for job in self._queued:
            worker = self._emptiest(job.model)
            if worker is not None:
                self._queued.remove(job)
                job.attempts += 1
                job.worker = worker.id
                worker.running.add(job.request_id)
                worker.order = next(self._turn)
                return job, worker
        return None

    def _emptiest(self, model: str) -> PrefillWorker | None:
        fits = [w for w in self.workers.values() if w.free > 0 and (not model or not w.model or w.model == model)]
        return min(fits, key=lambda w: (len(w.running) / w.capacity, w.order), default=None)

    def done(self, request_id: str) -> Job | None:
        """A job ended (its result is on the way to the decode worker, or it failed for good)."""
        job = self._jobs.pop(request_id, None)
        if job is None:
            return None
        if job.worker is None:
            self._queued.remove(job)
        else:
            self._release(job)
        return job

    cancel = done  # a cancelled job is simply over; the caller stops it on its worker if it was running

    def queued_jobs(self) -> list[Job]:
        """The jobs waiting for a worker, oldest first."""
        return list(self._queued)

    def failed(self, request_id: str) -> bool:
        """A running job's worker died or could not run it: back to the front of the queue while attempts
        remain (True), else the job is over (False, removed)."""
        job = self._jobs.get(request_id)
        if job is None or job.worker is None:
            return False
        self._release(job)
        if job.attempts >= self.max_attempts:
            del self._jobs[request_id]
            return False
        self._queued.appendleft(job)
        return True

    def expire(self, now: float) -> list[Job]:
        """Drop the queued jobs whose deadline has passed."""
        expired = [j for j in self._queued if j.deadline < now]
        for job in expired:
            self._queued.remove(job)
            del self._jobs[job.request_id]
        return expired

    def _release(self, job: Job) -> None:
        worker = self.workers.get(job.worker or "")
        if worker is not None:
            worker.running.discard(job.request_id)
        job.worker = None
