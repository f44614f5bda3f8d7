from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
import zmq.asyncio

from zdyn.kv_events import (
    END_SEQ,
    KvAllCleared,
    KvBlockRemoved,
    KvBlockStored,
    KvEvent,
    KvEventBatch,
    KvEventError,
    decode_frames,
    decode_payload,
    encode_frames,
    encode_payload,
    normalize_hash,
    split_replay_reply,
)
from zdyn.kv_publisher import KvEventPublisher, is_bind_endpoint
from zdyn.protocol import ProtocolError

TS = 1795765826.446156
STORED_KEYS = [
    "type",
    "block_hashes",
    "parent_block_hash",
    "token_ids",
    "block_size",
    "lora_id",
    "medium",
    "lora_name",
    "extra_keys",
    "group_idx",
    "kv_cache_spec_kind",
]


def sample_events() -> list[KvEvent]:
    return [
        KvBlockStored(
            block_hashes=[2181922069734703492, 2**64 - 1],
            parent_hash=12727516518541667169,
            token_ids=list(range(2000, 2004)),
            block_size=2,
            extra_keys=[None, None],
            group_idx=0,
            kv_cache_spec_kind="full_attention",
        ),
        KvBlockRemoved([5], group_idx=0),
        KvAllCleared(),
    ]


def test_encoding_matches_vllm_0_32_bytes() -> None:
    # Built independently with msgpack from the field layout vLLM 0.32 publishes (maps keep insertion order).
    expected = msgpack.packb(
        [
            TS,
            [
                {
                    "type": "BlockStored",
                    "block_hashes": [2181922069734703492, 2**64 - 1],
                    "parent_block_hash": 12727516518541667169,
                    "token_ids": [2000, 2001, 2002, 2003],
                    "block_size": 2,
                    "lora_id": None,
                    "medium": "GPU",
                    "lora_name": None,
                    "extra_keys": [None, None],
                    "group_idx": 0,
                    "kv_cache_spec_kind": "full_attention",
                },
                {"type": "BlockRemoved", "block_hashes": [5], "medium": "GPU", "group_idx": 0},
                {"type": "AllBlocksCleared"},
            ],
            0,
        ]
    )
    assert encode_payload(sample_events(), ts=TS) == expected
    raw = msgpack.unpackb(expected)
    assert list(raw[1][0]) == STORED_KEYS


def test_optional_fields_are_omitted_when_default() -> None:
    event = KvBlockStored(block_hashes=[1], parent_hash=None, token_ids=[1, 2], block_size=2, medium=None)
    raw = msgpack.unpackb(encode_payload([event], ts=1.0, data_parallel_rank=None))
    assert raw == [
        1.0,
        [
            {
                "type": "BlockStored",
                "block_hashes": [1],
                "parent_block_hash": None,
                "token_ids": [1, 2],
                "block_size": 2,
                "lora_id": None,
                "medium": None,
                "lora_name": None,
            }
        ],
        None,  # msgspec keeps a default in array-like structs; vLLM's own EventBatch encodes the same
    ]


def test_round_trip() -> None:
    payload = encode_payload(sample_events(), ts=TS, data_parallel_rank=3)
    batch = decode_frames(encode_frames("kv", 41, payload))
    assert batch == KvEventBatch(seq=41, ts=TS, events=sample_events(), data_parallel_rank=3)
    assert encode_payload(batch.events, batch.ts, batch.data_parallel_rank) == payload


def test_legacy_array_events_decode() -> None:
    payload = msgpack.packb(
        [
            TS,
            [
                ["BlockStored", [b"\x00" * 24 + (7).to_bytes(8, "big")], None, [1, 2, 3, 4], 2, None],
                ["BlockStored", [-1], 7, [5, 6], 2, None, "GPU", None, None, 0, "full_attention"],
                ["BlockRemoved", [7, -1], "GPU"],
                ["AllBlocksCleared"],
            ],
        ]
    )
    batch = decode_payload(payload, seq=5)
    assert batch.data_parallel_rank is None and batch.seq == 5 and batch.num_skipped == 0
    first, second, removed, cleared = batch.events
    assert first == KvBlockStored(block_hashes=[7], parent_hash=None, token_ids=[1, 2, 3, 4], block_size=2, medium=None)
    assert isinstance(second, KvBlockStored)
    assert (second.block_hashes, second.parent_hash, second.group_idx) == ([2**64 - 1], 7, 0)
    assert second.kv_cache_spec_kind == "full_attention"
    assert removed == KvBlockRemoved([7, 2**64 - 1])
    assert cleared == KvAllCleared()


