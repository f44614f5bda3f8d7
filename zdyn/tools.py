"""Tool calls and reasoning in a choice's output: the processor's per-choice output parsing. No IO, no vLLM.

The processor hands each choice's new text to that choice's parser (``feed(text, token_ids, finish)``) and gets
back ``Pieces``: plain content, reasoning text and tool-call deltas in OpenAI's streaming shape (the first piece
of a call carries its id and name, later pieces more of its JSON arguments). ``RequestOutputs.apply`` does that
for a ``Delta`` in place. Which parser a choice gets follows the request's ``tool_choice``:

- "named": the engine was constrained to the function's arguments (``zdyn.frontend.structured``), so all text
  is the arguments of one call;
- "required": the engine was constrained to a JSON array of ``{"name", "arguments"}``; it is parsed once whole;
- "auto": the model's own format, parsed by a model-family parser (vLLM's, ``zdyn.engines.vllm.parsers``,
  chosen with ``--tool-call-parser``);
- a reasoning parser (``--reasoning-parser``) first splits thinking text off, and the rest goes on as above.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from zdyn.errors import RequestError
from zdyn.protocol import Delta, TextRequest, ToolCallDelta


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass(slots=True)
class Pieces:
    """What a stretch of a choice's output turned out to be."""

    content: str = ""
    reasoning: str = ""
    calls: list[ToolCallDelta] = field(default_factory=list)

    def add(self, other: Pieces) -> None:
        self.content += other.content
        self.reasoning += other.reasoning
        self.calls.extend(other.calls)


class ChoiceParser(Protocol):
    def feed(self, text: str, token_ids: Sequence[int], finish: bool) -> Pieces:
        """The next ``text`` (and its ``token_ids``) of the choice; ``finish``: nothing follows."""
        ...


class ParserBackend(Protocol):
    """Model-family parsers (vLLM's): one new parser per choice."""

    keeps_special_tokens: bool  # the parsers need special tokens (tool-call or thinking tags) in the text

    @property
    def has_tool_parser(self) -> bool: ...

    @property
    def has_reasoning_parser(self) -> bool: ...

    def tool_calls(self, request: TextRequest) -> ChoiceParser: ...

    def reasoning(self, request: TextRequest) -> ChoiceParser | None:
        """A parser that puts thinking text in ``reasoning`` and the rest in ``content`` (None: not configured)."""
        ...


class CallStream:
    """The tool calls handed out so far in one choice, to finish them against the final parse."""

    def __init__(self) -> None:
        self.names: dict[int, str] = {}
        self.arguments: dict[int, str] = {}

    def record(self, calls: list[ToolCallDelta]) -> list[ToolCallDelta]:
        for call in calls:
            if call.name is not None:
                self.names[call.index] = call.name
                call.id = call.id or call_id()
            self.arguments[call.index] = self.arguments.get(call.index, "") + call.arguments
        return calls

    def complete(self, final: list[tuple[str, str]]) -> list[ToolCallDelta]:
        """What is missing from the streamed calls for them to be ``final`` (name, arguments) calls."""
        missing = []
        for index, (name, arguments) in enumerate(final):
            sent = self.arguments.get(index, "")
            if index not in self.names:
                missing.append(ToolCallDelta(index=index, id=call_id(), name=name, arguments=arguments))
            elif arguments.startswith(sent) and len(arguments) > len(sent):
                missing.append(ToolCallDelta(index=index, arguments=arguments[len(sent) :]))
        return self.record(missing)

    @property
    def count(self) -> int:
        return len(self.names)


