"""Wire messages exchanged between zdyn processes, and nothing else.

Every message travels as two frames, ``[type byte][MessagePack map]`` (ROUTER sockets add the peer
identity in front). Payloads are plain MessagePack maps keyed by field name, so any MessagePack
library can read them and a reader ignores fields it does not know. This module must not import
vLLM, torch or starlette.

Prompt token ids (``Generate.token_ids``, ``RouteQuery.token_ids``, and so a ``PrefillJob``'s request) are
sent packed: a MessagePack **bin** holding the ids as consecutive little-endian unsigned 32-bit integers
(4 bytes per token, no header), which any reader unpacks with e.g. ``numpy.frombuffer(b, "<u4")`` or
``struct.unpack(f"<{len(b) // 4}I", b)``. Decoders also accept a plain MessagePack array of integers there,
so any writer may send ids the plain way. Output deltas (``Delta.token_ids``) stay plain arrays: they carry
one token or a few, where a bin saves nothing.
"""

from __future__ import annotations

from enum import IntEnum, StrEnum
from typing import Any, Literal

import msgspec

from zdyn.token_ids import TokenIds, as_token_ids, dec_hook, enc_hook

PROTOCOL_VERSION = 1


class MsgType(IntEnum):
    READY = 0x01
    REFUSED = 0x02
    HEARTBEAT = 0x03
    GENERATE = 0x10
    OUTPUTS = 0x11
    CANCEL = 0x12
    ERROR = 0x13
    PROCESS = 0x20
    ROUTE_QUERY = 0x30
    ROUTE_REPLY = 0x31
    ROUTE_UPDATE = 0x32
    PREFILL_JOB = 0x40
    PREFILL_DONE = 0x41
    QUEUE_STATUS = 0x42
    DIRECTORY = 0x50


class Role(StrEnum):
    """What a peer registers as at a hub."""

    WORKER = "worker"  # agg or decode worker
    PREFILL = "prefill"  # prefill worker (registers at the prefill queue)
    PROCESSOR = "processor"  # a separate processor (registers at the frontend)


class RouteEvent(StrEnum):
    """What a processor tells its router about a routed request."""

    PREFILLED = "prefilled"  # first output seen: the prompt is in the worker's KV cache
    FINISHED = "finished"


FinishReason = Literal["stop", "length", "abort", "tool_calls"]


class Message(msgspec.Struct, omit_defaults=True, kw_only=True):
    """Base of all wire messages (map encoded, defaults omitted)."""


class StructuredOutputs(Message):
    """One constraint on the output, enforced by the engine's guided decoding (vLLM's structured outputs)."""

    json: str | None = None  # a JSON schema, JSON-encoded
    json_object: bool = False  # any JSON object
    regex: str | None = None
    choice: list[str] | None = None  # exactly one of these strings
    grammar: str | None = None  # an EBNF (or Lark) grammar


class SamplingParams(Message):
    """Sampling settings the engine honours. Stop strings are applied by the processor."""

    max_tokens: int = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = disabled
    min_p: float = 0.0
    seed: int | None = None
    stop_token_ids: list[int] = []
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None  # number of top logprobs per token; None = no logprobs
    structured: StructuredOutputs | None = None  # guided decoding; None = unconstrained


class Ready(Message):
    """First message of a peer to a hub: who it is and what it serves."""

    peer_id: str
    role: Role
    protocol_version: int = PROTOCOL_VERSION
    model: str = ""
    engine: str = ""  # "vllm" | "mocker" | ...
    max_num_seqs: int = 0
    max_model_len: int = 0
    block_size: int = 0
    num_kv_blocks: int = 0
    kv_events_endpoint: str = ""  # the worker's KV-event publisher (vLLM wire format), "" = none
    kv_replay_endpoint: str = ""  # where missed KV-event batches can be asked for again
    data_parallel_rank: int = 0
    kv_lease_s: float = 0.0  # a prefill worker keeps a finished prefill's KV this long for its reader; 0 = unbounded
    session: int = 0  # bumped each time the peer reconnects with a fresh socket (and dropped its requests)
    instance: str = ""  # random per process run: a new socket of the same run may take over its peer id
    host: str = ""  # the address this peer advertises to this hub (its host, as the hub's side reaches it)


class Refused(Message):
    """A hub's answer to a Ready it will not accept."""

    reason: str


class QueueLink(Message):
    """A decode worker's view of one prefill queue, as its heartbeat reports it (for the frontend's /health)."""

    endpoint: str  # the queue's jobs endpoint
    live: bool = False  # its status arrived recently
    queued: int = 0
    prefill_workers: list[str] = []  # "id@host" of the prefill workers registered there
    decisions: dict[str, int] = {}  # the decode worker's prefill decisions so far (remote, local, fallback, shared)


