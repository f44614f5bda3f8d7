from __future__ import annotations

from collections import Counter

import pytest

from zdyn.kv_events import KvBlockStored, KvEventBatch
from zdyn.protocol import Ready, Role
from zdyn.router import ActiveRequests, KvRouter, RoutingPolicy, SeqAction, SeqTracker, WorkerState
from zdyn.router.hashing import hash_blocks
from zdyn.router.policy import MODES
from zdyn.router.selector import Random, RoundRobin
from zdyn.rpc import Peer

BS = 4

# --- SeqTracker ---


def test_seq_in_order_duplicates_and_restart() -> None:
    t = SeqTracker()
    assert t.expected == 0
    assert [t.observe(s) for s in (0, 1, 2)] == [SeqAction.APPLY] * 3
    assert t.expected == 3
    assert t.observe(1) is SeqAction.DUPLICATE
    assert t.observe(2) is SeqAction.DUPLICATE
    assert t.expected == 3
    assert t.observe(0) is SeqAction.RESTART
    assert t.expected == 1
    assert t.observe(1) is SeqAction.APPLY


def test_seq_gap_is_filled_by_replay() -> None:
    t = SeqTracker()
    assert t.observe(0) is SeqAction.APPLY
    assert t.observe(4) is SeqAction.GAP
    assert t.observe(5) is SeqAction.GAP  # still missing 1..3: kept by the caller
    assert t.expected == 1  # replay from here
    assert not t.replay_incomplete(1)
    assert [t.replayed(s) for s in (1, 2, 3)] == [True, True, True]
    assert t.replayed(2) is False  # replayed twice
    assert [t.observe(s) for s in (4, 5)] == [SeqAction.APPLY, SeqAction.APPLY]
    assert t.expected == 6


def test_late_subscriber_asks_replay_from_zero() -> None:
    t = SeqTracker()
    assert t.observe(7) is SeqAction.GAP
    assert t.expected == 0
    assert [t.replayed(s) for s in range(7)] == [True] * 7
    assert t.observe(7) is SeqAction.APPLY


def test_seq_replay_that_cannot_cover_the_gap() -> None:
    t = SeqTracker()
    t.observe(0)
    assert t.observe(10) is SeqAction.GAP
    assert t.replay_incomplete(None)  # empty reply
    assert t.replay_incomplete(5)  # the publisher's buffer starts after what we miss
    assert not t.replay_incomplete(1)
    assert t.replayed(5) is False  # never silently skips ahead
    t.reset(5)  # the caller cleared the worker and rebuilds from seq 5
    assert [t.replayed(s) for s in (5, 6, 7, 8, 9)] == [True] * 5
    assert t.observe(10) is SeqAction.APPLY


def test_seq_reset_forgets_the_publisher() -> None:
    t = SeqTracker()
    for s in range(3):
        t.observe(s)
    t.reset()
    assert t.expected == 0
    assert t.observe(2) is SeqAction.GAP
    t.reset()
    assert t.observe(0) is SeqAction.APPLY


# --- ActiveRequests ---


def test_active_requests_accounting() -> None:
    a = ActiveRequests()
    a.add("r1", "w", prompt_blocks=10, overlap_blocks=4)
    a.add("r2", "w", prompt_blocks=5, overlap_blocks=0)
    a.add("r3", "v", prompt_blocks=3, overlap_blocks=9)  # overlap beyond the prompt counts as nothing new
    assert (a.prefill_blocks("w"), a.decode_blocks("w"), a.num_requests("w")) == (11, 11, 2)
    assert (a.prefill_blocks("v"), a.decode_blocks("v"), a.num_requests("v")) == (0, 0, 1)
    a.prefilled("r1")
    a.prefilled("r1")
    assert (a.prefill_blocks("w"), a.decode_blocks("w")) == (5, 11)
    a.finish("r1")
    a.finish("r1")
    a.finish("unknown")
    a.prefilled("unknown")
    assert (a.prefill_blocks("w"), a.decode_blocks("w"), a.num_requests("w")) == (5, 5, 1)
    a.finish("r2")  # never prefilled: its pending prefill goes too
    assert (a.prefill_blocks("w"), a.decode_blocks("w"), a.num_requests("w")) == (0, 0, 0)
    assert len(a) == 1 and "r3" in a


def test_active_request_id_reused_and_worker_removed() -> None:
    a = ActiveRequests()
    a.add("r", "w", 10, 0)
    a.add("r", "v", 2, 0)  # same id again: the first one is over
    assert (a.decode_blocks("w"), a.num_requests("w"), a.decode_blocks("v")) == (0, 0, 2)
    a.add("x", "v", 4, 0)
    a.remove_worker("v")
    assert (a.prefill_blocks("v"), a.decode_blocks("v"), a.num_requests("v"), len(a)) == (0, 0, 0, 0)
    a.finish("x")  # must not drive v's counts negative
    a.add("y", "v", 1, 0)
    assert a.num_requests("v") == 1 and a.decode_blocks("v") == 1


