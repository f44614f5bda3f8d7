"""Prefill-queue accounting (credits, redelivery, depth, deadlines) and the disaggregation policy, no sockets."""

from __future__ import annotations

import math

import pytest

from zdyn.disagg import DisaggPolicy, Job, PrefillQueue


def job(rid: str, model: str = "m", deadline: float = math.inf) -> Job:
    return Job(request_id=rid, model=model, deadline=deadline)


def drain(q: PrefillQueue, now: float = 0.0) -> list[tuple[str, str]]:
    out = []
    while (a := q.assign(now)) is not None:
        out.append((a[0].request_id, a[1].id))
    return out


def test_jobs_wait_for_credit_and_go_in_order():
    q = PrefillQueue()
    for i in range(5):
        assert q.submit(job(f"r{i}"))
    assert q.assign(0.0) is None and q.queued == 5  # no prefill worker yet
    q.add_worker("p0", "m", capacity=2)
    assert drain(q) == [("r0", "p0"), ("r1", "p0")]
    assert (q.queued, q.running, q.capacity) == (3, 2, 2)
    q.done("r1")
    assert drain(q) == [("r2", "p0")]
    assert q.queued == 2


def test_an_idle_worker_gets_work_before_a_busy_one():
    q = PrefillQueue()
    q.add_worker("busy", "m", capacity=4)
    q.add_worker("idle", "m", capacity=4)
    for i in range(3):
        q.submit(job(f"a{i}"))
    drain(q)  # spread: busy 2, idle 1 or the reverse
    q.done(next(iter(q.workers["idle"].running)))
    q.submit(job("next"))
    [(rid, worker)] = drain(q)
    loads = {w.id: len(w.running) for w in q.workers.values()}
    assert rid == "next" and loads[worker] == 1  # went to the emptier worker, not behind the busier one
    # equally loaded workers take turns
    q2 = PrefillQueue()
    q2.add_worker("x", "m", 8)
    q2.add_worker("y", "m", 8)
    for i in range(6):
        q2.submit(job(f"j{i}"))
    assert [w for _, w in drain(q2)] == ["x", "y", "x", "y", "x", "y"]


def test_a_dead_workers_jobs_are_redelivered_first_then_given_up():
    q = PrefillQueue(max_attempts=2)
    q.add_worker("p0", "m", 1)
    q.add_worker("p1", "m", 1)
    q.submit(job("r0"))
    q.submit(job("r1"))
    q.submit(job("r2"))
    assert drain(q) == [("r0", "p0"), ("r1", "p1")]
    assert [j.request_id for j in q.remove_worker("p0")] == ["r0"]
    assert q.failed("r0")  # back at the front, ahead of r2
    assert q.queued == 2 and q.job("r0").attempts == 1
    q.done("r1")
    assert drain(q) == [("r0", "p1")]
    assert not q.failed("r0")  # second run failed too: over
    assert q.job("r0") is None and q.running == 0 and drain(q) == [("r2", "p1")]


def test_cancel_queued_and_running_jobs_frees_their_credit():
    q = PrefillQueue()
    q.add_worker("p0", "m", 1)
    q.submit(job("run"))
    q.submit(job("wait"))
    drain(q)
    cancelled = q.cancel("wait")
    assert cancelled is not None and cancelled.worker is None and q.queued == 0
    running = q.cancel("run")
    assert running is not None and q.workers["p0"].free == 1 and q.running == 0
    assert q.cancel("run") is None and q.done("nobody") is None and not q.failed("nobody")


def test_duplicates_deadlines_and_models():
    q = PrefillQueue()
    assert q.submit(job("r", deadline=5.0)) and not q.submit(job("r"))
    q.submit(job("other-model", model="n"))
    q.submit(job("late", deadline=1.0))
    assert [j.request_id for j in q.expire(2.0)] == ["late"]
    q.add_worker("p0", "m", 4)
    assert drain(q, now=3.0) == [("r", "p0")]  # the job for model n waits for a worker serving n
    assert q.queued == 1
    q.add_worker("pn", "n", 1)
    assert drain(q, now=3.0) == [("other-model", "pn")]
    with pytest.raises(ValueError):
        q.add_worker("bad", "m", 0)


def test_policy_is_conditional_and_changeable():
    p = DisaggPolicy(max_local_prefill_length=100, max_prefill_queue_size=2)
    assert not p.decide(100, 0, 0, 1).remote  # short enough to prefill here
    assert p.decide(101, 0, 0, 1).remote
    d = p.decide(300, 250, 0, 1)  # mostly cached here already
    assert not d.remote and d.new_tokens == 50
    assert not p.decide(500, 0, 2, 1).remote and "queue full" in p.decide(500, 0, 2, 1).reason
    assert not p.decide(500, 0, 0, 0).remote  # no prefill worker
    p.update(max_local_prefill_length=1000)
    assert not p.decide(500, 0, 0, 1).remote
    p.update(max_prefill_queue_size=0)
    p.update(max_local_prefill_length=0)
    assert not p.decide(500, 0, 0, 1).remote
    with pytest.raises(ValueError):
        p.update(max_local_prefill_length=-1)