def test_map_batch_and_unknown_events() -> None:
    payload = msgpack.packb(
        {
            "ts": 12,
            "data_parallel_rank": 1,
            "events": [
                {"type": "BlockPinned", "block_hashes": [1]},
                ["SomethingNew", 1, 2],
                {"type": "BlockRemoved", "block_hashes": [9], "medium": "CPU", "locality": "LOCAL"},
            ],
        }
    )
    batch = decode_payload(payload)
    assert (batch.ts, batch.data_parallel_rank, batch.num_skipped) == (12.0, 1, 2)
    assert batch.events == [KvBlockRemoved([9], medium="CPU")]


def test_hash_normalisation() -> None:
    digest = bytes(range(32))
    assert normalize_hash(digest) == int.from_bytes(digest, "big") & (2**64 - 1)
    assert normalize_hash(b"\x01\x02") == 0x0102
    assert normalize_hash(-1) == 2**64 - 1
    assert normalize_hash(2**70 + 5) == 5
    assert normalize_hash(123) == 123
    for bad in (True, 1.5, "ab", None, b""):
        with pytest.raises(KvEventError):
            normalize_hash(bad)


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\xc1",
        b"not msgpack at all",
        msgpack.packb(42),
        msgpack.packb([1.0]),
        msgpack.packb([1.0, [], 0, 9]),
        msgpack.packb(["ts", []]),
        msgpack.packb([1.0, "events"]),
        msgpack.packb([1.0, [], "rank"]),
        msgpack.packb([1.0, [42]]),
        msgpack.packb([1.0, [[]]]),
        msgpack.packb([1.0, [{"block_hashes": [1]}]]),
        msgpack.packb([1.0, [{"type": "BlockStored", "block_hashes": "x", "token_ids": [], "block_size": 2}]]),
        msgpack.packb([1.0, [{"type": "BlockStored", "block_hashes": [1.5], "token_ids": [], "block_size": 2}]]),
        msgpack.packb([1.0, [{"type": "BlockStored", "block_hashes": [1], "token_ids": ["a"], "block_size": 2}]]),
        msgpack.packb([1.0, [{"type": "BlockStored", "block_hashes": [1], "token_ids": [1], "block_size": 0}]]),
        msgpack.packb([1.0, [["BlockStored", [1]]]]),
        msgpack.packb([1.0, [{"type": "BlockRemoved", "block_hashes": [1], "medium": 5}]]),
    ],
)
def test_garbage_raises_a_clear_error(payload: bytes) -> None:
    with pytest.raises(KvEventError) as info:
        decode_payload(payload)
    assert isinstance(info.value, ProtocolError) and str(info.value)


def test_bad_frames_raise() -> None:
    good = encode_payload([], ts=1.0)
    with pytest.raises(KvEventError, match="3 frames"):
        decode_frames([b"kv", good])
    with pytest.raises(KvEventError, match="8 bytes"):
        decode_frames([b"kv", b"\x00", good])
    with pytest.raises(KvEventError):
        split_replay_reply([b"x", b"", b"\x00" * 8, good])


def test_bind_heuristic_follows_vllm() -> None:
    assert is_bind_endpoint("tcp://*:5557")
    assert is_bind_endpoint("tcp://[::]:5557")
    assert is_bind_endpoint("ipc:///tmp/kv")
    assert is_bind_endpoint("inproc://kv")
    assert not is_bind_endpoint("tcp://127.0.0.1:5557")
    assert not is_bind_endpoint("tcp://0.0.0.0:5557")