class Heartbeat(Message):
    """Liveness beacon, both directions. A worker's beat also carries its load."""

    num_running: int = 0
    num_waiting: int = 0
    kv_usage: float = 0.0  # fraction of KV blocks in use, 0..1
    worker_ids: list[str] = msgspec.field(default_factory=list)  # a separate processor's live workers
    worker_hosts: list[str] = msgspec.field(default_factory=list)  # ... and their hosts, in the same order
    router: str = ""  # a separate processor's router link: "" (none), "answering", "not answering", "never answered"
    prefill_queues: list[QueueLink] = msgspec.field(default_factory=list)  # a decode worker's prefill queues
    draining: bool = False  # shutting down: finishing what it has, takes nothing new


class Generate(Message):
    """Processor -> worker: run this prompt."""

    request_id: str
    token_ids: TokenIds  # packed on the wire; a list given here becomes TokenIds
    sampling: SamplingParams = msgspec.field(default_factory=SamplingParams)
    model: str = ""
    overlap_blocks: int = 0  # the router's estimate of leading prompt blocks already cached on this worker
    # vLLM's KV-connector parameters: {"do_remote_decode": true} on a prefill job; on the decode side, what the
    # prefill worker returned plus {"do_remote_prefill": true}, so the engine pulls the prompt's KV instead
    kv_transfer_params: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        self.token_ids = as_token_ids(self.token_ids)


# Sampling fields a model's generation_config.json may give defaults for (vLLM applies them the same way).
GENERATION_DEFAULTS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


class TextRequest(Message):
    """A validated OpenAI request as the processor needs it: a chat or a plain prompt."""

    messages: list[dict[str, Any]] | None = None  # chat
    prompt: str | list[int] | None = None  # completions: text or token ids
    sampling: SamplingParams = msgspec.field(default_factory=SamplingParams)
    sampling_set: list[str] = []  # sampling fields the client gave; the model's defaults fill the others
    max_tokens: int | None = None  # None: up to the model's context limit
    stop: list[str] = []
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    n: int = 1
    echo: bool = False
    chat_template_kwargs: dict[str, Any] = {}
    tools: list[dict[str, Any]] | None = None  # OpenAI tool definitions, as the chat template sees them
    tool_choice: Literal["none", "auto", "required", "named"] = "none"
    tool_name: str | None = None  # the function tool_choice "named" forces
    parallel_tool_calls: bool = True
    stream: bool = False  # the client streams: output parsers hand out what they can at once


class ChoiceProgress(Message):
    """How far one choice got before its processor was lost: the tokens the client already has."""

    index: int
    token_ids: list[int] = []
    finished: bool = False


class Process(Message):
    """Frontend -> separate processor: run a validated OpenAI request (``resume``: continue one that another
    processor started, which died)."""

    request_id: str
    request: TextRequest
    resume: list[ChoiceProgress] = []


class Cancel(Message):
    request_id: str


class TopLogprob(Message):
    token_id: int
    logprob: float
    token: str = ""  # filled in by the processor


class TokenLogprob(Message):
    token_id: int
    logprob: float
    token: str = ""  # filled in by the processor
    top: list[TopLogprob] = []


class Finish(Message):
    reason: FinishReason
    stop_reason: str | int | None = None  # the stop string or stop token id that ended the output
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0


class ToolCallDelta(Message):
    """A piece of one tool call in a choice's output; the first piece of a call carries its id and name."""

    index: int  # which call of the choice
    id: str | None = None
    name: str | None = None
    arguments: str = ""  # more of the call's JSON arguments


class Delta(Message):
    """New output of one request from one engine step (or one detokenizer step).

    Workers fill ``token_ids``; processors also fill ``text``. ``finish`` marks the last delta.
    """

    request_id: str
    index: int = 0
    token_ids: list[int] = []
    text: str | None = None
    reasoning: str | None = None  # reasoning text the processor's reasoning parser split from ``text``
    tool_calls: list[ToolCallDelta] | None = None  # tool calls the processor's tool parser found in the output
    logprobs: list[TokenLogprob] | None = None
    num_cached_tokens: int | None = None  # prefix-cache hit, on a request's first delta
    finish: Finish | None = None
    kv_transfer_params: dict[str, Any] | None = None  # a prefill's result: where the decode side pulls the KV from
    job_s: float | None = None  # a prefill worker's own time for the job, receipt to result (on its last delta)


class Outputs(Message):
    """A batch of deltas for many requests, sent once per engine step, not once per token."""

    deltas: list[Delta]


class Error(Message):
    """A request failed. ``status`` follows HTTP (400 bad request, 503 no capacity, 500 engine)."""

    request_id: str
    message: str
    status: int = 500
    type: str = "internal_error"
    param: str | None = None


class RouteQuery(Message):
    """Processor -> router: which of ``candidates`` (worker ids) should serve this prompt?"""

    request_id: str
    token_ids: TokenIds  # packed on the wire; a list given here becomes TokenIds
    candidates: list[str] = []  # empty: any live worker
    lora_name: str | None = None

    def __post_init__(self) -> None:
        self.token_ids = as_token_ids(self.token_ids)


