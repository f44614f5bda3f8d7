"""Request bodies: renders a dataset request as OpenAI chat or completions JSON, keeping session history."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from zdyn.bench.records import BenchRequest, RequestRecord
from zdyn.bench.tokens import TokenSynth

Api = Literal["chat", "completions"]
PromptFormat = Literal["text", "tokens"]
History = Literal["model", "synthetic"]

ENDPOINTS: dict[str, str] = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}


@dataclass(slots=True)
class RequestOptions:
    """Fields every request carries; ``extra_body`` is merged last (e.g. Dynamo's ``nvext``)."""

    model: str
    api: Api = "chat"
    prompt_format: PromptFormat = "text"
    ignore_eos: bool = False
    temperature: float | None = 0.0
    extra_body: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.prompt_format == "tokens" and self.api != "completions":
            raise ValueError("token-id prompts need the completions API")


Rendered = str | list[int]


class PromptBuilder:
    """Builds bodies at send time; a session's next turn resends its history plus the new message.

    With ``history="model"`` the previous turn's generated text goes into the history (falling back to the
    synthetic answer when that turn failed); with ``"synthetic"`` the dataset's answer always does.
    """

    def __init__(self, synth: TokenSynth, options: RequestOptions, history: History = "model") -> None:
        self.synth = synth
        self.options = options
        self.history_mode = history
        self.histories: dict[int, list[tuple[str, Rendered]]] = {}
        self._sent_turns: dict[int, list[tuple[str, Rendered]]] = {}

    def _render_ids(self, ids: list[int]) -> Rendered:
        return ids if self.options.prompt_format == "tokens" else self.synth.text(ids)

    def messages(self, request: BenchRequest, *, with_history: bool = True) -> list[tuple[str, Rendered]]:
        new = [(role, self._render_ids(self.synth.materialize(c))) for role, c in request.messages]
        if request.session is None or not with_history:
            return new
        self._sent_turns[request.index] = new
        return [*self.histories.get(request.session, []), *new]

    def body(self, request: BenchRequest, *, with_history: bool = True) -> dict[str, Any]:
        opts = self.options
        messages = self.messages(request, with_history=with_history)
        body: dict[str, Any] = {"model": opts.model}
        if opts.api == "chat":
            body["messages"] = [{"role": role, "content": content} for role, content in messages]
        elif opts.prompt_format == "tokens":
            body["prompt"] = [t for _, content in messages for t in content]
        else:
            body["prompt"] = "".join(str(content) for _, content in messages)
        body.update(max_tokens=request.output_len, stream=True, stream_options={"include_usage": True})
        if opts.temperature is not None:
            body["temperature"] = opts.temperature
        if opts.ignore_eos:
            body["ignore_eos"] = True
        body.update(opts.extra_body)
        return body

    def remember(self, request: BenchRequest, record: RequestRecord) -> None:
        """Append this turn and its answer to the session history."""
        if request.session is None:
            return
        answer: Rendered
        if self.history_mode == "model" and record.success:
            answer = self.synth.encode(record.text) if self.options.prompt_format == "tokens" else record.text
        elif request.synthetic_answer is not None:
            answer = self._render_ids(self.synth.materialize(request.synthetic_answer))
        else:
            answer = [] if self.options.prompt_format == "tokens" else ""
        turn = self._sent_turns.pop(request.index, None) or self.messages(request, with_history=False)
        self.histories.setdefault(request.session, []).extend([*turn, ("assistant", answer)])
