from __future__ import annotations

from typing import Any

import pytest

from zdyn.engines.base import RequestError
from zdyn.engines.mocker.config import MockerConfig
from zdyn.engines.mocker.scheduler import Scheduler
from zdyn.engines.mocker.sequence import new_sequence
from zdyn.protocol import Finish, Generate, SamplingParams

VOCAB = 1000


def config(**overrides: Any) -> MockerConfig:
    settings: dict[str, Any] = {
        "block_size": 16,
        "num_blocks": 64,
        "max_model_len": 256,
        "vocab_size": VOCAB,
        "eos_token_id": 0,
        **overrides,
    }
    return MockerConfig(**settings)


def request(rid: str, prompt: list[int], **sampling: Any) -> Generate:
    return Generate(request_id=rid, token_ids=prompt, sampling=SamplingParams(**sampling))


def add(sched: Scheduler, rid: str, prompt: list[int], **sampling: Any) -> None:
    sched.add(new_sequence(request(rid, prompt, **sampling), sched.config))


def run(sched: Scheduler, max_steps: int = 10_000) -> tuple[dict[str, list[int]], dict[str, Finish]]:
    tokens: dict[str, list[int]] = {}
    finishes: dict[str, Finish] = {}
    for _ in range(max_steps):
        if not sched.has_work():
            return tokens, finishes
        for delta in sched.step():
            assert len(delta.token_ids) == 1
            tokens.setdefault(delta.request_id, []).extend(delta.token_ids)
            if delta.finish is not None:
                finishes[delta.request_id] = delta.finish
    raise AssertionError("scheduler did not drain")


def generate_one(prompt: list[int], cfg: MockerConfig | None = None, **sampling: Any) -> tuple[list[int], Finish]:
    sched = Scheduler(cfg or config())
    add(sched, "r", prompt, **sampling)
    tokens, finishes = run(sched)
    return tokens["r"], finishes["r"]


def test_admission_is_limited_by_max_num_seqs() -> None:
    sched = Scheduler(config(max_num_seqs=2))
    for i in range(5):
        add(sched, f"r{i}", [i + 1] * 10, max_tokens=4)
    sched.step()
    assert (sched.num_running, sched.num_waiting) == (2, 3)
    tokens, finishes = run(sched)
    assert len(finishes) == 5 and all(f.reason == "length" for f in finishes.values())
    assert sched.kv.num_active_blocks == 0


def test_chunked_prefill_splits_prompts_within_the_token_budget() -> None:
    sched = Scheduler(config(max_num_batched_tokens=64))
    add(sched, "a", list(range(1, 101)), max_tokens=3)
    add(sched, "b", list(range(201, 301)), max_tokens=3)
    plan = sched.schedule()
    assert [(c.seq.request_id, c.num_new_tokens) for c in plan.chunks] == [("a", 64)]
    assert plan.composition.prefill_tokens == (64,) and plan.composition.decode_context == ()
    assert sched.update(plan) == []  # the prompt is not finished: no token yet
    plan = sched.schedule()
    assert [(c.seq.request_id, c.num_new_tokens) for c in plan.chunks] == [("a", 36), ("b", 28)]
    assert plan.composition.prefill_context == (64, 0)
    deltas = sched.update(plan)
    assert [d.request_id for d in deltas] == ["a"]  # the step that completes a's prefill yields its first token
    plan = sched.schedule()
    assert [(c.seq.request_id, c.num_new_tokens, c.is_prefill) for c in plan.chunks] == [
        ("a", 1, False),
        ("b", 63, True),
    ]
    assert plan.composition.decode_context == (101,)
    assert sum(c.num_new_tokens for c in plan.chunks) <= 64


def test_without_chunked_prefill_a_prompt_waits_for_a_whole_budget() -> None:
    sched = Scheduler(config(enable_chunked_prefill=False, max_num_batched_tokens=256))
    add(sched, "a", list(range(1, 201)), max_tokens=2)
    add(sched, "b", list(range(301, 401)), max_tokens=2)
    plan = sched.schedule()
    assert [(c.seq.request_id, c.num_new_tokens) for c in plan.chunks] == [("a", 200)]
    sched.update(plan)
    plan = sched.schedule()
    assert [(c.seq.request_id, c.num_new_tokens) for c in plan.chunks] == [("a", 1), ("b", 100)]


