"""Tools and structured outputs of an OpenAI request: checked, and turned into what the processor and the engine
need (``TextRequest.tools``/``tool_choice`` and one ``StructuredOutputs`` constraint). No IO, no vLLM.

``tool_choice`` "required" and a named function are enforced by guided decoding, as vLLM does: "required" constrains
the output to a JSON array of ``{"name": ..., "arguments": {...}}`` objects, one of the tools each (the shape
SmolLM2 and xLAM were trained on), and a named function constrains it to that function's arguments. So even a small
model returns a call that parses and fits the tool's parameter schema.
"""

from __future__ import annotations

import json
import re
from typing import Any

import msgspec

from zdyn.errors import RequestError
from zdyn.frontend.schema import (
    INT64_MAX,
    INT64_MIN,
    ChatRequest,
    CommonRequest,
    FunctionDefinition,
    JsonObjectFormat,
    JsonSchemaFormat,
    NamedToolChoice,
    StructuredOutputsParams,
)
from zdyn.protocol import StructuredOutputs, TextRequest

FUNCTION_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for function names
ANY_OBJECT: dict[str, Any] = {"type": "object"}


def invalid(message: str, param: str | None = None) -> RequestError:
    return RequestError(message, 400, "invalid_request_error", param)


def structured_outputs(request: CommonRequest, max_depth: int) -> StructuredOutputs | None:
    """The request's one output constraint: ``response_format`` (chat) or vLLM's ``guided_*`` and
    ``structured_outputs`` extras. More than one kind is a 400, as in vLLM."""
    given: list[tuple[str, StructuredOutputs]] = []
    response_format = getattr(request, "response_format", None)
    if isinstance(response_format, JsonObjectFormat):
        given.append(("response_format", StructuredOutputs(json_object=True)))
    elif isinstance(response_format, JsonSchemaFormat):
        schema = response_format.json_schema.schema
        param = "response_format.json_schema.schema"
        constraint = StructuredOutputs(json_object=True) if schema is None else _json(schema, param, max_depth)
        given.append(("response_format", constraint))
    if request.guided_json is not None:
        given.append(("guided_json", _json(request.guided_json, "guided_json", max_depth)))
    if request.guided_regex is not None:
        given.append(("guided_regex", StructuredOutputs(regex=_non_empty(request.guided_regex, "guided_regex"))))
    if request.guided_choice is not None:
        given.append(("guided_choice", StructuredOutputs(choice=request.guided_choice)))
    if request.guided_grammar is not None:
        grammar = _non_empty(request.guided_grammar, "guided_grammar")
        given.append(("guided_grammar", StructuredOutputs(grammar=grammar)))
    if request.structured_outputs is not None:
        given.extend(_vllm_params(request.structured_outputs, max_depth))
    if len(given) > 1:
        names = ", ".join(name for name, _ in given)
        raise invalid(f"only one kind of structured output may be given, not {names}", given[1][0])
    return given[0][1] if given else None


def _vllm_params(params: StructuredOutputsParams, max_depth: int) -> list[tuple[str, StructuredOutputs]]:
    param = "structured_outputs"
    found = []
    if params.json is not None:
        found.append((f"{param}.json", _json(params.json, f"{param}.json", max_depth)))
    if params.regex is not None:
        found.append((f"{param}.regex", StructuredOutputs(regex=_non_empty(params.regex, f"{param}.regex"))))
    if params.choice is not None:
        found.append((f"{param}.choice", StructuredOutputs(choice=params.choice)))
    if params.grammar is not None:
        found.append((f"{param}.grammar", StructuredOutputs(grammar=_non_empty(params.grammar, f"{param}.grammar"))))
    if params.json_object:
        found.append((f"{param}.json_object", StructuredOutputs(json_object=True)))
    if not found:
        raise invalid("'structured_outputs' needs one of json, regex, choice, grammar or json_object", param)
    return found


def _non_empty(value: str, param: str) -> str:
    if not value:
        raise invalid(f"'{param}' must not be empty", param)
    return value


