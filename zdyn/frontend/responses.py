"""OpenAI response shapes: chunks for streaming, one object otherwise, usage, logprobs and errors. No IO."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from zdyn.protocol import Delta, Finish, TokenLogprob, ToolCallDelta

if TYPE_CHECKING:
    from zdyn.frontend.openai import ParsedRequest


def error_body(message: str, type: str, status: int, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": status}}


def usage(finishes: list[Finish]) -> dict[str, Any]:
    prompt = finishes[0].prompt_tokens if finishes else 0
    completion = sum(f.completion_tokens for f in finishes)
    cached = max((f.cached_tokens for f in finishes), default=0)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def chat_logprobs(logprobs: list[TokenLogprob] | None) -> dict[str, Any] | None:
    if logprobs is None:
        return None
    return {
        "content": [
            {
                "token": lp.token,
                "logprob": lp.logprob,
                "bytes": list(lp.token.encode()),
                "top_logprobs": [
                    {"token": t.token, "logprob": t.logprob, "bytes": list(t.token.encode())} for t in lp.top
                ],
            }
            for lp in logprobs
        ]
    }


def completion_logprobs(logprobs: list[TokenLogprob] | None, offset: int) -> dict[str, Any] | None:
    if logprobs is None:
        return None
    offsets = []
    for lp in logprobs:
        offsets.append(offset)
        offset += len(lp.token)
    return {
        "tokens": [lp.token for lp in logprobs],
        "token_logprobs": [lp.logprob for lp in logprobs],
        "top_logprobs": [{t.token: t.logprob for t in lp.top} for lp in logprobs],
        "text_offset": offsets,
    }


class ResponseBuilder:
    """Shapes deltas into OpenAI chunks (streaming) or one response object."""

    def __init__(self, request: ParsedRequest, request_id: str) -> None:
        self.request = request
        self.chat = request.endpoint == "chat"
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + request_id
        self.object = "chat.completion" if self.chat else "text_completion"
        n = request.text.n
        self.texts = [""] * n
        self.logprobs: list[list[TokenLogprob]] = [[] for _ in range(n)]
        self.finishes: list[Finish | None] = [None] * n
        self.started = [False] * n
        self.reasoning = [""] * n
        self.calls: list[dict[int, dict[str, Any]]] = [{} for _ in range(n)]  # per choice, by call index

    def _base(self, object: str) -> dict[str, Any]:
        return {"id": self.id, "object": object, "created": self.request.created, "model": self.request.model}

    def chunks(self, delta: Delta) -> list[dict[str, Any]]:
        """The SSE chunks for one delta (the role announcement comes first for chat)."""
        i = delta.index
        out = []
        if self.chat and not self.started[i]:
            out.append(self._chunk(i, {"role": "assistant", "content": ""}, None, None))
        self.started[i] = True
        text = delta.text or ""
        offset = len(self.texts[i])
        self.texts[i] += text
        if delta.finish is not None:
            self.finishes[i] = delta.finish
        if text or delta.logprobs or delta.finish is not None or delta.reasoning or delta.tool_calls:
            logprobs = None
            if self.request.logprobs:
                logprobs = (chat_logprobs if self.chat else _completion_lp(offset))(delta.logprobs or [])
            body = {"text": text} if not self.chat else _chat_delta(delta, text)
            finish = delta.finish.reason if delta.finish is not None else None
            out.append(self._chunk(i, body, logprobs, finish))
        return out

    def _chunk(self, index: int, body: dict[str, Any], logprobs: Any, finish: str | None) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": index}
        if self.chat:
            choice["delta"] = body
        else:
            choice.update(body)
        choice["logprobs"] = logprobs
        choice["finish_reason"] = finish
        if finish is not None:
            choice["stop_reason"] = self.finishes[index].stop_reason  # type: ignore[union-attr]
        chunk = self._base(self.object + ".chunk" if self.chat else self.object)
        chunk["choices"] = [choice]
        if self.request.include_usage:
            chunk["usage"] = None
        return chunk

    def usage_chunk(self) -> dict[str, Any]:
        chunk = self._base(self.object + ".chunk" if self.chat else self.object)
        chunk["choices"] = []
        chunk["usage"] = usage([f for f in self.finishes if f is not None])
        return chunk

    def add(self, delta: Delta) -> None:
        """Accumulate a delta for a non-streaming response."""
        i = delta.index
        self.texts[i] += delta.text or ""
        self.reasoning[i] += delta.reasoning or ""
        for call in delta.tool_calls or ():
            _merge_call(self.calls[i], call)
        if delta.logprobs:
            self.logprobs[i].extend(delta.logprobs)
        if delta.finish is not None:
            self.finishes[i] = delta.finish

    def _message(self, index: int, text: str) -> dict[str, Any]:
        calls = [self.calls[index][k] for k in sorted(self.calls[index])]
        message: dict[str, Any] = {"role": "assistant", "content": text if text or not calls else None}
        if calls:
            message["tool_calls"] = calls
        if self.reasoning[index]:
            message["reasoning_content"] = self.reasoning[index]
        return message

    def response(self) -> dict[str, Any]:
        choices = []
        for i, text in enumerate(self.texts):
            finish = self.finishes[i]
            choice: dict[str, Any] = {"index": i}
            if self.chat:
                choice["message"] = self._message(i, text)
                choice["logprobs"] = chat_logprobs(self.logprobs[i]) if self.request.logprobs else None
            else:
                choice["text"] = text
                choice["logprobs"] = completion_logprobs(self.logprobs[i], 0) if self.request.logprobs else None
            choice["finish_reason"] = finish.reason if finish else None
            choice["stop_reason"] = finish.stop_reason if finish else None
            choices.append(choice)
        body = self._base(self.object)
        body["choices"] = choices
        body["usage"] = usage([f for f in self.finishes if f is not None])
        return body


def _chat_delta(delta: Delta, text: str) -> dict[str, Any]:
    body: dict[str, Any] = {"content": text} if text else {}
    if delta.reasoning:
        body["reasoning_content"] = delta.reasoning
    if delta.tool_calls:
        body["tool_calls"] = [_call_chunk(call) for call in delta.tool_calls]
    return body


def _call_chunk(call: ToolCallDelta) -> dict[str, Any]:
    """A tool-call delta as OpenAI streams it: id, type and name on a call's first chunk only."""
    chunk: dict[str, Any] = {"index": call.index}
    function: dict[str, Any] = {"arguments": call.arguments}
    if call.id is not None:
        chunk["id"] = call.id
        chunk["type"] = "function"
    if call.name is not None:
        function = {"name": call.name, "arguments": call.arguments}
    chunk["function"] = function
    return chunk


def _merge_call(calls: dict[int, dict[str, Any]], call: ToolCallDelta) -> None:
    """Add a tool-call delta to a choice's whole calls (non-streaming response)."""
    whole = calls.get(call.index)
    if whole is None:
        whole = calls[call.index] = {"id": call.id or "", "type": "function", "function": {"name": "", "arguments": ""}}
    if call.id:
        whole["id"] = call.id
    if call.name:
        whole["function"]["name"] = call.name
    whole["function"]["arguments"] += call.arguments


def _completion_lp(offset: int) -> Any:
    return lambda logprobs: completion_logprobs(logprobs, offset)
