"""Settings of the simulated engine, with Dynamo mocker's defaults, and their command-line flags."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zdyn.engines.mocker.kv_transfer import kv_bytes_per_token, transfer_ms

DEFAULT_MAX_MODEL_LEN = 8192
DEFAULT_VOCAB_SIZE = 32_000
DEFAULT_EOS_TOKEN_ID = 2
DEFAULT_KV_BYTES_PER_TOKEN = 131_072  # Llama-3-8B in bf16, the class of model the default timing describes
DEFAULT_KV_TRANSFER_BANDWIDTH_GBPS = 64.0  # Dynamo mocker's --kv-transfer-bandwidth ("inter-node InfiniBand")
_MAX_LEN_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "max_sequence_length", "seq_length")


@dataclass(slots=True)
class MockerConfig:
    """Engine settings; 0 / -1 in max_model_len, vocab_size, eos_token_id and kv_bytes_per_token mean "from the
    model dir or default"."""

    model_path: str | None = None  # an HF model dir; only its config.json is read
    model_name: str = ""  # served name; defaults to the model dir's name, else "mocker"
    block_size: int = 64
    num_blocks: int = 16384
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    watermark: float = 0.01  # fraction of blocks kept free when admitting requests
    speedup: float = 1.0  # divides every simulated duration
    max_model_len: int = 0
    vocab_size: int = 0
    eos_token_id: int = -1
    seed: int = 0
    timing_file: str | None = None  # profiled timings (.json/.npz) replacing the polynomial model
    kv_events_endpoint: str | None = None  # e.g. tcp://*:5557; None = publish no KV events
    kv_events_replay_endpoint: str | None = None
    kv_events_topic: str = ""
    kv_events_buffer_steps: int = 10_000
    kv_bytes_per_token: int = 0  # KV bytes a disaggregated prefill moves per prompt token
    kv_transfer_bandwidth_gbps: float = DEFAULT_KV_TRANSFER_BANDWIDTH_GBPS  # GB/s (1e9 bytes/s); 0: no transfer time

    def __post_init__(self) -> None:
        model = _read_model_config(self.model_path) if self.model_path else {}
        model_max_len = next((int(model[k]) for k in _MAX_LEN_KEYS if isinstance(model.get(k), int)), None)
        if self.max_model_len == 0:
            self.max_model_len = model_max_len or DEFAULT_MAX_MODEL_LEN
        elif model_max_len is not None and self.max_model_len > model_max_len:
            raise ValueError(f"max_model_len {self.max_model_len} exceeds the model's {model_max_len} positions")
        if self.vocab_size == 0:
            self.vocab_size = int(model.get("vocab_size") or DEFAULT_VOCAB_SIZE)
        if self.eos_token_id == -1:
            eos = model.get("eos_token_id")
            eos = eos[0] if isinstance(eos, list) and eos else eos
            self.eos_token_id = eos if isinstance(eos, int) else DEFAULT_EOS_TOKEN_ID
        if not self.model_name:
            self.model_name = Path(self.model_path).name if self.model_path else "mocker"
        if self.kv_bytes_per_token == 0:
            self.kv_bytes_per_token = kv_bytes_per_token(model) or DEFAULT_KV_BYTES_PER_TOKEN
        self._validate()

    @property
    def watermark_blocks(self) -> int:
        return int(self.watermark * self.num_blocks)

    def kv_transfer_ms(self, num_tokens: int) -> float:
        """Modelled time (before the speed-up) to move the KV of ``num_tokens`` tokens between workers."""
        return transfer_ms(num_tokens, self.kv_bytes_per_token, self.kv_transfer_bandwidth_gbps)

    def _validate(self) -> None:
        for name in ("block_size", "num_blocks", "max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0.0 <= self.watermark < 1.0:
            raise ValueError(f"watermark must be in [0, 1), got {self.watermark}")
        if not self.speedup > 0:
            raise ValueError(f"speedup must be positive, got {self.speedup}")
        if self.vocab_size < 2:
            raise ValueError(f"vocab_size must be at least 2, got {self.vocab_size}")
        if not 0 <= self.eos_token_id < self.vocab_size:
            raise ValueError(f"eos_token_id {self.eos_token_id} is outside the vocabulary [0, {self.vocab_size})")
        blocks_per_seq = math.ceil(self.max_model_len / self.block_size)
        if blocks_per_seq > self.num_blocks - self.watermark_blocks:
            raise ValueError(
                f"one sequence of max_model_len {self.max_model_len} needs {blocks_per_seq} blocks of "
                f"{self.block_size} tokens, but num_blocks {self.num_blocks} minus the watermark's "
                f"{self.watermark_blocks} leaves {self.num_blocks - self.watermark_blocks}"
            )
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                f"without chunked prefill max_num_batched_tokens ({self.max_num_batched_tokens}) must be at least "
                f"max_model_len ({self.max_model_len}), or long prompts could never be scheduled"
            )
        if self.kv_events_buffer_steps <= 0:
            raise ValueError(f"kv_events_buffer_steps must be positive, got {self.kv_events_buffer_steps}")
        if self.kv_bytes_per_token <= 0:
            raise ValueError(f"kv_bytes_per_token must be positive (0: from the model), got {self.kv_bytes_per_token}")
        bandwidth = self.kv_transfer_bandwidth_gbps
        if not (math.isfinite(bandwidth) and bandwidth >= 0):
            raise ValueError(f"kv_transfer_bandwidth_gbps must be a finite number >= 0 (0: instant), got {bandwidth}")