def test_requests_older_than_a_time_are_forgotten_oldest_first() -> None:
    a = ActiveRequests()
    a.add("old", "w", 10, 0, now=1.0)
    a.add("mid", "v", 4, 0, now=2.0)
    a.add("new", "w", 3, 0, now=3.0)
    a.prefilled("mid")
    assert a.expire(started_before=2.5) == 2
    assert len(a) == 1 and "new" in a
    assert (a.prefill_blocks("w"), a.decode_blocks("w"), a.num_requests("w")) == (3, 3, 1)
    assert (a.prefill_blocks("v"), a.decode_blocks("v"), a.num_requests("v")) == (0, 0, 0)
    assert a.expire(started_before=2.5) == 0


# --- RoutingPolicy ---


def states(*names: str, **kw: int) -> list[WorkerState]:
    return [WorkerState(n, **kw) for n in names]


def test_unknown_mode_lists_the_modes() -> None:
    with pytest.raises(ValueError) as e:
        RoutingPolicy("smart")
    assert all(m in str(e.value) for m in MODES)
    with pytest.raises(ValueError):
        RoutingPolicy("kv", temperature=-1)


def test_no_candidates_is_a_lookup_error() -> None:
    with pytest.raises(LookupError):
        RoutingPolicy().choose([], {}, 10, ActiveRequests())


def test_kv_prefers_the_cached_worker_whatever_the_seed() -> None:
    for seed in range(20):
        d = RoutingPolicy(seed=seed).choose(states("a", "b", "c"), {"b": 8, "c": 2}, 10, ActiveRequests())
        assert (d.worker, d.overlap_blocks) == ("b", 8)
        assert d.cost == 1.0 * (2 + 0) + 0 + 2
        assert d.reason == "kv: overlap 8/10 blocks, cost 4.0"


def test_load_outweighs_a_small_overlap() -> None:
    active = ActiveRequests()
    for i in range(5):
        active.add(f"r{i}", "a", 50, 0)
        active.prefilled(f"r{i}")
    d = RoutingPolicy().choose(states("a", "b"), {"a": 2}, 10, active)
    assert d.worker == "b"
    d = RoutingPolicy().choose(states("a", "b"), {"a": 200}, 300, active)  # a large overlap still wins
    assert d.worker == "a"


def test_pending_prefill_counts_with_the_overlap_weight() -> None:
    active = ActiveRequests()
    active.add("r", "a", 12, 0)  # 12 new blocks on a, their prefill still queued
    overlaps = {"a": 8}
    assert RoutingPolicy().choose(states("a", "b"), overlaps, 10, active).worker == "b"  # a: 14 + 12 + 2, b: 20
    active.prefilled("r")
    assert RoutingPolicy().choose(states("a", "b"), overlaps, 10, active).worker == "a"  # a: 2 + 12 + 2
    assert RoutingPolicy(overlap_weight=0.0).choose(states("a", "b"), overlaps, 10, active).worker == "b"  # load only


def test_ties_spread_across_workers() -> None:
    policy = RoutingPolicy(seed=1)
    picks = Counter(policy.choose(states("a", "b", "c", "d"), {}, 10, ActiveRequests()).worker for _ in range(200))
    assert set(picks) == {"a", "b", "c", "d"}
    assert min(picks.values()) > 20
    d = policy.choose(states("a", "b"), {}, 10, ActiveRequests())
    assert d.reason.endswith("tie of 2")


def test_ties_go_to_the_worker_with_fewer_requests() -> None:
    active = ActiveRequests()
    active.add("fully-cached", "a", 4, 4)  # costs nothing, but is a request in flight
    for seed in range(20):
        assert RoutingPolicy(seed=seed).choose(states("a", "b"), {}, 10, active).worker == "b"


def test_worker_at_capacity_is_chosen_only_when_all_are() -> None:
    active = ActiveRequests()
    for i in range(2):
        active.add(f"r{i}", "a", 1, 1)
    full = states("a", "b", max_num_seqs=2)
    d = RoutingPolicy().choose(full, {"a": 10}, 10, active)  # a popular prefix lives on a, but a is full
    assert d.worker == "b"
    assert "1 at capacity skipped" in d.reason
    for i in range(2):
        active.add(f"s{i}", "b", 1, 1)
    d = RoutingPolicy().choose(full, {"a": 10}, 10, active)
    assert d.worker == "a" and "all at capacity" in d.reason


