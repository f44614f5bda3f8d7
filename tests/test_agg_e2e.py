"""The agg scenario end to end: real frontend and vLLM worker processes on loopback, driven by openai."""

import json
import os
import signal
import time

import httpx
import openai
import pytest
from e2e import VLLM_TEST_ARGS, scratch_env
from helpers import wait_until
from transformers import AutoTokenizer

from zdyn.bench.deploy import ZdynSpec, start
from zdyn.bench.procs import free_port, get_json, scrape

pytestmark = pytest.mark.slow

LONG_PROMPT = "def fibonacci(n):\n    " + " ".join(f"value_{i} = {i} * n" for i in range(60))


@pytest.fixture(scope="module")
def agg(tiny_model, tmp_path_factory):
    # The model's whole context (2048), so that a long answer outlasts a hang-up (test_client_disconnect...)
    # --worker-wait 300: the last test kills the only worker and a request waits for its replacement's start-up
    # --metrics-port: the worker's counters (its replacement in the last test serves them on the same port)
    args = list(VLLM_TEST_ARGS)
    args[args.index("--max-model-len") + 1] = "2048"
    port = free_port()
    tmp = tmp_path_factory.mktemp("agg")
    spec = ZdynSpec("agg", workers=1, engine="vllm", model=str(tiny_model), worker_args=(*args, "--metrics-port",
                    str(port)), env=scratch_env(tmp), config={"Frontend": {"worker-wait": 300}})  # fmt: skip
    with start(spec, tmp / "logs", timeout_s=240) as dep:
        dep.metrics["worker"] = f"http://127.0.0.1:{port}/metrics"
        yield dep


def test_models_and_health(agg):
    models = agg.client().models.list()
    assert [m.id for m in models.data] == ["tiny-llama"]
    status, health = get_json(f"{agg.base_url}/health")
    assert status == 200 and health["status"] == "healthy"
    assert len(health["workers"]) == 1 and health["workers"][0]["engine"] == "vllm"


