"""What one long prompt costs on each step of zdyn's request path, measured in process (no sockets, no load).

For each prompt length: tokenizing it (transformers' ``encode`` and the Rust tokenizer's ``encode_batch_fast``, which
the processor calls), encoding and decoding its ``Generate`` (token ids packed into a bin, or a plain int array as
before), the KV router's block hashes (from packed ids, or from a list), and the mocker's admission of it
(``new_sequence`` + ``match_prefix`` + ``allocate`` + ``free``; its block hashes one per block from list slices as
before, or from one packed buffer). Best of ``--repeat`` CPU-time measurements each (on a shared box the best is
the least disturbed).

    python -m benchmarks.prompt_path                  # ~20 s
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import msgspec
from transformers import AutoTokenizer

from zdyn.bench.inputs import long_context_model
from zdyn.bench.results import RESULTS, command, footer, provenance, table, write_json
from zdyn.bench.tokens import TokenSynth
from zdyn.engines.mocker import KvBlockManager, hash_block
from zdyn.engines.mocker.config import MockerConfig
from zdyn.engines.mocker.sequence import new_sequence
from zdyn.prompt_encoder import PromptEncoder
from zdyn.protocol import Generate, MsgType, TokenIds, decode, encode
from zdyn.router.hashing import hash_blocks

BLOCK = 64


def best_ms(fn: Callable[[], Any], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.process_time()  # CPU time: on a shared box, less disturbed than the wall clock
        fn()
        best = min(best, time.process_time() - t0)
    return best * 1000.0


def old_mocker_hashes(ids: list[int]) -> list[int]:
    """The mocker's block hashes as computed before: one array per block from a list slice."""
    out: list[int] = []
    parent = None
    for start in range(0, len(ids) - BLOCK + 1, BLOCK):
        parent = hash_block(parent, ids[start : start + BLOCK])
        out.append(parent)
    return out


def admit(config: MockerConfig, request: Generate) -> None:
    """A fresh (empty) cache each time, so that every admission hashes and stores all its blocks."""
    kv = KvBlockManager(config.num_blocks, BLOCK)
    seq = new_sequence(request, config)
    kv.match_prefix(seq.request_id, seq.token_ids)
    kv.allocate(seq.request_id, seq.token_ids, len(seq.token_ids))
    kv.free(seq.request_id)


def measure(length: int, tokenizer: Any, synth: TokenSynth, repeat: int) -> dict[str, float]:
    text = synth.text(synth.ids((length,), length))
    backend = tokenizer.backend_tokenizer
    ids = backend.encode_batch_fast([text], add_special_tokens=False)[0].ids
    packed = TokenIds(ids)
    fast = PromptEncoder(backend)
    assert fast.fast_ids(text) == ids, "tiktoken's BPE must give the Rust tokenizer's ids"
    plain = [MsgType.GENERATE.to_bytes(1, "little"), msgspec.msgpack.encode({"request_id": "r", "token_ids": ids})]
    frames = encode(Generate(request_id="r", token_ids=packed))
    config = MockerConfig(max_model_len=length + 64, vocab_size=len(tokenizer), num_blocks=length // BLOCK + 8)
    assert hash_blocks(ids, BLOCK) == hash_blocks(packed, BLOCK)
    return {
        "tokens": len(ids),
        "transformers encode": best_ms(lambda: tokenizer.encode(text, add_special_tokens=False), repeat),
        "rust encode_batch_fast": best_ms(lambda: backend.encode_batch_fast([text], add_special_tokens=False), repeat),
        "tiktoken BPE (zdyn.prompt_encoder)": best_ms(lambda: fast.fast_ids(text), repeat),
        "Generate encode, list": best_ms(lambda: msgspec.msgpack.encode({"request_id": "r", "token_ids": ids}), repeat),
        "Generate encode, packed": best_ms(lambda: encode(Generate(request_id="r", token_ids=packed)), repeat),
        "Generate decode, int array": best_ms(lambda: decode(plain), repeat),
        "Generate decode, packed bin": best_ms(lambda: decode(frames), repeat),
        "router hashes, list": best_ms(lambda: hash_blocks(ids, BLOCK), repeat),
        "router hashes, packed": best_ms(lambda: hash_blocks(packed, BLOCK), repeat),
        "mocker hashes, per-block arrays (before)": best_ms(lambda: old_mocker_hashes(ids), repeat),
        "mocker admission, packed (after)": best_ms(
            lambda: admit(config, Generate(request_id="r", token_ids=packed)), repeat
        ),
    }


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m benchmarks.prompt_path", description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", default="1000,4000,16000,32000")
    p.add_argument("--repeat", type=int, default=30)
    p.add_argument("--model", type=Path, help="tokenizer (default: tiny-llama with a 262k context)")
    p.add_argument("--out", type=Path, default=RESULTS / "prompt_path.json")
    args = p.parse_args(argv)
    cmd = command("benchmarks.prompt_path", argv)
    tokenizer = AutoTokenizer.from_pretrained(str(args.model or long_context_model()))
    synth = TokenSynth(tokenizer.backend_tokenizer)
    rows = [measure(int(n), tokenizer, synth, args.repeat) for n in args.lengths.split(",")]
    steps = [k for k in rows[0] if k != "tokens"]
    print("CPU ms per prompt (best of", args.repeat, "runs)")
    print(
        table(
            ["step", *(f"{r['tokens']:,} tokens" for r in rows)], [[k, *(f"{r[k]:.3f}" for r in rows)] for k in steps]
        )
    )
    print(footer(cmd, write_json(args.out, {"benchmark": "prompt_path", "command": cmd, **provenance(), "rows": rows})))
    return 0


if __name__ == "__main__":
    sys.exit(main())