def test_round_robin_and_random_respect_capacity_too() -> None:
    active = ActiveRequests()
    for i in range(2):
        active.add(f"r{i}", "a", 1, 1)
    full = states("a", "b", max_num_seqs=2)
    assert {RoutingPolicy("random", seed=s).choose(full, {}, 1, active).worker for s in range(20)} == {"b"}
    rr = RoutingPolicy("round-robin")
    assert [rr.choose(states("a", "b", "c"), {"c": 9}, 10, ActiveRequests()).worker for _ in range(6)] == list("abcabc")
    d = rr.choose(states("a", "b"), {"a": 3}, 10, ActiveRequests())
    assert (d.worker, d.overlap_blocks, d.reason) == ("a", 3, "round-robin")


def test_kv_load_avoids_a_worker_with_a_queue_while_another_has_none() -> None:
    cands = [WorkerState("a", num_waiting=3), WorkerState("b", num_running=5)]
    assert RoutingPolicy("kv-load").choose(cands, {"a": 10}, 10, ActiveRequests()).worker == "b"
    assert RoutingPolicy("kv").choose(cands, {"a": 10}, 10, ActiveRequests()).worker == "a"  # kv ignores it
    cands[1].num_waiting = 3  # both queue: the guard is off, cost decides (a: 30, b: 50)
    assert RoutingPolicy("kv-load").choose(cands, {"a": 10}, 10, ActiveRequests()).worker == "a"
    cands[0].num_waiting = 5  # a's longer queue now outweighs its overlap (a: 55 + 5, b: 40 + 10)
    assert RoutingPolicy("kv-load").choose(cands, {"a": 5}, 10, ActiveRequests()).worker == "b"


def test_kv_load_uses_published_kv_usage() -> None:
    cands = [WorkerState("a", num_kv_blocks=1000, kv_usage=0.9), WorkerState("b", num_kv_blocks=1000, kv_usage=0.1)]
    assert RoutingPolicy("kv-load").choose(cands, {"a": 5}, 10, ActiveRequests()).worker == "b"
    assert RoutingPolicy("kv").choose(cands, {"a": 5}, 10, ActiveRequests()).worker == "a"
    d = RoutingPolicy("kv-load").choose(cands, {}, 10, ActiveRequests())
    assert d.cost == 1.0 * 10 + 100 + 10


def test_softmax_is_seeded_and_favours_the_cheaper() -> None:
    cands = states("a", "b", "c")
    overlaps = {"a": 9, "b": 5}

    def run(seed: int) -> list[str]:
        policy = RoutingPolicy(temperature=0.5, seed=seed)
        return [policy.choose(cands, overlaps, 10, ActiveRequests()).worker for _ in range(300)]

    first = run(3)
    assert first == run(3)
    counts = Counter(first)
    assert counts["a"] > counts["b"] > counts["c"] > 0
    assert (
        "sampled at temperature 0.5"
        in RoutingPolicy(temperature=0.5).choose(cands, overlaps, 10, ActiveRequests()).reason
    )


async def test_round_robin_cycles_and_random_covers_all() -> None:
    peers = [Peer(name.encode(), Ready(peer_id=name, role=Role.WORKER), 0.0) for name in "abcd"]
    rr = RoundRobin()
    assert [(await rr.select("r", [], peers[:3])).peer.id for _ in range(6)] == list("abcabc")
    rnd = Random(seed=0)
    assert {(await rnd.select("r", [], peers)).peer.id for _ in range(100)} == set("abcd")


# --- KvRouter, end to end in memory ---


def router(*workers: str, **kw: object) -> KvRouter:
    r = KvRouter(BS, **kw)  # type: ignore[arg-type]
    for w in workers:
        r.add_worker(WorkerState(w))
    return r


PREFIX = list(range(1000, 1000 + 64 * BS))  # 64 blocks


def test_a_request_whose_end_never_comes_stops_counting_as_load() -> None:
    r = router("a", "b", request_ttl_s=60.0)
    r.route("lost", PREFIX, now=0.0)  # its processor dies: no PREFILLED, no FINISHED
    lost_on = next(w for w in ("a", "b") if r.active.num_requests(w))
    assert r.route("r2", [5, 6, 7], now=30.0).worker != lost_on  # still counted as load
    r.finished("r2")
    r.route("r3", [5, 6, 7], now=61.0)
    assert "lost" not in r.active and r.expired_requests == 1


