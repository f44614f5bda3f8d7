"""Inputs the benchmarks share: the tiny model whose config and tokenizer the mocker runs use, its long-context
variant for the traces, and where the trace files are."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from zdyn.models import build_tiny_llama, cache_dir

TINY_MODEL = cache_dir() / "models" / "tiny-llama"
LONG_MODEL = cache_dir() / "models" / "tiny-llama-262k"
LONG_MODEL_LEN = 262_144  # the Mooncake synthetic trace's longest prompt is 191,378 tokens
TRACES_DIR = Path(os.environ.get("ZDYN_TRACES_DIR") or "/work/shared/data")
TRACES = {
    "mooncake-synthetic": TRACES_DIR / "mooncake_fast25_synthetic_trace.jsonl",
    "mooncake-conversation": TRACES_DIR / "mooncake_fast25_conversation_trace.jsonl",
    "azure-code": TRACES_DIR / "azure_llm_inference_trace_2023_code.csv",
}


def model_or_tiny(model: Path | None) -> Path:
    """``model``, or the tiny Llama (built once into zdyn's cache) when None."""
    return model if model is not None else build_tiny_llama(TINY_MODEL)


def long_context_model(dest: Path = LONG_MODEL) -> Path:
    """A copy of the tiny Llama's config and tokenizer with ``max_position_embeddings`` = LONG_MODEL_LEN (a mocker
    refuses a ``--max-model-len`` beyond the model's positions). Built once, atomically; no weights."""
    config = dest / "config.json"
    if config.exists() and json.loads(config.read_text()).get("max_position_embeddings") == LONG_MODEL_LEN:
        return dest
    base = build_tiny_llama(TINY_MODEL)
    tmp = dest.with_name(f"{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in ("tokenizer.json", "chat_template.jinja", "generation_config.json"):
        if (base / name).exists():
            shutil.copy(base / name, tmp / name)
    for name, key in (("config.json", "max_position_embeddings"), ("tokenizer_config.json", "model_max_length")):
        values = json.loads((base / name).read_text())
        values[key] = LONG_MODEL_LEN
        (tmp / name).write_text(json.dumps(values, indent=2) + "\n")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest
