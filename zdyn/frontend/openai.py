"""OpenAI request validation and response shaping for the frontend. No IO."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from zdyn.errors import RequestError
from zdyn.protocol import GENERATION_DEFAULTS, Delta, Finish, SamplingParams, TextRequest, TokenLogprob

MAX_N = 16
MAX_STOP = 16
# Accepted for compatibility but with no effect on the output.
IGNORED = {"user", "metadata", "store", "service_tier", "parallel_tool_calls", "stream_options", "nvext"}
# Fields we recognise but do not implement: rejected so nobody gets silently different behaviour.
UNSUPPORTED = {
    "tools", "tool_choice", "functions", "function_call", "response_format", "logit_bias", "suffix",
    "best_of", "audio", "modalities", "prediction", "web_search_options", "reasoning_effort", "guided_json",
    "guided_regex", "guided_choice", "guided_grammar", "structured_outputs", "prompt_logprobs",
}  # fmt: skip
COMMON = {
    "model", "stream", "max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop",
    "stop_token_ids", "presence_penalty", "frequency_penalty", "repetition_penalty", "ignore_eos", "n",
    "min_tokens", "skip_special_tokens", "include_stop_str_in_output",
}  # fmt: skip
CHAT_FIELDS = COMMON | {
    "messages",
    "max_completion_tokens",
    "logprobs",
    "top_logprobs",
    "chat_template_kwargs",
}
COMPLETION_FIELDS = COMMON | {"prompt", "logprobs", "echo"}


@dataclass(slots=True)
class ParsedRequest:
    endpoint: str  # "chat" | "completions"
    model: str
    text: TextRequest
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False
    created: int = field(default_factory=lambda: int(time.time()))


def invalid(message: str, param: str | None = None) -> RequestError:
    return RequestError(message, 400, "invalid_request_error", param)


def error_body(message: str, type: str, status: int, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": status}}


def parse_request(endpoint: str, body: Any) -> ParsedRequest:
    """Validate an OpenAI chat or completions body; raise RequestError (400) naming the bad field."""
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object")
    allowed = CHAT_FIELDS if endpoint == "chat" else COMPLETION_FIELDS
    for key in body:
        if key in UNSUPPORTED:
            raise invalid(f"'{key}' is not supported by this server", key)
        if key not in allowed and key not in IGNORED:
            raise invalid(f"Unrecognized request argument supplied: {key}", key)
    model = _get(body, "model", str, required=True)
    stream = _get(body, "stream", bool, False)
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise invalid("'stream_options' must be an object", "stream_options")
    include_usage = bool((options or {}).get("include_usage", False))
    nvext = body.get("nvext") if isinstance(body.get("nvext"), dict) else {}

    text = TextRequest(
        sampling=_sampling(body, nvext),
        sampling_set=sorted(k for k in GENERATION_DEFAULTS if body.get(k) is not None),
        max_tokens=_max_tokens(body),
        stop=_stop(body),
        n=_get(body, "n", int, 1, low=1, high=MAX_N),
        include_stop_str_in_output=_get(body, "include_stop_str_in_output", bool, False),
        skip_special_tokens=_get(body, "skip_special_tokens", bool, True),
    )
    logprobs = False
    if endpoint == "chat":
        text.messages = _messages(body.get("messages"))
        text.chat_template_kwargs = _get(body, "chat_template_kwargs", dict, {})
        logprobs = _get(body, "logprobs", bool, False)
        top = _get(body, "top_logprobs", int, 0, low=0, high=20)
        if top and not logprobs:
            raise invalid("'top_logprobs' requires 'logprobs': true", "top_logprobs")
        text.sampling.logprobs = top if logprobs else None
    else:
        text.prompt = _prompt(body.get("prompt"))
        text.echo = _get(body, "echo", bool, False)
        if text.echo:
            raise invalid("'echo' is not supported by this server", "echo")
        top = body.get("logprobs")
        if top is not None:
            top = _get(body, "logprobs", int, 0, low=0, high=20)
            text.sampling.logprobs = top
            logprobs = True
    return ParsedRequest(endpoint, model, text, stream, include_usage, logprobs)


def _get(
    body: dict[str, Any],
    key: str,
    kind: type,
    default: Any = None,
    *,
    required: bool = False,
    low: float | None = None,
    high: float | None = None,
) -> Any:
    value = body.get(key)
    if value is None:
        if required:
            raise invalid(f"'{key}' is required", key)
        return default
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise invalid(f"'{key}' must be of type {kind.__name__}, got {type(value).__name__}", key)
    if low is not None and value < low:
        raise invalid(f"'{key}' must be >= {low}, got {value}", key)
    if high is not None and value > high:
        raise invalid(f"'{key}' must be <= {high}, got {value}", key)
    return value


def _sampling(body: dict[str, Any], nvext: dict[str, Any]) -> SamplingParams:
    ignore_eos = _get(body, "ignore_eos", bool, None)
    if ignore_eos is None:
        ignore_eos = bool(nvext.get("ignore_eos", False))
    stop_token_ids = body.get("stop_token_ids") or []
    if not isinstance(stop_token_ids, list) or not all(_is_int(t) and t >= 0 for t in stop_token_ids):
        raise invalid("'stop_token_ids' must be a list of non-negative integers", "stop_token_ids")
    return SamplingParams(
        temperature=_get(body, "temperature", float, 1.0, low=0.0, high=2.0),
        top_p=_get(body, "top_p", float, 1.0, low=1e-9, high=1.0),
        top_k=_get(body, "top_k", int, 0, low=-1),
        min_p=_get(body, "min_p", float, 0.0, low=0.0, high=1.0),
        seed=_get(body, "seed", int, None),
        presence_penalty=_get(body, "presence_penalty", float, 0.0, low=-2.0, high=2.0),
        frequency_penalty=_get(body, "frequency_penalty", float, 0.0, low=-2.0, high=2.0),
        repetition_penalty=_get(body, "repetition_penalty", float, 1.0, low=1e-9, high=2.0),
        min_tokens=_get(body, "min_tokens", int, 0, low=0),
        ignore_eos=ignore_eos,
        stop_token_ids=stop_token_ids,
    )


def _max_tokens(body: dict[str, Any]) -> int | None:
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    value = _get(body, key, int, None)
    if value is not None and value <= 0:
        raise invalid(f"'{key}' must be at least 1, got {value}", key)
    return value  # type: ignore[no-any-return]


def _stop(body: dict[str, Any]) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise invalid("'stop' must be a string or a list of strings", "stop")
    if len(stop) > MAX_STOP:
        raise invalid(f"'stop' may hold at most {MAX_STOP} strings", "stop")
    return stop


def _messages(messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise invalid("'messages' must be a non-empty list", "messages")
    result = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise invalid(f"messages[{i}] must be an object with a string 'role'", "messages")
        content = message.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise invalid(f"messages[{i}].content: only text parts are supported", "messages")
                parts.append(part["text"])
            content = "".join(parts)
        elif content is not None and not isinstance(content, str):
            raise invalid(f"messages[{i}].content must be a string or a list of text parts", "messages")
        result.append({**message, "content": content or ""})
    return result


def _prompt(prompt: Any) -> str | list[int]:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        raise invalid("batched prompts are not supported; send one prompt per request", "prompt")
    raise invalid("'prompt' must be a string or a non-empty list of token ids", "prompt")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


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
        if text or delta.logprobs or delta.finish is not None:
            logprobs = None
            if self.request.logprobs:
                logprobs = (chat_logprobs if self.chat else _completion_lp(offset))(delta.logprobs or [])
            body = {"text": text} if not self.chat else {"content": text} if text else {}
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
        if delta.logprobs:
            self.logprobs[i].extend(delta.logprobs)
        if delta.finish is not None:
            self.finishes[i] = delta.finish

    def response(self) -> dict[str, Any]:
        choices = []
        for i, text in enumerate(self.texts):
            finish = self.finishes[i]
            choice: dict[str, Any] = {"index": i}
            if self.chat:
                choice["message"] = {"role": "assistant", "content": text}
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


def _completion_lp(offset: int) -> Any:
    return lambda logprobs: completion_logprobs(logprobs, offset)
