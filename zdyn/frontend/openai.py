"""OpenAI requests: decode a body into its schema (``zdyn.frontend.schema``), check what a type cannot say, and
shape the processor's ``TextRequest``. Every failure is a ``RequestError`` (400) naming the field at fault. No IO.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any

import msgspec

from zdyn.errors import RequestError
from zdyn.frontend.schema import (
    ROLES,
    AssistantMessage,
    ChatMessage,
    ChatRequest,
    CommonRequest,
    CompletionRequest,
    RefusalPart,
    TextPart,
    ToolMessage,
)
from zdyn.frontend.structured import apply_tools, check_json_value, structured_outputs
from zdyn.protocol import GENERATION_DEFAULTS, SamplingParams, StructuredOutputs, TextRequest

DEFAULT_MAX_DEPTH = 64
# Sampling fields copied as given; a field the client left out (None) keeps SamplingParams' default.
SAMPLING_FIELDS = (
    "temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty", "frequency_penalty",
    "repetition_penalty", "min_tokens", "stop_token_ids",
)  # fmt: skip
# Fields only their null value is accepted for, until zdyn implements them.
COMMON_NULL_ONLY = ("prompt_logprobs",)
CHAT_NULL_ONLY = ("prediction", "audio", "web_search_options", "reasoning_effort")
_DECODERS: dict[str, msgspec.json.Decoder[ChatRequest] | msgspec.json.Decoder[CompletionRequest]] = {
    "chat": msgspec.json.Decoder(ChatRequest),
    "completions": msgspec.json.Decoder(CompletionRequest),
}
_WHERE = re.compile(r"(?P<detail>.*?)(?: - at `\$\.?(?P<path>[^`]*)`)?", re.S)
_FIELD = re.compile(r"Object (?P<what>missing required|contains unknown) field `(?P<name>[^`]*)`")


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


def not_supported(param: str) -> RequestError:
    return invalid(f"'{param}' is not supported by this server yet; leave it out or null", param)


def parse_request(endpoint: str, body: bytes, max_depth: int = DEFAULT_MAX_DEPTH) -> ParsedRequest:
    """Validate an OpenAI chat or completions body (JSON bytes); raise RequestError (400) naming the bad field."""
    try:
        request = _DECODERS[endpoint].decode(body)
    except msgspec.ValidationError as e:
        raise validation_error(str(e)) from None
    except msgspec.DecodeError as e:
        raise invalid(f"invalid JSON body: {e}") from None
    except RecursionError:
        raise invalid(f"the JSON body is nested too deeply (at most {max_depth} levels)") from None
    _check_common(request)
    text = TextRequest(
        sampling=_sampling(request, structured_outputs(request, max_depth)),
        sampling_set=sorted(k for k in GENERATION_DEFAULTS if getattr(request, k) is not None),
        max_tokens=request.max_tokens,
        stop=[request.stop] if isinstance(request.stop, str) else request.stop or [],
        n=request.n or 1,
        include_stop_str_in_output=bool(request.include_stop_str_in_output),
        skip_special_tokens=request.skip_special_tokens is not False,
        stream=bool(request.stream),
    )
    include_usage = bool(request.stream_options and request.stream_options.include_usage)
    parsed = ParsedRequest(endpoint, request.model, text, bool(request.stream), include_usage)
    if isinstance(request, ChatRequest):
        _chat(request, parsed, max_depth)
    else:
        _completion(request, parsed)
    return parsed


def validation_error(text: str) -> RequestError:
    """Translate a msgspec validation message ("Expected `int` >= 1 - at `$.n`") into OpenAI's terms."""
    where = _WHERE.fullmatch(text)
    detail, path = (where["detail"], where["path"] or "") if where else (text, "")
    path = path.replace("[...]", "")  # msgspec's mark for "some value of this object"
    if field := _FIELD.fullmatch(detail):
        name = f"{path}.{field['name']}" if path else field["name"]
        if field["what"] == "missing required":
            return invalid(f"Missing required parameter: '{name}'.", name)
        if not path:
            return invalid(f"Unrecognized request argument supplied: {name}", name)
        return invalid(f"Unrecognized argument '{field['name']}' in '{path}'", name)
    if not path:
        return invalid(f"The request body must be a JSON object ({detail[0].lower()}{detail[1:]}).")
    if path.endswith("].role") and detail.startswith("Invalid value"):
        detail += f"; supported roles are {', '.join(ROLES)}"
    return invalid(f"Invalid '{path}': {detail[0].lower()}{detail[1:]}.", path)