class RouteReply(Message):
    """Router -> processor: the chosen worker and how many leading prompt blocks it already holds."""

    request_id: str
    worker: str = ""  # "" with ``error`` set: no decision, the processor falls back
    overlap_blocks: int = 0
    reason: str = ""
    error: str = ""


class RouteUpdate(Message):
    """Processor -> router, no reply: a routed request's prefill is done, or it has finished."""

    request_id: str
    event: RouteEvent


class PrefillJob(Message):
    """Decode worker -> prefill queue (DEALER -> ROUTER): prefill this prompt; ``PrefillDone`` comes back on the same
    connection."""

    request: Generate  # the decode worker's own request: same id, prompt and model
    reply_to: str = ""  # unused: the queue answers on the connection the job came in on, it dials nobody
    deadline_s: float = 0.0  # seconds the decode worker waits; the queue drops the job unstarted after that


class PrefillDone(Message):
    """Prefill queue -> decode worker, on the job's connection: done (``kv_transfer_params``) or failed (``error``)."""

    request_id: str
    kv_transfer_params: dict[str, Any] | None = None
    prefill_worker: str = ""
    error: str = ""
    prefill_s: float = 0.0  # queued + the prefill worker's own time: the part of the job's age the KV was not held
    kv_lease_s: float = 0.0  # the prefill worker's KV lease (Ready.kv_lease_s): decode must start within it


class QueueStatus(Message):
    """Prefill queue -> decode workers (PUB), on changes and periodically: how busy prefill is."""

    queued: int = 0  # jobs waiting for a prefill worker
    running: int = 0  # jobs on prefill workers
    prefill_workers: int = 0
    capacity: int = 0  # jobs the prefill workers take at once
    draining: bool = False  # the queue is shutting down: send jobs elsewhere
    workers: list[str] = []  # "id@host" of the registered prefill workers


class HubEntry(Message):
    """One hub of a deployment: where to dial it and who registers there."""

    hub_id: str  # unique per hub process (role, host, pid)
    endpoint: str = ""  # as peers dial it (tcp://host:port); "" while the hub does not know it yet
    accepts: Role = Role.WORKER  # the role of the peers that register there
    kind: str = ""  # what it is: "frontend", "processor", "router", "prefill-queue"
    model: str = ""  # the model it serves ("" = any)


class Directory(Message):
    """The hubs a process knows of (``zdyn.rpc.directory``): sent by a hub to its peers when it changes, by a
    spoke to its hubs (the hubs it is linked to, as it dials them), by a new hub to a seed, and in answer to one
    with no entries (a question)."""

    sender: str = ""  # the sending hub's id; "" from a spoke
    hubs: list[HubEntry] = []


Request = Generate | Process  # what a hub sends a spoke to serve

TYPE_OF: dict[type[Message], MsgType] = {
    Ready: MsgType.READY,
    Refused: MsgType.REFUSED,
    Heartbeat: MsgType.HEARTBEAT,
    Generate: MsgType.GENERATE,
    Outputs: MsgType.OUTPUTS,
    Cancel: MsgType.CANCEL,
    Error: MsgType.ERROR,
    Process: MsgType.PROCESS,
    RouteQuery: MsgType.ROUTE_QUERY,
    RouteReply: MsgType.ROUTE_REPLY,
    RouteUpdate: MsgType.ROUTE_UPDATE,
    PrefillJob: MsgType.PREFILL_JOB,
    PrefillDone: MsgType.PREFILL_DONE,
    QueueStatus: MsgType.QUEUE_STATUS,
    Directory: MsgType.DIRECTORY,
}
CLASS_OF: dict[int, type[Message]] = {int(t): cls for cls, t in TYPE_OF.items()}
_TYPE_FRAMES: dict[type[Message], bytes] = {cls: bytes([t]) for cls, t in TYPE_OF.items()}


_DECODERS = {int(t): msgspec.msgpack.Decoder(cls, dec_hook=dec_hook) for cls, t in TYPE_OF.items()}
_encoder = msgspec.msgpack.Encoder(enc_hook=enc_hook)


class ProtocolError(ValueError):
    """A frame that is not a valid zdyn message."""


def encode(msg: Message) -> list[bytes]:
    """Return the two frames ``[type byte, payload]`` of a message."""
    return [_TYPE_FRAMES[type(msg)], _encoder.encode(msg)]


def decode(frames: list[bytes]) -> Message:
    """Decode ``[type byte, payload]``; raise ProtocolError for anything malformed."""
    if len(frames) != 2 or len(frames[0]) != 1:
        raise ProtocolError(f"expected 2 frames [type, payload], got {len(frames)}")
    decoder = _DECODERS.get(frames[0][0])
    if decoder is None:
        raise ProtocolError(f"unknown message type 0x{frames[0][0]:02x}")
    try:
        return decoder.decode(frames[1])
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise ProtocolError(f"bad {CLASS_OF[frames[0][0]].__name__} payload: {e}") from e