def test_chat_non_streaming(agg, tiny_model):
    r = agg.client().chat.completions.create(
        model=agg.model, messages=[{"role": "user", "content": "Hello there"}], max_tokens=12, temperature=0
    )
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content
    assert r.choices[0].finish_reason in ("length", "stop")
    tok = AutoTokenizer.from_pretrained(tiny_model)
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "Hello there"}], tokenize=False, add_generation_prompt=True
    )
    assert r.usage.prompt_tokens == len(tok.encode(prompt, add_special_tokens=False))
    assert 1 <= r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streaming_equals_non_streaming_and_reports_usage(agg):
    client = agg.client()
    kw = dict(model=agg.model, messages=[{"role": "user", "content": "Count to ten"}], max_tokens=20, temperature=0)
    whole = client.chat.completions.create(**kw, extra_body={"ignore_eos": True})
    chunks = list(
        client.chat.completions.create(
            **kw, stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True}
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert all(c.usage is None for c in chunks[:-1])


def test_completions_streaming_and_not(agg):
    client = agg.client()
    r = client.completions.create(model=agg.model, prompt="def add(a, b):", max_tokens=8, temperature=0)
    assert r.object == "text_completion" and r.usage.completion_tokens <= 8
    pieces = [
        c.choices[0].text
        for c in client.completions.create(
            model=agg.model, prompt="def add(a, b):", max_tokens=8, temperature=0, stream=True
        )
    ]
    assert "".join(pieces) == r.choices[0].text
    by_ids = client.completions.create(model=agg.model, prompt=[5, 6, 7, 8], max_tokens=3, temperature=0)
    assert by_ids.usage.prompt_tokens == 4


def test_repeated_prompt_reports_cached_tokens(agg):
    client = agg.client()
    first = client.completions.create(model=agg.model, prompt=LONG_PROMPT, max_tokens=2, temperature=0)
    second = client.completions.create(model=agg.model, prompt=LONG_PROMPT, max_tokens=2, temperature=0)
    assert first.usage.prompt_tokens > 100
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= 96 and cached % 32 == 0  # whole 32-token blocks from vLLM's prefix cache


def test_sampling_fields_take_effect(agg):
    client = agg.client()
    kw = dict(model=agg.model, prompt="import os\n", max_tokens=16)
    a = client.completions.create(**kw, temperature=1.0, seed=7, extra_body={"ignore_eos": True})
    b = client.completions.create(**kw, temperature=1.0, seed=7, extra_body={"ignore_eos": True})
    c = client.completions.create(**kw, temperature=1.0, seed=8, extra_body={"ignore_eos": True})
    assert a.choices[0].text == b.choices[0].text != c.choices[0].text
    greedy = client.completions.create(**kw, temperature=0, extra_body={"ignore_eos": True})
    assert greedy.usage.completion_tokens == 16
    # stop at a string taken from the greedy output's middle
    text = greedy.choices[0].text
    cut = text[len(text) // 2 : len(text) // 2 + 3]
    stopped = client.completions.create(**kw, temperature=0, stop=[cut], extra_body={"ignore_eos": True})
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == text[: text.index(cut)]


def test_logprobs_and_n(agg):
    client = agg.client()
    r = client.chat.completions.create(
        model=agg.model,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
        extra_body={"ignore_eos": True},
    )
    content = r.choices[0].logprobs.content
    assert len(content) == 4
    for item in content:
        assert item.logprob <= 0 and len(item.top_logprobs) == 2
        assert item.top_logprobs[0].logprob >= item.top_logprobs[1].logprob
        assert item.top_logprobs[0].logprob >= item.logprob - 1e-4  # greedy: the sampled token is the best
    assert "".join(i.token for i in content) == r.choices[0].message.content
    many = client.chat.completions.create(
        model=agg.model, messages=[{"role": "user", "content": "hi"}], max_tokens=6, n=3, seed=1, temperature=1.0
    )
    assert sorted(c.index for c in many.choices) == [0, 1, 2]
    assert len({c.message.content for c in many.choices}) > 1
    assert 3 <= many.usage.completion_tokens <= 18


@pytest.mark.parametrize(
    "body, status, fragment",
    [
        (b"{not json", 400, "invalid JSON"),
        (b'{"model": "tiny-llama", "messages": "hi"}', 400, "messages"),
        (b'{"model": "nope", "messages": [{"role": "user", "content": "x"}]}', 404, "does not exist"),
        (b'{"model": "tiny-llama", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}', 400, ">= 1"),
        (b'{"model": "tiny-llama", "messages": [{"role": "user", "content": "x"}], "temperature": "a"}', 400, "float"),
        (
            b'{"model": "tiny-llama", "messages": [{"role": "user", "content": "x"}], '
            b'"tools": [{"type": "function", "function": {"name": "f"}}]}',
            400,
            "--tool-call-parser",  # tool_choice "auto" (the default with tools) without a parser
        ),
        (
            b'{"model": "tiny-llama", "messages": [{"role": "user", "content": "x"}], "max_tokens": 5000}',
            400,
            "context",
        ),
    ],
)
def test_bad_input_gets_openai_errors(agg, body, status, fragment):
    r = httpx.post(f"{agg.base_url}/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status
    error = r.json()["error"]
    assert fragment in error["message"] and error["type"] and error["code"] == status


def test_prompt_longer_than_the_model_limit(agg):
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        agg.client().completions.create(model=agg.model, prompt="word " * 3000, max_tokens=4)
    r = httpx.post(f"{agg.base_url}/v1/nowhere", json={})
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.get(f"{agg.base_url}/v1/chat/completions")
    assert r.status_code == 405 and "error" in r.json()


def test_client_disconnect_aborts_in_vllm(agg):
    """Hanging up mid-stream cancels the request in the worker and vLLM lets it go at once.

    On 2 busy cores the whole answer may be written before the hang-up is noticed: then the worker finishes it
    (and may hear a Cancel after its end). Or a starved box misses libzmq heartbeats and the worker, losing its
    hub, cancels the request itself. Such an attempt is void and made again.
    """
    body = {"model": agg.model, "prompt": "x", "max_tokens": 2000, "stream": True, "ignore_eos": True}
    worker = agg.metrics["worker"]
    for _attempt in range(4):
        before, frontend_before = scrape(worker), scrape(agg.metrics["frontend"])
        with httpx.stream("POST", f"{agg.base_url}/v1/completions", json=body, timeout=30) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    break  # hang up after the first chunk
        after = wait_until(lambda b=before: ended(worker, b), 30, "the request did not end in the worker")
        if grew(after, before, CANCELLED_IN_FLIGHT):
            break
    assert grew(after, before, CANCELLED_IN_FLIGHT) and grew(after, before, WORKER_CANCELLED)
    # vLLM itself holds nothing and stopped generating: fewer than the 2,000 tokens asked for, half a second on
    unfinished, generated = (f'{name}{{worker="worker0"}}' for name in UNFINISHED_AND_GENERATED)
    wait_until(lambda: scrape(worker)[unfinished] == 0, 10, "vLLM still holds the request")
    time.sleep(0.5)
    assert scrape(worker)[generated] < before[generated] + 2000
    frontend = scrape(agg.metrics["frontend"])
    assert grew(frontend, frontend_before, 'zdyn_requests_total{endpoint="completions",status="cancelled"}')


WORKER_CANCELLED = 'zdyn_worker_requests_total{outcome="cancelled",worker="worker0"}'
CANCELLED_IN_FLIGHT = 'zdyn_worker_cancels_total{when="in_flight",worker="worker0"}'
UNFINISHED_AND_GENERATED = ("zdyn_engine_unfinished_requests", "zdyn_engine_generation_tokens_total")


def ended(url: str, before: dict[str, float]) -> dict[str, float] | None:
    """The worker's metrics once one more request has ended there (and nothing is in flight), else None."""
    now = scrape(url)
    done = sum(v for k, v in now.items() if k.startswith("zdyn_worker_requests_total"))
    done_before = sum(v for k, v in before.items() if k.startswith("zdyn_worker_requests_total"))
    return now if done > done_before and now['zdyn_worker_requests_in_flight{worker="worker0"}'] == 0 else None


def grew(after: dict[str, float], before: dict[str, float], prefix: str) -> bool:
    def total(m: dict[str, float]) -> float:
        return sum(v for k, v in m.items() if k.startswith(prefix))

    return total(after) > total(before)


def test_metrics_count_requests_and_latencies(agg):
    agg.client().completions.create(model=agg.model, prompt="a", max_tokens=2)
    text = httpx.get(f"{agg.base_url}/metrics").text
    for name in (
        "zdyn_requests_total",
        "zdyn_time_to_first_token_seconds_bucket",
        "zdyn_inter_token_latency_seconds_bucket",
        "zdyn_request_latency_seconds_count",
        "zdyn_requests_in_flight",
        "zdyn_live_workers 1.0",
    ):
        assert name in text
    assert 'zdyn_requests_total{endpoint="completions",status="success"}' in text
    assert 'status="error_400"' in text


def test_a_worker_death_mid_stream_waits_for_a_new_worker_and_the_stream_completes(agg):
    """kill -9 of the only worker while it streams: its vLLM EngineCore goes too, /health says 503, and the
    request is not lost: it waits (--worker-wait) for the worker started at run time and migrates to it with
    its tokens so far, so the client gets every token and one usage. (Last in this module: it replaces the worker.)"""
    dep = agg
    # 2,000 tokens: ~4 s of generation here, so that the kill lands mid-stream on busy cores
    body = {"model": dep.model, "prompt": "x", "max_tokens": 2000, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    killed, usage, errors = False, None, []
    with httpx.stream("POST", f"{dep.base_url}/v1/completions", json=body, timeout=300) as r:
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            errors += [chunk["error"]] if "error" in chunk else []
            usage = chunk.get("usage") or usage
            if not killed:  # streaming has begun: kill the worker process, not its EngineCore
                killed = True
                os.kill(dep.group.procs["worker0"].pid, signal.SIGKILL)
                dep.group.procs["worker0"].wait(5)  # reap it: a zombie would still count in its group
                assert_group_exits(dep.group.procs["worker0"].pid)  # its EngineCore did not outlive it
                wait_until(lambda: get_json(f"{dep.base_url}/health")[0] == 503, 10, "health still 200")
                dep.add_worker()  # joins at run time, nothing restarted
    assert killed and not errors
    assert usage is not None and usage["completion_tokens"] == 2000
    reissued = scrape(dep.metrics["frontend"])
    assert reissued.get('zdyn_reissued_requests_total{cause="peer_lost",kind="migration",role="frontend"}') == 1
    replacement = scrape(dep.metrics["worker"])  # the new worker serves its metrics on the same port
    assert replacement['zdyn_worker_requests_total{outcome="finished",worker="worker1"}'] == 1


def assert_group_exits(pgid: int, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    raise AssertionError(f"processes of group {pgid} still alive {timeout_s}s after their worker was killed")
