"""YAML deployment configs: a ``Common`` section shared by all roles plus one section per role.

Like Dynamo's configs, each key becomes a command-line flag (``block-size: 32`` -> ``--block-size 32``,
``true`` -> ``--flag``, ``false`` -> omitted, lists repeat the flag, dicts become JSON). A role gets only the
keys it has flags for (a mocker worker skips vLLM-only keys, and says so); flags given on the command line
win over the file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml


def load_sections(path: str | Path) -> dict[str, dict[str, Any]]:
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ValueError(f"{path}: expected sections of key: value pairs (Common:, Frontend:, Worker:, ...)")
    return data


def to_argv(options: dict[str, Any]) -> list[str]:
    argv: list[str] = []
    for key, value in options.items():
        flag = "--" + str(key)
        if value is True:
            argv.append(flag)
        elif value is False or value is None:
            continue
        elif isinstance(value, list):
            for item in value:
                argv += [flag, str(item)]
        elif isinstance(value, dict):
            argv += [flag, json.dumps(value)]
        else:
            argv += [flag, str(value)]
    return argv


def config_argv(parser: argparse.ArgumentParser, path: str | Path, *sections: str) -> list[str]:
    """Flags from the file's ``Common`` section (those ``parser`` knows), then from each of ``sections`` in
    order (a later one wins), e.g. ``Worker`` then ``Worker.mocker``."""
    found = load_sections(path)
    known = set(parser._option_string_actions)
    options = {k: v for k, v in found.get("Common", {}).items() if f"--{k}" in known}
    for section in sections:
        own = found.get(section, {})
        skipped = [k for k in own if f"--{k}" not in known]
        if skipped:
            print(
                f"{parser.prog}: {path} [{section}]: no such flags here, skipped: {', '.join(skipped)}", file=sys.stderr
            )
        options.update({k: v for k, v in own.items() if f"--{k}" in known})
    return to_argv(options)
