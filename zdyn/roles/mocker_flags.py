"""The mocker's command-line flags: one per ``MockerConfig`` field (``--block-size``, ``--no-enable-...``)."""

from __future__ import annotations

import argparse
from dataclasses import MISSING, fields
from typing import Any

from zdyn.engines.mocker.config import FIELD_HELP, MockerConfig


def add_cli_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add one ``--flag`` per MockerConfig field (``--block-size``, ``--no-enable-prefix-caching``, ...)."""
    group = parser.add_argument_group("mocker engine")
    defaults = MockerConfig.__dataclass_fields__
    for f in fields(MockerConfig):
        flag = "--" + f.name.replace("_", "-")
        default = defaults[f.name].default
        assert default is not MISSING
        if isinstance(default, bool):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=FIELD_HELP[f.name])
        elif default is None:
            group.add_argument(flag, default=None, help=FIELD_HELP[f.name])
        else:
            group.add_argument(flag, type=type(default), default=default, help=FIELD_HELP[f.name])
    return parser


def from_cli_args(args: argparse.Namespace, **overrides: Any) -> MockerConfig:
    """The config the mocker's flags describe, with ``overrides`` (field: value) applied."""
    return MockerConfig(**{f.name: getattr(args, f.name) for f in fields(MockerConfig)} | overrides)