class NamedCall:
    """tool_choice names a function: the output is that call's arguments (guided decoding made them so)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.started = False

    def feed(self, text: str, token_ids: Sequence[int], finish: bool) -> Pieces:
        if not self.started:
            self.started = True
            return Pieces(calls=[ToolCallDelta(index=0, id=call_id(), name=self.name, arguments=text)])
        return Pieces(calls=[ToolCallDelta(index=0, arguments=text)] if text else [])


class RequiredCalls:
    """tool_choice "required": a JSON array of ``{"name", "arguments"}``, parsed when the choice ends.

    Output that does not parse (cut short by ``max_tokens``) is handed out as content, as it is."""

    def __init__(self) -> None:
        self.text = ""

    def feed(self, text: str, token_ids: Sequence[int], finish: bool) -> Pieces:
        self.text += text
        if not finish:
            return Pieces()
        calls = parse_call_list(self.text)
        if calls is None:
            return Pieces(content=self.text)
        deltas = [ToolCallDelta(index=i, id=call_id(), name=n, arguments=a) for i, (n, a) in enumerate(calls)]
        return Pieces(calls=deltas)


def parse_call_list(text: str) -> list[tuple[str, str]] | None:
    """``[{"name": ..., "arguments": {...}}, ...]`` -> (name, arguments as JSON text) pairs; None if it is not."""
    try:
        items = json.loads(text)
    except ValueError:
        return None
    if not isinstance(items, list) or not items:
        return None
    calls = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            return None
        arguments = item.get("arguments", item.get("parameters", {}))
        calls.append((item["name"], arguments if isinstance(arguments, str) else json.dumps(arguments)))
    return calls


class ReasoningFirst:
    """A reasoning parser in front of another parser: thinking text goes to ``reasoning``, the rest to ``then``."""

    def __init__(self, reasoning: ChoiceParser, then: ChoiceParser | None) -> None:
        self.reasoning = reasoning
        self.then = then

    def feed(self, text: str, token_ids: Sequence[int], finish: bool) -> Pieces:
        split = self.reasoning.feed(text, token_ids, finish)
        if self.then is None:
            return split
        # Token ids are handed on only with the whole text: which of them belong to the content is not known.
        ids = token_ids if split.content == text else ()
        out = Pieces(reasoning=split.reasoning)
        if split.content or finish:
            out.add(self.then.feed(split.content, ids, finish))
        return out


@dataclass(slots=True)
class ChoiceState:
    parser: ChoiceParser
    calls: int = 0


class RequestOutputs:
    """Parses every choice of one request; ``apply`` rewrites each of its deltas in place."""

    def __init__(self, make: Callable[[], ChoiceParser], request: TextRequest, end_texts: tuple[str, ...] = ()) -> None:
        self.make = make
        self.tool_choice = request.tool_choice if request.tools else "none"
        self.parallel = request.parallel_tool_calls  # False: one call at most, as OpenAI
        self.end_texts = end_texts  # special tokens' text to drop from the end of an output (EOS kept in the text)
        self.choices: dict[int, ChoiceState] = {}

    def _state(self, index: int) -> ChoiceState:
        state = self.choices.get(index)
        if state is None:
            state = self.choices[index] = ChoiceState(self.make())
        return state

    def prime(self, index: int, text: str, token_ids: Sequence[int]) -> None:
        """A choice that another processor started (it died): parse what the client already has, hand out nothing
        of it, so that the rest continues the same calls."""
        state = self._state(index)
        state.calls += len(state.parser.feed(text, token_ids, False).calls)

    def apply(self, delta: Delta) -> None:
        state = self._state(delta.index)
        text = delta.text or ""
        if delta.finish is not None:
            text = next((text.removesuffix(end) for end in self.end_texts if text.endswith(end)), text)
        pieces = state.parser.feed(text, delta.token_ids, delta.finish is not None)
        delta.text = pieces.content
        delta.reasoning = pieces.reasoning or None
        delta.tool_calls = [c for c in pieces.calls if self.parallel or c.index == 0] or None
        state.calls += len(delta.tool_calls or ())
        finish = delta.finish
        if finish is not None and state.calls and finish.reason == "stop" and self.tool_choice in ("auto", "required"):
            finish.reason = "tool_calls"  # as OpenAI; a forced (named) call ends with "stop"


class OutputParsing:
    """A processor's output parsing: which parser each request's choices get (None: plain text)."""

    def __init__(self, backend: ParserBackend | None = None, special_texts: tuple[str, ...] = ()) -> None:
        self.backend = backend
        self.special_texts = special_texts  # the tokenizer's special tokens, dropped from an output's end

    @property
    def keeps_special_tokens(self) -> bool:
        return self.backend is not None and self.backend.keeps_special_tokens

    def for_request(self, request: TextRequest) -> RequestOutputs | None:
        """The request's parsing, or None when its text is handed out as it is. A request that needs a parser
        this processor does not have is a 400."""
        choice = request.tool_choice if request.tools else "none"
        chat = request.messages is not None  # reasoning is split off chat answers only, as in vLLM
        reasoning = chat and self.backend is not None and self.backend.has_reasoning_parser
        if choice == "none" and not reasoning:
            return None
        if choice == "auto" and (self.backend is None or not self.backend.has_tool_parser):
            raise RequestError(
                '"auto" tool choice needs a tool-call parser: start the frontend (or processor) with '
                '--tool-call-parser (hermes, llama3_json, smollm2, ...), or use tool_choice "required" or a '
                "named function",
                400,
                "invalid_request_error",
                "tool_choice",
            )
        end_texts = self.special_texts if self.keeps_special_tokens else ()
        return RequestOutputs(lambda: self._parser(request, choice, reasoning), request, end_texts)

    def _parser(self, request: TextRequest, choice: str, reasoning: bool) -> ChoiceParser:
        tools: ChoiceParser | None = None
        if choice == "named":
            tools = NamedCall(request.tool_name or "")
        elif choice == "required":
            tools = RequiredCalls()
        elif choice == "auto" and self.backend is not None:
            tools = self.backend.tool_calls(request)
        thinking = self.backend.reasoning(request) if reasoning and self.backend is not None else None
        if thinking is None:
            assert tools is not None
            return tools
        return ReasoningFirst(thinking, tools)


TOOL_PROMPT = """You are an expert in composing functions. You are given a question and a set of possible functions.
Based on the question, you may call one or more of the functions. If none of the functions fits, answer in text.

You have access to the following tools:
<tools>{tools}</tools>

To call functions, answer with only a list of calls in this format:
<tool_call>[{{"name": "func_name1", "arguments": {{"argument1": "value1"}}}}]</tool_call>"""


def chat_template_inputs(
    messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, template: str | None
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The messages and extra arguments for the chat template. A template that renders ``tools`` gets them; for
    one that does not (SmolLM2's), they go into the system message, and earlier calls into the assistant's text,
    in the ``<tool_call>[...]</tool_call>`` format SmolLM2 and xLAM were trained on."""
    if not tools:
        return messages, {}
    if template is not None and "tools" in template:
        return messages, {"tools": tools}
    functions = json.dumps([t["function"] for t in tools])
    prompt = TOOL_PROMPT.format(tools=functions)
    out = []
    for m in messages:
        if m.get("tool_calls"):
            calls = [{"name": c["function"]["name"], "arguments": _loads(c["function"]["arguments"])}
                     for c in m["tool_calls"]]  # fmt: skip
            m = {**m, "content": (m.get("content") or "") + f"<tool_call>{json.dumps(calls)}</tool_call>"}
            m.pop("tool_calls")
        out.append(m)
    if out and out[0]["role"] in ("system", "developer"):
        out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{prompt}"}
    else:
        out.insert(0, {"role": "system", "content": prompt})
    return out, {}


def _loads(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments
