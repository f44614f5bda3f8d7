"""``--tool-call-parser`` and ``--reasoning-parser``: the model-family output parsers of a processor (embedded in
the frontend or on its own). They are vLLM's parsers, so vLLM must be installed where they are used."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from zdyn.tools import OutputParsing


@dataclass(frozen=True, slots=True)
class OutputParsingConfig:
    tool_call_parser: str | None = None  # None: tool_choice "auto" is refused; "required" and named calls work
    reasoning_parser: str | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> OutputParsingConfig:
        return cls(args.tool_call_parser or None, args.reasoning_parser or None)

    def build(self, tokenizer: Any) -> OutputParsing:
        """The parsing for a processor with this ``tokenizer``; ValueError for an unknown or unfit parser."""
        if not self.tool_call_parser and not self.reasoning_parser:
            return OutputParsing()
        from zdyn.engines.vllm.parsers import VllmParsers

        try:
            backend = VllmParsers(tokenizer, self.tool_call_parser, self.reasoning_parser)
        except (RuntimeError, ValueError) as e:  # vLLM's parsers say so when the tokenizer lacks their tokens
            raise ValueError(f"output parser: {e}") from e
        return OutputParsing(backend, tuple(getattr(tokenizer, "all_special_tokens", ())))


def add_output_parsing_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("output parsing (vLLM's parsers)")
    group.add_argument(
        "--tool-call-parser",
        help='parse tool calls in this model family\'s format, for tool_choice "auto": hermes (Qwen, Hermes), '
        "llama3_json, smollm2 (xLAM's format), or any of vLLM's tool parser names",
    )
    group.add_argument(
        "--reasoning-parser",
        help="split thinking text into reasoning_content: deepseek_r1, qwen3, ... (vLLM's reasoning parser names)",
    )
