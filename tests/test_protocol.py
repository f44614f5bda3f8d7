import copy
import pickle
import struct

import msgpack
import pytest

from zdyn.protocol import (
    CLASS_OF,
    PROTOCOL_VERSION,
    TYPE_OF,
    Cancel,
    Delta,
    Directory,
    Error,
    Finish,
    Generate,
    Heartbeat,
    HubEntry,
    Outputs,
    PrefillDone,
    PrefillJob,
    Process,
    ProtocolError,
    QueueLink,
    QueueStatus,
    Ready,
    Refused,
    RouteQuery,
    RouteReply,
    RouteUpdate,
    SamplingParams,
    TextRequest,
    TokenIds,
    TokenLogprob,
    TopLogprob,
    decode,
    encode,
)

EXAMPLES = [
    Ready(
        peer_id="w1",
        role="worker",
        model="m",
        engine="vllm",
        max_num_seqs=8,
        block_size=32,
        num_kv_blocks=100,
        host="10.0.0.2",
    ),
    Refused(reason="protocol version 9 is not 1"),
    Heartbeat(
        num_running=3,
        num_waiting=1,
        kv_usage=0.25,
        prefill_queues=[QueueLink(endpoint="tcp://q:5590", live=True, prefill_workers=["p0@10.0.0.3"])],
    ),
    Generate(request_id="r", token_ids=[1, 2, 3], sampling=SamplingParams(max_tokens=5, seed=7, stop_token_ids=[2])),
    Outputs(
        deltas=[
            Delta(request_id="a", token_ids=[5], num_cached_tokens=32),
            Delta(
                request_id="b",
                token_ids=[6, 7],
                text="hi",
                logprobs=[TokenLogprob(token_id=6, logprob=-0.5, top=[TopLogprob(token_id=6, logprob=-0.5)])],
                finish=Finish(reason="stop", stop_reason="\n", prompt_tokens=3, completion_tokens=2),
            ),
        ]
    ),
    Cancel(request_id="r"),
    Error(request_id="r", message="boom", status=400, type="invalid_request_error"),
    Process(request_id="p", request=TextRequest(messages=[{"role": "user", "content": "hi"}], stop=["x"], n=2)),
    RouteQuery(request_id="q", token_ids=[1, 2, 3], candidates=["w1", "w2"]),
    RouteReply(request_id="q", worker="w2", overlap_blocks=4, reason="kv: overlap 4/5 blocks"),
    RouteUpdate(request_id="q", event="finished"),
    PrefillJob(
        request=Generate(request_id="d", token_ids=[1, 2], kv_transfer_params={"do_remote_decode": True}),
        reply_to="tcp://10.0.0.2:6001",
        deadline_s=30.0,
    ),
    PrefillDone(request_id="d", kv_transfer_params={"remote_block_ids": [3, 4], "remote_port": 5600}),
    QueueStatus(queued=2, running=1, prefill_workers=1, capacity=4, workers=["p0@10.0.0.3"]),
    Directory(
        sender="processor-a-1",
        hubs=[HubEntry(hub_id="processor-a-1", endpoint="tcp://10.0.0.1:5556", kind="processor")],
    ),
]


def test_every_message_type_has_an_example():
    assert {type(m) for m in EXAMPLES} == set(TYPE_OF)


