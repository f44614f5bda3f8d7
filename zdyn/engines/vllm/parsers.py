"""vLLM's tool-call and reasoning parsers (``--tool-call-parser``, ``--reasoning-parser``) behind zdyn's
per-choice ``ChoiceParser`` (``zdyn.tools``). They run in the processor, on the text it detokenized.

A streaming client gets what vLLM's streaming parser finds as it goes; when the choice ends, the whole text is
parsed once more (``extract_tool_calls``) and whatever the streamed calls lack is sent too, so a streamed answer
ends with the same calls as an answer that was not streamed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from zdyn.protocol import TextRequest, ToolCallDelta
from zdyn.tools import CallStream, ChoiceParser, Pieces

# zdyn's names for model families whose format one of vLLM's parsers reads
TOOL_PARSER_ALIASES = {"smollm2": "xlam", "qwen": "hermes", "qwen2.5": "hermes", "llama3": "llama3_json"}
# Parsers whose streaming variant is not used: vLLM's xlam streaming parser hands out the ``<tool_call>[{"name":``
# wrapper as content. A streamed choice through them gets its content and calls when it ends.
PARSED_AT_END = frozenset({"xlam"})


def tool_parser_names() -> list[str]:
    from vllm.tool_parsers import ToolParserManager

    return sorted({*ToolParserManager.list_registered(), *TOOL_PARSER_ALIASES})


def reasoning_parser_names() -> list[str]:
    from vllm.reasoning import ReasoningParserManager

    return sorted(ReasoningParserManager.list_registered())


class VllmParsers:
    """The model-family parsers a processor was started with (either may be None)."""

    def __init__(self, tokenizer: Any, tool_parser: str | None = None, reasoning_parser: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.tool_cls: Any = None
        self.tool_streams = True
        self.reasoning_cls: Any = None
        self.keeps_special_tokens = False
        if tool_parser:
            from vllm.tool_parsers import ToolParserManager

            name = TOOL_PARSER_ALIASES.get(tool_parser, tool_parser)
            self.tool_streams = name not in PARSED_AT_END
            try:
                self.tool_cls = ToolParserManager.get_tool_parser(name)
            except KeyError:
                raise ValueError(
                    f"unknown --tool-call-parser {tool_parser!r}; choose one of {', '.join(tool_parser_names())}"
                ) from None
            probe = _chat_request({"tools": [_PROBE_TOOL], "tool_choice": "auto"})
            adjusted = self.tool_cls(tokenizer, probe.tools).adjust_request(probe)  # fails here, not per request
            self.keeps_special_tokens = adjusted.skip_special_tokens is False
        if reasoning_parser:
            from vllm.reasoning import ReasoningParserManager

            try:
                self.reasoning_cls = ReasoningParserManager.get_reasoning_parser(reasoning_parser)
            except KeyError:
                raise ValueError(
                    f"unknown --reasoning-parser {reasoning_parser!r}; choose one of "
                    f"{', '.join(reasoning_parser_names())}"
                ) from None
            self.reasoning_cls(tokenizer)  # a tokenizer without the model's thinking tokens fails here
            self.keeps_special_tokens = True  # thinking tags are special tokens in most models

    @property
    def has_tool_parser(self) -> bool:
        return self.tool_cls is not None

    @property
    def has_reasoning_parser(self) -> bool:
        return self.reasoning_cls is not None

    def tool_calls(self, request: TextRequest) -> ChoiceParser:
        return VllmToolCalls(self.tool_cls, self.tokenizer, request, self.tool_streams)

    def reasoning(self, request: TextRequest) -> ChoiceParser | None:
        if self.reasoning_cls is None:
            return None
        return VllmReasoning(self.reasoning_cls(self.tokenizer), request)


_PROBE_TOOL = {"type": "function", "function": {"name": "probe", "parameters": {"type": "object"}}}


def _chat_request(fields: dict[str, Any]) -> Any:
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    return ChatCompletionRequest(model="zdyn", messages=[{"role": "user", "content": ""}], **fields)


class _Text:
    """The text and token ids of a choice so far, in the form vLLM's streaming parsers take them."""

    def __init__(self) -> None:
        self.text = ""
        self.token_ids: list[int] = []

    def step(self, text: str, token_ids: Sequence[int]) -> tuple[str, str, list[int], list[int]]:
        previous, previous_ids = self.text, self.token_ids
        self.text = previous + text
        self.token_ids = previous_ids + list(token_ids)
        return previous, self.text, previous_ids, self.token_ids


class VllmToolCalls:
    """One choice through a vLLM tool parser: streamed with its streaming parser, or parsed once at the end."""

    def __init__(self, parser_cls: Any, tokenizer: Any, request: TextRequest, streams: bool = True) -> None:
        self.parser_cls = parser_cls
        self.tokenizer = tokenizer
        self.request = _chat_request({"tools": request.tools, "tool_choice": "auto"})
        self.parser = parser_cls(tokenizer, self.request.tools)
        self.stream = request.stream and streams
        self.sofar = _Text()
        self.calls = CallStream()

    def feed(self, text: str, token_ids: Sequence[int], finish: bool) -> Pieces:
        previous, current, previous_ids, current_ids = self.sofar.step(text, token_ids)
        out = Pieces()
        if self.stream and (text or token_ids):
            message = self.parser.extract_tool_calls_streaming(
                previous, current, text, previous_ids, current_ids, list(token_ids), self.request
            )
            if message is not None:
                out.content = message.content or ""
                out.calls = self.calls.record([_delta(c) for c in message.tool_calls if c.function is not None])
        if finish:
            final = self.parser_cls(self.tokenizer, self.request.tools).extract_tool_calls(current, self.request)
            calls = [(c.function.name, c.function.arguments) for c in final.tool_calls] if final.tools_called else []
            if not self.stream:
                out.content = (final.content or "") if calls else current
            out.calls.extend(self.calls.complete(calls))
        return out


def _delta(call: Any) -> ToolCallDelta:
    return ToolCallDelta(index=call.index, id=call.id, name=call.function.name, arguments=call.function.arguments or "")


class VllmReasoning:
    """One choice through a vLLM reasoning parser: ``reasoning`` and ``content`` apart."""

    def __init__(self, parser: Any, request: TextRequest) -> None:
        self.parser = parser
        self.stream = request.stream
        self.request = _chat_request({})
        self.sofar = _Text()

    def feed(self, text: str, token_ids: Sequence[int], finish: bool) -> Pieces:
        previous, current, previous_ids, current_ids = self.sofar.step(text, token_ids)
        if not self.stream:
            if not finish:
                return Pieces()
            reasoning, content = self.parser.extract_reasoning(current, self.request)
            return Pieces(content=content or "", reasoning=reasoning or "")
        if not text and not token_ids:
            return Pieces()
        message = self.parser.extract_reasoning_streaming(
            previous, current, text, previous_ids, current_ids, list(token_ids)
        )
        if message is None:
            return Pieces()
        return Pieces(content=message.content or "", reasoning=message.reasoning or "")