def _read_model_config(model_path: str) -> dict[str, Any]:
    path = Path(model_path) / "config.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"model dir {model_path} has no config.json") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    text_config = data.get("text_config")  # multimodal configs nest the language model's settings
    return {**data, **text_config} if isinstance(text_config, dict) else data


# One line per field: the help of its command-line flag (``zdyn worker --engine mocker --help``).
FIELD_HELP = {
    "model_path": "HF model dir whose config.json gives max_model_len, vocab_size, eos_token_id, kv_bytes_per_token",
    "model_name": "served model name (default: the model dir's name, else 'mocker')",
    "block_size": "tokens per KV block",
    "num_blocks": "KV blocks in the simulated cache",
    "max_num_seqs": "most requests running at once",
    "max_num_batched_tokens": "token budget of one engine step",
    "enable_prefix_caching": "reuse cached prefix blocks",
    "enable_chunked_prefill": "split long prompts across steps",
    "watermark": "fraction of KV blocks kept free when admitting requests",
    "speedup": "divide every simulated duration by this",
    "max_model_len": "longest prompt + output (0: from the model, else 8192)",
    "vocab_size": "token ids are drawn below this (0: from the model, else 32000)",
    "eos_token_id": "end-of-sequence id (-1: from the model, else 2)",
    "seed": "engine seed for requests without sampling.seed",
    "timing_file": "JSON/NPZ of profiled timings replacing the polynomial model",
    "kv_events_endpoint": "ZMQ PUB endpoint for vLLM-format KV events (bind if it has '*', else connect)",
    "kv_events_replay_endpoint": "ZMQ ROUTER endpoint answering replay requests",
    "kv_events_topic": "topic frame of every KV event message",
    "kv_events_buffer_steps": "batches kept for replay",
    "kv_bytes_per_token": "KV-cache bytes per token moved by a disaggregated prefill (0: 2 x layers x KV heads x "
    "head dim x 2 bytes from the model's config.json, else 131072)",
    "kv_transfer_bandwidth_gbps": "KV transfer bandwidth between prefill and decode workers in GB/s (1e9 bytes/s; "
    "0: transfers take no time); a decode worker waits bytes / bandwidth / speedup for a remote prefill's KV",
}
