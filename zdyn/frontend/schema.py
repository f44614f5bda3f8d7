"""The bodies of OpenAI's chat and completions requests as msgspec Structs: fields, types and ranges only.

Decoding a body into ``ChatRequest`` or ``CompletionRequest`` checks every type and range in one pass; what a
Struct cannot say (a field allowed only as its null or default value, a message without content) is checked in
``zdyn.frontend.openai``. Unknown fields are rejected, as OpenAI does. Fields that zdyn does not implement yet
(audio, predictions, ...) are typed here all the same, so that a later change only has to use them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from msgspec import Meta, Struct

INT32_MAX = 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # OpenAI's and vLLM's seed range; MessagePack carries no more
MAX_N = 16
MAX_STOP = 16
MAX_LOGPROBS = 20

TokenCount = Annotated[int, Meta(ge=1, le=INT32_MAX)]
TokenId = Annotated[int, Meta(ge=0, le=INT32_MAX)]
Seed = Annotated[int, Meta(ge=INT64_MIN, le=INT64_MAX)]
Penalty = Annotated[float, Meta(ge=-2.0, le=2.0)]
Logprobs = Annotated[int, Meta(ge=0, le=MAX_LOGPROBS)]


class Strict(Struct, forbid_unknown_fields=True, kw_only=True):
    """An object whose unknown fields are an error."""


# ------------------------------------------------------------------------------------------- content parts
class TextPart(Strict, tag_field="type", tag="text"):
    text: str


class RefusalPart(Strict, tag_field="type", tag="refusal"):
    refusal: str


class ImagePart(Struct, tag_field="type", tag="image_url"):
    image_url: Any = None


class AudioPart(Struct, tag_field="type", tag="input_audio"):
    input_audio: Any = None


class FilePart(Struct, tag_field="type", tag="file"):
    file: Any = None


UserPart = TextPart | ImagePart | AudioPart | FilePart
Parts = Annotated[list[TextPart], Meta(min_length=1)]
UserParts = Annotated[list[UserPart], Meta(min_length=1)]


# ---------------------------------------------------------------------------------------------- messages
class FunctionCall(Strict):
    name: str
    arguments: str


class ToolCall(Strict):
    id: str
    function: FunctionCall
    type: Literal["function"] = "function"


class Message(Strict, tag_field="role"):
    """A chat message; ``role`` picks the class."""


class SystemMessage(Message, tag="system"):
    content: str | Parts
    name: str | None = None


class DeveloperMessage(Message, tag="developer"):
    content: str | Parts
    name: str | None = None


class UserMessage(Message, tag="user"):
    content: str | UserParts
    name: str | None = None


class AssistantMessage(Message, tag="assistant"):
    content: str | list[TextPart | RefusalPart] | None = None
    name: str | None = None
    refusal: str | None = None
    tool_calls: list[ToolCall] | None = None
    function_call: FunctionCall | None = None
    # what OpenAI's and vLLM's own responses carry, so that a client can send an answer back as history
    audio: Any = None
    annotations: Any = None
    reasoning_content: str | None = None
    reasoning: str | None = None


class ToolMessage(Message, tag="tool"):
    content: str | Parts
    tool_call_id: str


class FunctionMessage(Message, tag="function"):
    content: str | None
    name: str


ChatMessage = SystemMessage | DeveloperMessage | UserMessage | AssistantMessage | ToolMessage | FunctionMessage
ROLES = ("system", "developer", "user", "assistant", "tool", "function")


# ------------------------------------------------------------------------------------- tools and formats
class FunctionDefinition(Strict):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(Strict, tag_field="type", tag="function"):
    function: FunctionDefinition


class FunctionName(Strict):
    name: str


class NamedToolChoice(Strict, tag_field="type", tag="function"):
    function: FunctionName


class TextFormat(Strict, tag_field="type", tag="text"):
    pass


class JsonObjectFormat(Strict, tag_field="type", tag="json_object"):
    pass


class JsonSchema(Strict):
    name: str
    description: str | None = None
    schema: dict[str, Any] | None = None
    strict: bool | None = None


class JsonSchemaFormat(Strict, tag_field="type", tag="json_schema"):
    json_schema: JsonSchema


ResponseFormat = TextFormat | JsonObjectFormat | JsonSchemaFormat
Choices = Annotated[list[str], Meta(min_length=1)]


class StructuredOutputsParams(Strict):
    """vLLM's ``structured_outputs`` object: one of json, regex, choice, grammar or json_object."""

    json: dict[str, Any] | str | None = None
    regex: str | None = None
    choice: Choices | None = None
    grammar: str | None = None
    json_object: bool | None = None
    # vLLM's tuning options: accepted, not implemented (the engine's defaults apply)
    disable_any_whitespace: bool | None = None
    disable_additional_properties: bool | None = None


# ------------------------------------------------------------------------------------------------ bodies
class StreamOptions(Strict):
    include_usage: bool | None = None
    include_obfuscation: bool | None = None
    continuous_usage_stats: bool | None = None  # vLLM's; accepted, not implemented


class NvExt(Struct, kw_only=True):
    """Dynamo's extension object; fields zdyn does not use are ignored, as Dynamo does."""

    ignore_eos: bool | None = None


class CommonRequest(Strict):
    """Fields that chat and completions share. ``None`` means "not given"."""

    model: str
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    max_tokens: TokenCount | None = None
    n: Annotated[int, Meta(ge=1, le=MAX_N)] | None = None
    temperature: Annotated[float, Meta(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Meta(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Meta(ge=-1, le=INT32_MAX)] | None = None
    min_p: Annotated[float, Meta(ge=0.0, le=1.0)] | None = None
    seed: Seed | None = None
    stop: str | Annotated[list[str], Meta(max_length=MAX_STOP)] | None = None
    stop_token_ids: list[TokenId] | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    repetition_penalty: Annotated[float, Meta(gt=0.0, le=2.0)] | None = None
    min_tokens: Annotated[int, Meta(ge=0, le=INT32_MAX)] | None = None
    ignore_eos: bool | None = None
    skip_special_tokens: bool | None = None
    include_stop_str_in_output: bool | None = None
    logit_bias: dict[str, Annotated[float, Meta(ge=-100.0, le=100.0)]] | None = None
    nvext: NvExt | None = None
    # accepted for compatibility, with no effect on the output
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    # vLLM's structured-output extras (at most one kind of constraint per request)
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: Choices | None = None
    guided_grammar: str | None = None
    structured_outputs: StructuredOutputsParams | None = None
    prompt_logprobs: Any = None


class ChatRequest(CommonRequest, kw_only=True):
    messages: Annotated[list[ChatMessage], Meta(min_length=1)]
    max_completion_tokens: TokenCount | None = None
    logprobs: bool | None = None
    top_logprobs: Logprobs | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    functions: list[FunctionDefinition] | None = None
    function_call: Literal["none", "auto"] | FunctionName | None = None
    response_format: ResponseFormat | None = None
    # OpenAI features zdyn does not have: only null (or their "off" value) is accepted
    prediction: Any = None
    audio: Any = None
    modalities: list[Literal["text", "audio"]] | None = None
    web_search_options: Any = None
    reasoning_effort: str | None = None


class CompletionRequest(CommonRequest, kw_only=True):
    # a string, token ids, or a batch of either (only batches of one are served)
    prompt: str | Annotated[list[str | TokenId | list[TokenId]], Meta(min_length=1)]
    logprobs: Logprobs | None = None
    echo: bool | None = None
    suffix: str | None = None
    best_of: Annotated[int, Meta(ge=1, le=MAX_N)] | None = None
