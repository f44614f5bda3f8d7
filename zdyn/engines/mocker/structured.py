"""What a simulated engine answers to a structured-output request: a valid output where that is cheap to make.

The mocker draws its tokens at random, which no constraint accepts. For a request with ``choice``, ``json_object``
or a JSON schema it answers instead with text that satisfies the constraint (one of the choices; ``{}``; a
minimal instance of the schema), tokenized with the model's tokenizer, so that clients, tool calls and tests see
what a real engine's guided decoding would give. Regexes and grammars keep random tokens.
"""

from __future__ import annotations

import json
from typing import Any

from zdyn.protocol import StructuredOutputs

MAX_DEPTH = 16  # deeper schemas get null there


def valid_text(structured: StructuredOutputs, seed: int) -> str | None:
    """Text that satisfies ``structured``, or None where the mocker does not make one (regex, grammar)."""
    if structured.choice:
        return structured.choice[seed % len(structured.choice)]
    if structured.json_object:
        return "{}"
    if structured.json is not None:
        return json.dumps(instance(json.loads(structured.json)))
    return None


def scripted_token(script: list[int] | None, num_output: int, eos_token_id: int | None) -> int | None:
    """The next output token of a sequence with a ``script``: the script, then EOS (None: sample as usual)."""
    if script is None:
        return None
    return script[num_output] if num_output < len(script) else eos_token_id


def instance(schema: Any, depth: int = 0) -> Any:
    """A small value that validates against ``schema`` (the common keywords; a best effort beyond them)."""
    if not isinstance(schema, dict) or depth > MAX_DEPTH:
        return None
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][0]
    if "default" in schema:
        return schema["default"]
    for key in ("anyOf", "oneOf", "allOf"):
        if schema.get(key):
            return instance(schema[key][0], depth + 1)
    kind = schema.get("type", "object" if "properties" in schema else None)
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object":
        properties = schema.get("properties", {})
        return {name: instance(properties.get(name, {}), depth + 1) for name in schema.get("required", [])}
    if kind == "array":
        return [instance(schema.get("items", {}), depth + 1) for _ in range(int(schema.get("minItems", 0)))]
    if kind == "string":
        return "a" * max(1, int(schema.get("minLength", 1)))
    if kind in ("integer", "number"):
        low = schema.get("minimum", schema.get("exclusiveMinimum")) or 0
        return int(low) + (1 if "exclusiveMinimum" in schema else 0)
    if kind == "boolean":
        return True
    return None