async def receive(sub: zmq.asyncio.Socket, timeout_s: float = 2.0) -> list[bytes]:
    assert await sub.poll(int(timeout_s * 1000)), "no message"
    return list(await sub.recv_multipart())


async def test_publisher_binds_and_counts_batches(tmp_path: Path, ctx: zmq.asyncio.Context) -> None:
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    endpoint = f"ipc://{tmp_path}/kv.sock"
    async with KvEventPublisher(endpoint, topic="kv@w1", ctx=ctx) as pub:
        sub.connect(endpoint)
        await asyncio.sleep(0.2)
        for i in range(3):
            assert await pub.publish([KvBlockRemoved([i])], ts=float(i)) == i
        for i in range(3):
            frames = await receive(sub)
            assert frames[0] == b"kv@w1" and frames[1] == i.to_bytes(8, "big")
            assert decode_frames(frames).events == [KvBlockRemoved([i])]
        assert pub.next_seq == 3
    sub.close(0)


async def test_publisher_connects_to_a_bound_subscriber(ctx: zmq.asyncio.Context) -> None:
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.bind("tcp://127.0.0.1:*")
    endpoint = sub.getsockopt_string(zmq.LAST_ENDPOINT)
    pub = KvEventPublisher(endpoint, ctx=ctx)
    assert pub.endpoint == endpoint
    deadline = time.monotonic() + 5
    got = None
    while got is None and time.monotonic() < deadline:  # PUB drops until the connection is up
        await pub.publish([KvAllCleared()])
        if await sub.poll(50):
            got = await sub.recv_multipart()
    assert got is not None and decode_frames(got).events == [KvAllCleared()]
    await pub.close()
    sub.close(0)


async def replay(ctx: zmq.asyncio.Context, endpoint: str, start: int) -> list[tuple[int, bytes]]:
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(endpoint)
    await dealer.send_multipart([b"", start.to_bytes(8, "big")])
    replies = []
    while True:
        assert await dealer.poll(2000), "replay timed out"
        frames = await dealer.recv_multipart()
        assert len(frames) == 4 and frames[1] in (b"kv", b"")  # vLLM 0.32: ["", topic, seq, payload]
        seq, payload = split_replay_reply(frames)
        if seq == -1:
            assert frames[2] == END_SEQ and payload == b""
            break
        replies.append((seq, payload))
    dealer.close(0)
    return replies


async def test_replay_serves_buffered_batches(ctx: zmq.asyncio.Context) -> None:
    async with KvEventPublisher(
        "inproc://kv-replay-test", replay_endpoint="tcp://127.0.0.1:*", topic="kv", buffer_steps=3, ctx=ctx
    ) as pub:
        assert pub.replay_endpoint is not None and pub.replay_endpoint.startswith("tcp://127.0.0.1:")
        payloads = {}
        for i in range(5):
            await pub.publish([KvBlockRemoved([100 + i])], ts=float(i))
            payloads[i] = encode_payload([KvBlockRemoved([100 + i])], ts=float(i))
        assert await replay(ctx, pub.replay_endpoint, 3) == [(3, payloads[3]), (4, payloads[4])]
        # from 0, older than the buffer: a snapshot of what is cached (nothing: every batch removed) comes first,
        # numbered just before the oldest buffered batch
        snapshot = encode_payload([KvAllCleared()])
        got = await replay(ctx, pub.replay_endpoint, 0)
        assert got[0][0] == 1 and decode_payload(got[0][1]).events == decode_payload(snapshot).events
        assert got[1:] == [(i, payloads[i]) for i in (2, 3, 4)]
        assert await replay(ctx, pub.replay_endpoint, 9) == []
        junk = ctx.socket(zmq.DEALER)
        junk.connect(pub.replay_endpoint)
        await junk.send_multipart([b"", b"bad"])  # ignored, and the server keeps working
        junk.close(0)
        assert [s for s, _ in await replay(ctx, pub.replay_endpoint, 4)] == [4]


# ---------------------------------------------------------------------------------------------------------------
# Real vLLM versus the mocker. This file doubles as the vLLM capture script run in a subprocess (see __main__).

BLOCK_SIZE = 32
VLLM_TIMEOUT_S = 150


def scenario(vocab: int) -> list[list[int]]:
    """A, B sharing A's 2-block prefix, A again (hit), three 200-token prompts that force evictions."""
    prefix = list(range(10, 74))
    prompts = [prefix + list(range(100, 140)), prefix + list(range(200, 240)), prefix + list(range(100, 140))]
    return prompts + [[5 + (k * 211 + j) % (vocab - 5) for j in range(200)] for k in range(3)]


def build_tiny_llama(out: Path) -> int:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = [str(stdlib / name) for name in ("json/decoder.py", "json/encoder.py", "textwrap.py", "shlex.py")]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1000,
        special_tokens=["<|pad|>", "<|bos|>", "<|eos|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train(files, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>"
    )
    fast.save_pretrained(out)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=1,
        num_attention_heads=2,  # head_dim 32: the smallest the CPU attention backend accepts
        num_key_value_heads=2,
        vocab_size=len(fast),
        max_position_embeddings=1024,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    return len(fast)


def run_vllm(model_dir: Path, endpoint: str, result_file: Path) -> None:
    vocab = build_tiny_llama(model_dir)
    from vllm import LLM, SamplingParams
    from vllm.config import KVEventsConfig

    llm = LLM(
        model=str(model_dir),
        enforce_eager=True,
        block_size=BLOCK_SIZE,
        enable_prefix_caching=True,
        kv_cache_memory_bytes=64 * 2**20,
        num_gpu_blocks_override=12,
        max_model_len=256,  # 12 blocks of 32 tokens must hold one whole sequence
        kv_events_config=KVEventsConfig(enable_kv_cache_events=True, publisher="zmq", endpoint=endpoint, topic="kv"),
    )
    time.sleep(1.0)  # slow joiner: let the subscriber's subscription arrive
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    prompts = scenario(vocab)
    cached = []
    for prompt in prompts + ["reset", prompts[0]]:
        if prompt == "reset":
            assert llm.reset_prefix_cache()
            continue
        (output,) = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
        cached.append(output.num_cached_tokens)
    result_file.write_text(json.dumps({"vocab": vocab, "cached": cached}))
    time.sleep(0.5)  # let the publisher thread flush


async def drain(sub: zmq.asyncio.Socket, quiet_ms: int) -> list[list[bytes]]:
    messages = []
    while await sub.poll(quiet_ms):
        messages.append(list(await sub.recv_multipart()))
    return messages


def capture_vllm(tmp_path: Path) -> tuple[list[list[bytes]], dict[str, Any]]:
    endpoint = f"ipc://{tmp_path}/vllm-kv.sock"
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(endpoint)  # before vLLM binds: ZMQ connects once the socket file exists
    env = {
        **os.environ,
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_CACHE_ROOT": str(tmp_path / "cache"),
        "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"),
        "VLLM_RPC_BASE_PATH": str(tmp_path),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
    }
    result_file, log_file = tmp_path / "result.json", tmp_path / "vllm.log"
    messages: list[list[bytes]] = []
    with log_file.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, __file__, str(tmp_path / "model"), endpoint, str(result_file)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + VLLM_TIMEOUT_S
        try:
            while proc.poll() is None and time.monotonic() < deadline:
                if sub.poll(100):
                    messages.append(sub.recv_multipart())
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    while sub.poll(200):
        messages.append(sub.recv_multipart())
    sub.close(0)
    ctx.term()
    assert proc.returncode == 0, log_file.read_text()[-4000:]
    return messages, json.loads(result_file.read_text())


async def capture_mocker(tmp_path: Path, vocab: int) -> tuple[list[list[bytes]], list[int]]:
    from zdyn.engines.mocker import MockerConfig, MockerEngine
    from zdyn.protocol import Generate, SamplingParams

    endpoint = f"ipc://{tmp_path}/mocker-kv.sock"
    ctx = zmq.asyncio.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(endpoint)
    config = MockerConfig(
        block_size=BLOCK_SIZE,
        num_blocks=12,
        max_model_len=256,
        vocab_size=vocab,
        speedup=1000,
        kv_events_endpoint=endpoint,
        kv_events_topic="kv",
    )
    engine = MockerEngine(config)
    await engine.start()
    await asyncio.sleep(0.3)
    cached = []
    prompts = scenario(vocab)
    for i, prompt in enumerate([*prompts, None, prompts[0]]):
        if prompt is None:
            assert engine.reset_prefix_cache()
            continue
        request = Generate(request_id=f"r{i}", token_ids=prompt, sampling=SamplingParams(max_tokens=8, ignore_eos=True))
        async for delta in engine.generate(request):
            if delta.finish is not None:
                cached.append(delta.finish.cached_tokens)
    messages = await drain(sub, 300)
    await engine.shutdown()
    sub.close(0)
    ctx.term()
    return messages, cached


def check_stream(messages: list[list[bytes]]) -> list[KvEventBatch]:
    batches = [decode_frames(m) for m in messages]
    assert [b.seq for b in batches] == list(range(len(batches)))
    assert all(m[0] == b"kv" for m in messages)
    stored: set[int] = set()
    for batch in batches:
        assert batch.data_parallel_rank == 0 and batch.num_skipped == 0
        for event in batch.events:
            if isinstance(event, KvBlockStored):
                assert len(event.token_ids) == len(event.block_hashes) * event.block_size
                assert event.block_size == BLOCK_SIZE
                assert event.parent_hash is None or event.parent_hash in stored
                stored.update(event.block_hashes)
            elif isinstance(event, KvBlockRemoved):
                assert set(event.block_hashes) <= stored
            else:
                stored.clear()
    return batches


def shape(batch: KvEventBatch) -> list[str]:
    """Event types of a batch, with a run of removals counted once (eviction order differs, see report)."""
    names: list[str] = []
    for event in batch.events:
        name = type(event).__name__
        if not (names and names[-1] == name == "KvBlockRemoved"):
            names.append(name)
    return names


def raw_keys(messages: list[list[bytes]]) -> dict[str, list[str]]:
    keys: dict[str, list[str]] = {}
    for message in messages:
        raw = msgpack.unpackb(message[2])
        assert isinstance(raw, list) and len(raw) == 3
        for event in raw[1]:
            assert keys.setdefault(event["type"], list(event)) == list(event)
    return keys


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed")
async def test_real_vllm_and_mocker_events_have_the_same_structure(tmp_path: Path) -> None:
    vllm_messages, result = await asyncio.to_thread(capture_vllm, tmp_path)
    mocker_messages, mocker_cached = await capture_mocker(tmp_path, result["vocab"])

    for message in vllm_messages:  # our encoder reproduces vLLM's bytes exactly
        batch = decode_frames(message)
        assert encode_payload(batch.events, batch.ts, batch.data_parallel_rank) == message[2]

    real, mock = check_stream(vllm_messages), check_stream(mocker_messages)
    assert raw_keys(vllm_messages) == raw_keys(mocker_messages)
    assert set(raw_keys(vllm_messages)) == {"BlockStored", "BlockRemoved", "AllBlocksCleared"}
    assert result["cached"] == mocker_cached == [0, 64, 96, 0, 0, 0, 0]
    assert [shape(b) for b in real] == [shape(b) for b in mock]

    def stored(batches: list[KvEventBatch]) -> list[tuple[list[int], int, bool]]:
        return [
            (e.token_ids, len(e.block_hashes), e.parent_hash is None)
            for b in batches
            for e in b.events
            if isinstance(e, KvBlockStored)
        ]

    assert stored(real) == stored(mock)
    for batches in (real, mock):  # B's new block hangs off A's second block in both engines
        a, b = batches[0].events[0], batches[1].events[0]
        assert isinstance(a, KvBlockStored) and isinstance(b, KvBlockStored)
        assert b.parent_hash == a.block_hashes[1]


if __name__ == "__main__":
    run_vllm(Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # everything is delivered; skip vLLM's ~4 s interpreter teardown