def test_prefill_computes_only_uncached_tokens() -> None:
    sched = Scheduler(config())
    prompt = list(range(1, 81))
    add(sched, "a", prompt, max_tokens=2)
    run(sched)
    add(sched, "b", prompt[:64] + [999] * 10, max_tokens=2)
    plan = sched.schedule()
    assert plan.composition.prefill_tokens == (10,)
    assert plan.composition.prefill_context == (64,)
    _, finishes = run(sched)
    assert finishes["b"].cached_tokens == 64 and finishes["b"].prompt_tokens == 74


def test_watermark_holds_back_admission() -> None:
    cfg = config(num_blocks=20, watermark=0.45, max_model_len=64)  # 9 blocks stay free on admission
    sched = Scheduler(cfg)
    add(sched, "a", list(range(1, 64)), max_tokens=1)  # 4 blocks
    add(sched, "b", list(range(101, 164)), max_tokens=1)  # 4 blocks
    add(sched, "c", list(range(201, 264)), max_tokens=1)  # 4 more would leave 8 < 9 free
    plan = sched.schedule()
    assert [c.seq.request_id for c in plan.chunks] == ["a", "b"]
    assert sched.num_waiting == 1
    sched.update(plan)  # a and b finish (max_tokens=1), so c fits next step
    assert [c.seq.request_id for c in sched.schedule().chunks] == ["c"]


def test_preemption_recomputes_and_still_completes_identically() -> None:
    prompts = {f"r{i}": [i * 50 + j + 1 for j in range(48)] for i in range(3)}
    roomy = Scheduler(config(num_blocks=64, max_model_len=128))
    tight = Scheduler(config(num_blocks=10, max_model_len=128))
    for sched in (roomy, tight):
        for rid, prompt in prompts.items():
            add(sched, rid, prompt, max_tokens=60, ignore_eos=True)
    expected, _ = run(roomy)
    assert roomy.num_preemptions == 0
    preempted: list[str] = []
    tokens: dict[str, list[int]] = {}
    finishes: dict[str, Finish] = {}
    while tight.has_work():
        plan = tight.schedule()
        preempted += plan.preempted
        assert sum(c.num_new_tokens for c in plan.chunks) <= tight.config.max_num_batched_tokens
        for delta in tight.update(plan):
            tokens.setdefault(delta.request_id, []).extend(delta.token_ids)
            if delta.finish:
                finishes[delta.request_id] = delta.finish
        assert tight.kv.num_active_blocks <= 10
    assert tight.num_preemptions > 0
    assert preempted[0] == "r2"  # the most recently admitted request yields first
    assert tokens == expected
    assert all(f.reason == "length" and f.completion_tokens == 60 for f in finishes.values())
    assert tight.kv.num_active_blocks == 0


def test_preempted_request_goes_to_the_front_of_the_queue() -> None:
    sched = Scheduler(config(num_blocks=8, max_model_len=128, max_num_seqs=2))
    add(sched, "a", list(range(1, 49)), max_tokens=70, ignore_eos=True)
    add(sched, "b", list(range(101, 149)), max_tokens=70, ignore_eos=True)
    add(sched, "c", list(range(201, 210)), max_tokens=2, ignore_eos=True)
    while True:
        plan = sched.schedule()
        sched.update(plan)
        if plan.preempted:
            break
    assert plan.preempted == ["b"]
    assert [s.request_id for s in sched.waiting] == ["b", "c"]
    assert sched.waiting[0].num_computed == 0


def test_no_admission_in_a_step_that_preempted() -> None:
    # 4 blocks, 16-token budget: b's chunked prefill runs out of blocks and preempts itself. Its freed block
    # would let it back in at once, but vLLM admits nobody in such a step, to avoid thrashing.
    sched = Scheduler(config(num_blocks=4, max_model_len=64, max_num_batched_tokens=16, max_num_seqs=2, watermark=0))
    add(sched, "a", list(range(1, 17)), max_tokens=40, ignore_eos=True)
    add(sched, "b", list(range(101, 149)), max_tokens=4, ignore_eos=True)
    steps = []
    for _ in range(4):
        plan = sched.schedule()
        steps.append(([(c.seq.request_id, c.num_new_tokens) for c in plan.chunks], plan.preempted))
        sched.update(plan)
    assert steps == [
        ([("a", 16)], []),
        ([("a", 1), ("b", 15)], []),
        ([("a", 1), ("b", 15)], []),
        ([("a", 1)], ["b"]),
    ]
    assert [s.request_id for s in sched.waiting] == ["b"]
    tokens, finishes = run(sched)
    assert finishes["b"].completion_tokens == 4 and finishes["a"].completion_tokens == 40


