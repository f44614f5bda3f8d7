from pathlib import Path

import pytest

from zdyn.models import build_tiny_llama, cache_dir


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    """A tiny random-weight Llama and its byte-level BPE tokenizer, built once and cached."""
    return build_tiny_llama(cache_dir() / "models" / "tiny-llama")