@pytest.mark.parametrize("msg", EXAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(msg):
    frames = encode(msg)
    assert frames[0] == bytes([TYPE_OF[type(msg)]])
    assert decode(frames) == msg


@pytest.mark.parametrize("msg", EXAMPLES, ids=lambda m: type(m).__name__)
def test_payload_is_plain_messagepack_map(msg):
    payload = msgpack.unpackb(encode(msg)[1], raw=False)
    assert isinstance(payload, dict)
    for name in payload:
        assert name in msg.__struct_fields__


def test_plain_msgpack_reader_sees_field_names_and_values():
    generate = Generate(request_id="r1", token_ids=[10, 11], sampling=SamplingParams(max_tokens=4, temperature=0.0))
    payload = msgpack.unpackb(encode(generate)[1], raw=False)
    packed = struct.pack("<2I", 10, 11)  # prompt ids: a bin of little-endian uint32
    assert payload == {"request_id": "r1", "token_ids": packed, "sampling": {"max_tokens": 4, "temperature": 0.0}}


@pytest.mark.parametrize("cls", [Generate, RouteQuery])
def test_prompt_ids_are_packed_and_a_plain_reader_unpacks_them(cls):
    ids = [0, 1, 255, 256, 65_535, 65_536, 2**32 - 1]
    payload = msgpack.unpackb(encode(cls(request_id="r", token_ids=ids))[1], raw=False)
    assert isinstance(payload["token_ids"], bytes) and len(payload["token_ids"]) == 4 * len(ids)
    assert list(struct.unpack(f"<{len(ids)}I", payload["token_ids"])) == ids
    assert isinstance(decode(encode(cls(request_id="r", token_ids=ids))).token_ids, TokenIds)


def test_prefill_job_carries_packed_ids_and_plain_arrays_still_decode():
    job = PrefillJob(request=Generate(request_id="r", token_ids=[7, 8, 9]), reply_to="tcp://x:1")
    payload = msgpack.unpackb(encode(job)[1], raw=False)
    assert payload["request"]["token_ids"] == struct.pack("<3I", 7, 8, 9)
    plain = msgpack.packb({"request": {"request_id": "r", "token_ids": [7, 8, 9]}, "reply_to": "tcp://x:1"})
    assert decode([bytes([TYPE_OF[PrefillJob]]), plain]) == job


@pytest.mark.parametrize("bad", [[-1], [2**32], ["a"], b"\x01\x02\x03", 5, {"a": 1}])
def test_bad_token_ids_are_a_protocol_error(bad):
    payload = msgpack.packb({"request_id": "x", "token_ids": bad})
    with pytest.raises(ProtocolError, match="token_ids"):
        decode([bytes([TYPE_OF[Generate]]), payload])


def test_token_ids_behave_as_a_sequence_of_ints():
    ids = TokenIds([3, 1, 2])
    assert ids == [3, 1, 2] and ids == TokenIds(b"\x03\x00\x00\x00\x01\x00\x00\x00\x02\x00\x00\x00")
    assert ids != [3, 1] and len(ids) == 3 and ids[0] == 3 and max(ids) == 3 and ids.tolist() == [3, 1, 2]
    assert pickle.loads(pickle.dumps(ids)) == ids and copy.deepcopy(ids) == ids
    assert Generate(request_id="r", token_ids=(5, 6)).token_ids == [5, 6]


def test_written_by_plain_msgpack_is_readable():
    payload = msgpack.packb({"request_id": "x", "token_ids": [1], "future_field": {"ignored": True}})
    msg = decode([bytes([TYPE_OF[Generate]]), payload])
    assert msg == Generate(request_id="x", token_ids=[1])


def test_ready_carries_protocol_version_by_default():
    payload = msgpack.unpackb(encode(Ready(peer_id="w", role="worker"))[1])
    assert "protocol_version" not in payload or payload["protocol_version"] == PROTOCOL_VERSION
    assert decode(encode(Ready(peer_id="w", role="worker"))).protocol_version == PROTOCOL_VERSION


@pytest.mark.parametrize(
    "frames, match",
    [
        ([b"\x10"], "expected 2 frames"),
        ([b"\x10", b"x", b"y"], "expected 2 frames"),
        ([b"\x7f", msgpack.packb({})], "unknown message type 0x7f"),
        ([b"", msgpack.packb({})], "expected 2 frames"),
        ([b"\x10", b"\xc1garbage"], "bad Generate payload"),
        ([b"\x10", msgpack.packb({"request_id": "r"})], "bad Generate payload"),
        ([b"\x10", msgpack.packb({"request_id": 5, "token_ids": []})], "bad Generate payload"),
        ([b"\x11", msgpack.packb([1, 2, 3])], "bad Outputs payload"),
    ],
)
def test_malformed_frames_raise_protocol_error(frames, match):
    with pytest.raises(ProtocolError, match=match):
        decode(frames)


def test_type_table_is_one_to_one():
    assert len(CLASS_OF) == len(TYPE_OF)