def test_shared_prefix_follows_the_first_request_before_any_event() -> None:
    for seed in range(10):
        r = router("a", "b", "c", "d", seed=seed)
        first = r.route("r1", [*PREFIX, 1, 2, 3, 4, 5], now=0.0)
        r.prefilled("r1")  # first token seen; the worker's BlockStored is still on its way
        second = r.route("r2", [*PREFIX, 9, 9, 9, 9, 9, 9], now=0.1)
        assert second.worker == first.worker, seed
        assert second.overlap_blocks == 64


def test_without_prediction_a_shared_prefix_scatters() -> None:
    pairs = []
    for seed in range(10):
        r = router("a", "b", "c", "d", seed=seed, predict_ttl_s=0.0)
        pairs.append(r.route("r1", PREFIX, now=0.0).worker == r.route("r2", PREFIX, now=0.1).worker)
    assert not all(pairs)


def test_prediction_expires_and_real_events_take_over() -> None:
    r = router("a", "b", predict_ttl_s=1.0, seed=0)
    w = r.route("r1", PREFIX, now=0.0).worker
    r.finished("r1")
    assert r.route("r2", PREFIX, now=5.0).overlap_blocks == 0  # the prediction is gone
    r.finished("r2")
    r.apply_events(w, KvEventBatch(0, 0.0, [KvBlockStored(list(range(1, 65)), None, PREFIX, BS)]))
    d = r.route("r3", PREFIX, now=50.0)
    assert (d.worker, d.overlap_blocks) == (w, 64)


def test_unrelated_burst_spreads_evenly() -> None:
    r = router("a", "b", "c", "d", seed=0)
    picks = Counter(r.route(f"r{i}", [i] * 40 * BS, now=0.0).worker for i in range(8))
    assert picks == {"a": 2, "b": 2, "c": 2, "d": 2}


def test_finished_requests_free_their_worker() -> None:
    r = router("a", "b", seed=0, predict_ttl_s=0.0)
    first = r.route("r1", [1] * 40, now=0.0).worker
    r.finished("r1")
    assert r.active.num_requests(first) == 0 and r.active.decode_blocks(first) == 0


def test_removed_worker_is_never_chosen() -> None:
    r = router("a", "b", seed=0)
    r.apply_events("a", KvEventBatch(0, 0.0, [KvBlockStored(list(range(1, 65)), None, PREFIX, BS)]))
    assert r.route("r0", PREFIX, now=0.0).worker == "a"
    r.remove_worker("a")
    assert r.active.num_requests("a") == 0 and len(r.active) == 0
    r.apply_events("a", KvEventBatch(1, 0.0, [KvBlockStored([99], None, PREFIX[:BS], BS)]))  # a late event
    assert {r.route(f"r{i}", PREFIX, now=float(i)).worker for i in range(1, 30)} == {"b"}
    assert r.workers == ["b"]
    assert r.update_load("a", 1, 1, 0.5) is False


def test_candidates_restrict_the_choice_and_none_known_is_a_lookup_error() -> None:
    r = router("a", "b", seed=0)
    assert r.route("r1", PREFIX, candidates=["b", "ghost"]).worker == "b"
    with pytest.raises(LookupError):
        r.route("r2", PREFIX, candidates=["ghost"])
    with pytest.raises(LookupError):
        router().route("r3", PREFIX)


def test_lora_requests_do_not_share_the_base_prefix() -> None:
    r = router("a", "b", seed=0)
    r.apply_events("a", KvEventBatch(0, 0.0, [KvBlockStored(list(range(1, 65)), None, PREFIX, BS)]))
    assert r.route("r1", PREFIX, now=0.0, lora_name="adapter").overlap_blocks == 0
    assert hash_blocks(PREFIX, BS, "adapter") != hash_blocks(PREFIX, BS)


def test_router_with_unknown_block_size_routes_on_load_until_told() -> None:
    r = KvRouter(0, seed=0)
    r.add_worker("a")
    r.add_worker(WorkerState("b"))
    assert r.route("r1", PREFIX).overlap_blocks == 0
    r.set_block_size(BS)
    r.apply_events("a", KvEventBatch(0, 0.0, [KvBlockStored(list(range(1, 65)), None, PREFIX, BS)]))
    d = r.route("r2", PREFIX)
    assert (d.worker, d.overlap_blocks) == ("a", 64)
    r.clear_worker("a")
    assert r.indexer.num_blocks("a") == 0


def test_update_load_feeds_kv_load() -> None:
    r = KvRouter(BS, mode="kv-load", seed=0)
    r.add_worker(WorkerState("a", num_kv_blocks=1000))
    r.add_worker(WorkerState("b", num_kv_blocks=1000))
    assert r.update_load("a", num_running=30, num_waiting=0, kv_usage=0.8)
    assert {r.route(f"r{i}", [i] * 40).worker for i in range(5)} == {"b"}