def _check_common(request: CommonRequest) -> None:
    if request.stream_options is not None and not request.stream:
        raise invalid("'stream_options' is only allowed when 'stream' is true", "stream_options")
    if request.logit_bias:
        raise not_supported("logit_bias")
    for name in COMMON_NULL_ONLY:
        if getattr(request, name) is not None:
            raise not_supported(name)


def _sampling(request: CommonRequest, structured: StructuredOutputs | None) -> SamplingParams:
    given = {k: v for k in SAMPLING_FIELDS if (v := getattr(request, k)) is not None}
    ignore_eos = request.ignore_eos
    if ignore_eos is None and request.nvext is not None:
        ignore_eos = request.nvext.ignore_eos
    return SamplingParams(**given, ignore_eos=bool(ignore_eos), structured=structured)


def _chat(request: ChatRequest, parsed: ParsedRequest, max_depth: int) -> None:
    if request.functions:
        raise not_supported("functions")
    if request.function_call not in (None, "none"):
        raise invalid("'function_call' is only allowed when 'functions' are specified", "function_call")
    if request.modalities is not None and set(request.modalities) - {"text"}:
        raise not_supported("modalities")
    for name in CHAT_NULL_ONLY:
        if getattr(request, name) is not None:
            raise not_supported(name)
    if request.top_logprobs and not request.logprobs:
        raise invalid("'top_logprobs' requires 'logprobs': true", "top_logprobs")
    text = parsed.text
    if request.max_completion_tokens is not None:  # OpenAI's newer name wins
        text.max_tokens = request.max_completion_tokens
    text.messages = [_message(i, m) for i, m in enumerate(request.messages)]
    apply_tools(request, text, max_depth)
    if request.chat_template_kwargs:
        check_json_value(request.chat_template_kwargs, "chat_template_kwargs", max_depth - 1)
        text.chat_template_kwargs = request.chat_template_kwargs
    parsed.logprobs = bool(request.logprobs)
    text.sampling.logprobs = (request.top_logprobs or 0) if request.logprobs else None


def _message(index: int, message: ChatMessage) -> dict[str, Any]:
    """The message as the chat template sees it: role, content as one string, name, tool calls."""
    out: dict[str, Any] = {"role": type(message).__struct_config__.tag}
    if isinstance(message, AssistantMessage):
        if message.content is None and not message.tool_calls and message.function_call is None:
            raise invalid("an assistant message needs 'content' or 'tool_calls'", f"messages[{index}].content")
        if message.tool_calls:
            out["tool_calls"] = msgspec.to_builtins(message.tool_calls)
    out["content"] = _content(index, message.content)
    if getattr(message, "name", None) is not None:
        out["name"] = message.name  # type: ignore[union-attr]
    if isinstance(message, ToolMessage):
        out["tool_call_id"] = message.tool_call_id
    return out


def _content(index: int, content: str | list[Any] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for j, part in enumerate(content):
        if isinstance(part, TextPart):
            texts.append(part.text)
        elif isinstance(part, RefusalPart):
            texts.append(part.refusal)
        else:
            kind = type(part).__struct_config__.tag
            raise invalid(f"only text content parts are supported, not '{kind}'", f"messages[{index}].content[{j}]")
    return "".join(texts)


def _completion(request: CompletionRequest, parsed: ParsedRequest) -> None:
    if request.echo:
        raise not_supported("echo")
    if request.suffix:
        raise not_supported("suffix")
    if request.best_of is not None and request.best_of != parsed.text.n:
        if request.best_of < parsed.text.n:
            raise invalid("'best_of' must be at least 'n'", "best_of")
        raise not_supported("best_of")
    parsed.text.prompt = _prompt(request.prompt)
    if request.logprobs is not None:
        parsed.logprobs = True
        parsed.text.sampling.logprobs = request.logprobs


def _prompt(prompt: str | list[Any]) -> str | list[int]:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one
    if not prompt:
        raise invalid("'prompt' must not be empty", "prompt")
    if isinstance(prompt, str) or all(isinstance(t, int) for t in prompt):
        return prompt
    if all(isinstance(p, str | list) for p in prompt):
        raise invalid("batched prompts are not supported; send one prompt per request", "prompt")
    raise invalid("'prompt' must be a string, a list of token ids, or a batch of one of them", "prompt")