def test_tokens_are_deterministic_per_seed() -> None:
    prompt = list(range(1, 20))
    first, _ = generate_one(prompt, max_tokens=20, ignore_eos=True)
    again, _ = generate_one(prompt, max_tokens=20, ignore_eos=True)
    assert first == again and all(0 <= t < VOCAB for t in first)
    assert len(set(first)) > 10
    other_engine, _ = generate_one(prompt, config(seed=7), max_tokens=20, ignore_eos=True)
    assert other_engine != first
    seeded_a, _ = generate_one(prompt, max_tokens=20, seed=42, ignore_eos=True)
    seeded_b, _ = generate_one(prompt, config(seed=7), max_tokens=20, seed=42, ignore_eos=True)
    assert seeded_a == seeded_b != first


def test_max_tokens_finishes_with_length() -> None:
    tokens, finish = generate_one(list(range(1, 20)), max_tokens=5, ignore_eos=True)
    assert len(tokens) == 5
    assert finish == Finish(reason="length", prompt_tokens=19, completion_tokens=5, cached_tokens=0)


def test_stop_token_ids_finish_with_the_stop_id() -> None:
    reference, _ = generate_one(list(range(1, 20)), max_tokens=30, seed=3, ignore_eos=True)
    index = next(i for i in range(3, 30) if reference[i] not in reference[:i])
    stop = reference[index]
    tokens, finish = generate_one(list(range(1, 20)), max_tokens=30, seed=3, stop_token_ids=[stop], ignore_eos=True)
    assert tokens == reference[: index + 1]
    assert finish.reason == "stop" and finish.stop_reason == stop and finish.completion_tokens == index + 1


def test_eos_stops_unless_ignored() -> None:
    reference, _ = generate_one(list(range(1, 20)), max_tokens=30, seed=5, ignore_eos=True)
    index = next(i for i in range(2, 30) if reference[i] not in reference[:i])
    cfg = config(eos_token_id=reference[index])
    tokens, finish = generate_one(list(range(1, 20)), cfg, max_tokens=30, seed=5)
    assert tokens == reference[: index + 1]
    assert finish.reason == "stop" and finish.stop_reason is None
    tokens, finish = generate_one(list(range(1, 20)), cfg, max_tokens=30, seed=5, ignore_eos=True)
    assert tokens == reference and finish.reason == "length"


def test_min_tokens_suppresses_early_stops() -> None:
    reference, _ = generate_one(list(range(1, 20)), max_tokens=30, seed=9, ignore_eos=True)
    stop = reference[0]
    tokens, finish = generate_one(
        list(range(1, 20)), max_tokens=30, seed=9, stop_token_ids=[stop], min_tokens=4, ignore_eos=True
    )
    assert stop not in tokens[:4]
    assert len(tokens) >= 4
    assert finish.reason == "length" or finish.stop_reason == stop


def test_abort_frees_blocks() -> None:
    sched = Scheduler(config())
    add(sched, "a", list(range(1, 60)), max_tokens=50)
    add(sched, "b", list(range(100, 160)), max_tokens=50)
    sched.step()
    assert sched.kv.num_active_blocks > 0
    assert sched.abort("a") and sched.abort("b")
    assert not sched.abort("a")
    assert sched.kv.num_active_blocks == 0 and not sched.has_work()


def test_abort_during_a_step_drops_its_output() -> None:
    sched = Scheduler(config())
    add(sched, "a", list(range(1, 20)), max_tokens=5)
    plan = sched.schedule()
    sched.abort("a")
    assert sched.update(plan) == []


@pytest.mark.parametrize(
    ("prompt", "sampling", "message"),
    [
        ([], {}, "empty"),
        (list(range(300)), {}, "maximum model length of 256"),
        (list(range(250)), {"max_tokens": 10}, "maximum context length is 256"),
        ([5, VOCAB], {}, f"token id {VOCAB}"),
        ([5], {"max_tokens": 0}, "max_tokens"),
        ([5], {"max_tokens": 2, "min_tokens": 3}, "min_tokens"),
    ],
)
def test_bad_requests_are_rejected(prompt: list[int], sampling: dict[str, Any], message: str) -> None:
    with pytest.raises(RequestError, match=message) as info:
        new_sequence(request("x", prompt, **sampling), config())
    assert info.value.status == 400


def test_duplicate_request_id_is_rejected() -> None:
    sched = Scheduler(config())
    add(sched, "a", [1, 2, 3])
    with pytest.raises(RequestError, match="already"):
        add(sched, "a", [1, 2, 3])