def _json(schema: dict[str, Any] | str, param: str, max_depth: int) -> StructuredOutputs:
    """A JSON schema, given as an object or as its JSON text, checked for depth and carried as JSON text."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as e:
            raise invalid(f"'{param}' is not valid JSON: {e}", param) from None
        if not isinstance(schema, dict):
            raise invalid(f"'{param}' must be a JSON schema object", param)
    check_json_value(schema, param, max_depth)
    return StructuredOutputs(json=json.dumps(schema))


def check_json_value(value: Any, param: str, max_depth: int) -> None:
    """Free-form JSON handed on: at most ``max_depth`` levels, integers in MessagePack's int64 range."""
    stack = [(value, max_depth)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth < 1:
                raise invalid(f"'{param}' is nested too deeply", param)
            stack.extend((child, depth - 1) for child in (item.values() if isinstance(item, dict) else item))
        elif isinstance(item, int) and not INT64_MIN <= item <= INT64_MAX:
            raise invalid(f"'{param}' holds an integer outside the 64-bit range", param)


def apply_tools(request: ChatRequest, text: TextRequest, max_depth: int) -> None:
    """Carry ``tools`` and ``tool_choice`` over to ``text``; "required" and a named function also set the
    constraint that makes the model's output a valid call (``text.sampling.structured``)."""
    tools = request.tools or []
    choice = request.tool_choice
    if not tools:
        if choice not in (None, "none"):
            raise invalid("'tool_choice' is only allowed when 'tools' are specified", "tool_choice")
        return
    names: list[str] = []
    for i, tool in enumerate(tools):
        name = tool.function.name
        if not FUNCTION_NAME.fullmatch(name):
            raise invalid(
                f"Invalid 'tools[{i}].function.name': '{name}' must be 1 to 64 letters, digits, '_' or '-'",
                f"tools[{i}].function.name",
            )
        if name in names:
            raise invalid(f"tool names must be unique; '{name}' is given twice", f"tools[{i}].function.name")
        if tool.function.parameters is not None:
            check_json_value(tool.function.parameters, f"tools[{i}].function.parameters", max_depth - 3)
        names.append(name)
    text.tools = [_tool(tool.function) for tool in tools]
    text.parallel_tool_calls = request.parallel_tool_calls is not False
    if choice == "none":
        text.tool_choice = "none"
        return
    if isinstance(choice, NamedToolChoice):
        if choice.function.name not in names:
            raise invalid(f"tool_choice names '{choice.function.name}', which is not one of the tools", "tool_choice")
        text.tool_choice, text.tool_name = "named", choice.function.name
        constraint = named_schema(text.tools, choice.function.name)
    elif choice == "required":
        text.tool_choice = "required"
        constraint = required_schema(text.tools, text.parallel_tool_calls)
    else:
        text.tool_choice = "auto"
        return
    if text.sampling.structured is not None:
        raise invalid(
            f"tool_choice '{text.tool_choice}' constrains the output to a tool call; it cannot be combined with "
            "response_format or guided decoding",
            "tool_choice",
        )
    text.sampling.structured = StructuredOutputs(json=json.dumps(constraint))


def _tool(function: FunctionDefinition) -> dict[str, Any]:
    """A tool as the chat template sees it: OpenAI's shape, without the fields the client left out."""
    given = {k: v for k, v in msgspec.to_builtins(function).items() if v is not None}
    return {"type": "function", "function": given}


def parameters(tool: dict[str, Any]) -> dict[str, Any]:
    return tool["function"].get("parameters") or ANY_OBJECT


def named_schema(tools: list[dict[str, Any]], name: str) -> dict[str, Any]:
    """The output of a forced call to ``name``: its arguments, as the tool's parameter schema says."""
    return next(parameters(t) for t in tools if t["function"]["name"] == name)


def required_schema(tools: list[dict[str, Any]], parallel: bool) -> dict[str, Any]:
    """The output of ``tool_choice: "required"``: a JSON array of calls, each ``{"name", "arguments"}`` of a tool."""
    calls = [
        {
            "type": "object",
            "properties": {
                "name": {"type": "string", "enum": [t["function"]["name"]]},
                "arguments": parameters(t),
            },
            "required": ["name", "arguments"],
        }
        for t in tools
    ]
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
    if not parallel:
        schema["maxItems"] = 1
    return schema
