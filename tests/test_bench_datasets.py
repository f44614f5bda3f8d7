"""Datasets, prompt construction and trace parsing of zdyn.bench, with a small real tokenizer."""

from __future__ import annotations

import glob
import hashlib
import itertools
import json
import logging
import os
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from zdyn.bench.datasets import PrefixDataset, RandomDataset, TraceDataset, length_bounds
from zdyn.bench.prompts import PromptBuilder, RequestOptions
from zdyn.bench.records import Blocks, RequestRecord
from zdyn.bench.tokens import TokenSynth, load_tokenizer
from zdyn.bench.traces import BadLineError, load_azure, load_mooncake, parse_mooncake_line

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
if not DATA.is_dir():
    DATA = Path("/work/shared/data")


def _train(pre: str, vocab_size: int) -> Tokenizer:
    files = sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "*.py")))[:8]
    if pre == "bytelevel":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        if pre == "metaspace":
            tok.pre_tokenizer = pre_tokenizers.Metaspace()
            tok.decoder = decoders.Metaspace()
        alphabet = []  # "none": merges across spaces, no decoder; only fitting by re-tokenizing works
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<unk>"], initial_alphabet=alphabet
    )
    tok.train(files, trainer)
    return tok


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("tok")
    tokenizer = _train("bytelevel", 2000)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>")  # type: ignore[no-untyped-call]
    fast.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def synth(tokenizer_dir: Path) -> TokenSynth:
    return TokenSynth(load_tokenizer(tokenizer_dir), seed=11)


def n_tokens(synth: TokenSynth, text: str) -> int:
    return len(synth.tokenizer.encode(text, add_special_tokens=False).ids)


def test_tokenizer_loads_from_folder_and_file(tokenizer_dir: Path) -> None:
    a = load_tokenizer(tokenizer_dir)
    b = load_tokenizer(tokenizer_dir / "tokenizer.json")
    assert a.get_vocab_size() == b.get_vocab_size() == 2000
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tokenizer_dir / "missing")


@pytest.mark.parametrize(("pre", "exact"), [("bytelevel", True), ("metaspace", True), ("none", False)])
def test_text_prompts_hit_requested_length(pre: str, exact: bool) -> None:
    synth = TokenSynth(_train(pre, 1500), seed=1)
    assert synth.exact is exact
    for n in (1, 7, 100, 1000):
        ids = synth.fitted_ids((99, n), n)
        if exact:  # joined word texts re-tokenize to exactly the drawn ids
            assert synth.encode(synth.text(ids)) == ids and len(ids) == n
        assert abs(n_tokens(synth, synth.text(ids)) - n) <= max(1, n // 100)


def test_random_dataset_lengths_and_reproducibility(synth: TokenSynth) -> None:
    ds = RandomDataset(input_len=200, output_len=40, range_ratio=0.5)
    reqs = list(itertools.islice(ds.requests(seed=3), 50))
    assert [r.prompt_len for r in reqs] == [r.prompt_len for r in itertools.islice(ds.requests(seed=3), 50)]
    assert {r.prompt_len for r in reqs} != {r.prompt_len for r in itertools.islice(ds.requests(seed=4), 50)}
    assert all(100 <= r.prompt_len <= 300 and 20 <= r.output_len <= 60 for r in reqs)
    assert len({r.prompt_len for r in reqs}) > 10
    for r in reqs[:20]:
        ((role, content),) = r.messages
        assert role == "user"
        got = n_tokens(synth, synth.text(synth.materialize(content)))
        assert abs(got - r.prompt_len) <= max(2, r.prompt_len // 50)
    assert length_bounds(100, 0.0) == (100, 100)
    with pytest.raises(ValueError):
        length_bounds(100, 1.0)


def test_salt_changes_content_not_length(synth: TokenSynth) -> None:
    req = next(RandomDataset(input_len=64).requests(seed=0))
    content = req.messages[0][1]
    a, b = synth.materialize(content), synth.with_salt(1).materialize(content)
    assert len(a) == len(b) == 64 and a != b
    assert a == synth.materialize(content)


def test_prefix_sessions_share_system_prompts_and_grow(synth: TokenSynth) -> None:
    ds = PrefixDataset(num_prefixes=2, users_per_prefix=3, turns=3, prefix_len=80, suffix_len=20, output_len=10)
    reqs = list(ds.requests(seed=5))
    assert len(reqs) == ds.size() == 18
    assert [r.turn for r in reqs] == [0] * 6 + [1] * 6 + [2] * 6
    assert sorted(r.session or 0 for r in reqs[:6]) == list(range(6))
    systems: dict[int | None, list[int]] = {}
    for r in reqs[:6]:
        assert r.messages[0][0] == "system"
        systems[r.session] = synth.materialize(r.messages[0][1])
    assert systems[0] == systems[1] == systems[2] != systems[3] == systems[4] == systems[5]
    assert all(len(r.messages) == 1 and r.messages[0][0] == "user" for r in reqs[6:])

    opts = RequestOptions("m", api="completions")
    builder = PromptBuilder(synth, opts, history="synthetic")
    by_session = sorted(reqs, key=lambda r: (r.session, r.turn))[:3]  # session 0, turns 0..2
    prompts = []
    for r in by_session:
        prompts.append(builder.body(r)["prompt"])
        builder.remember(r, RequestRecord(index=r.index, success=True, text=" model answer"))
        assert abs(n_tokens(synth, prompts[-1]) - ds.prompt_len(r.turn)) <= 2
    assert prompts[1].startswith(prompts[0]) and prompts[2].startswith(prompts[1])
    assert "model answer" not in prompts[2]  # synthetic history ignores the generated text


def test_model_history_resends_generated_answer(synth: TokenSynth) -> None:
    ds = PrefixDataset(num_prefixes=1, users_per_prefix=1, turns=2, prefix_len=16, suffix_len=8, output_len=4)
    first, second = ds.requests(seed=0)
    builder = PromptBuilder(synth, RequestOptions("m", api="chat"), history="model")
    body0 = builder.body(first)
    assert [m["role"] for m in body0["messages"]] == ["system", "user"]
    builder.remember(first, RequestRecord(index=0, success=True, text=" the answer"))
    body1 = builder.body(second)
    assert [m["role"] for m in body1["messages"]] == ["system", "user", "assistant", "user"]
    assert body1["messages"][:2] == body0["messages"] and body1["messages"][2]["content"] == " the answer"


def test_request_body_fields(synth: TokenSynth) -> None:
    req = next(RandomDataset(input_len=12, output_len=5).requests(seed=0))
    chat = PromptBuilder(synth, RequestOptions("m", ignore_eos=True, extra_body={"nvext": {"ignore_eos": True}}))
    body = chat.body(req)
    assert body["model"] == "m" and body["max_tokens"] == 5 and body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert body["ignore_eos"] is True and body["nvext"] == {"ignore_eos": True}
    assert body["temperature"] == 0.0
    tokens = PromptBuilder(synth, RequestOptions("m", api="completions", prompt_format="tokens")).body(req)
    assert tokens["prompt"] == synth.materialize(req.messages[0][1]) and len(tokens["prompt"]) == 12
    assert "ignore_eos" not in tokens
    with pytest.raises(ValueError):
        RequestOptions("m", api="chat", prompt_format="tokens")


def _write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _mc(ts: int, isl: int, osl: int, ids: list[int]) -> str:
    return json.dumps({"timestamp": ts, "input_length": isl, "output_length": osl, "hash_ids": ids})


def test_mooncake_equal_ids_give_equal_blocks(tmp_path: Path, synth: TokenSynth) -> None:
    path = _write_lines(
        tmp_path / "t.jsonl",
        [
            _mc(0, 1300, 5, [0, 1, 2]),
            _mc(40, 1100, 6, [0, 1, 3]),
            _mc(40, 600, 7, [4, 1]),
            _mc(1000, 512, 8, [0]),
        ],
    )
    trace = load_mooncake(path)
    assert [e.arrival_ms for e in trace.entries] == [0, 40, 40, 1000] and trace.bad_lines == []
    reqs = list(TraceDataset(tuple(trace.entries)).requests(0))
    assert reqs[1].arrival_s == pytest.approx(0.04) and reqs[1].output_len == 6
    ids = [synth.materialize(r.messages[0][1]) for r in reqs]
    assert [len(x) for x in ids] == [1300, 1100, 600, 512]
    assert ids[0][:1024] == ids[1][:1024]  # blocks 0, 1 shared
    assert ids[0][1024:] != ids[1][1024:1300]  # block 2 vs block 3
    assert ids[3] == ids[0][:512]
    assert ids[2][:512] != ids[0][:512]  # block 4 differs from block 0
    assert ids[2][512:] == ids[0][512:600]  # same id 1, cut to the partial length
    block = synth.block(7, 512, 512)
    assert synth.block(7, 100, 512) == block[:100] and synth.block(8, 512, 512) != block
    # in text form the shared prefix survives tokenization
    texts = [synth.text(x) for x in ids]
    enc = [synth.tokenizer.encode(t, add_special_tokens=False).ids for t in texts]
    assert enc[0][:1024] == enc[1][:1024] and [len(e) for e in enc] == [1300, 1100, 600, 512]
    assert reqs[0].messages[0][1] == Blocks((0, 1, 2), 1300, 512)


BAD_MOONCAKE = [
    _mc(0, 10, 5, [0]),
    _mc(5, 10, 5, [1]),
    '{"timestamp": 7, "input_length": 10,',  # line 3: truncated JSON
    _mc(8, 10, 5, [2]),
    _mc(9, 1000, 5, [3]),  # line 5: needs 2 hash ids
    '{"timestamp": 9, "input_length": -4, "output_length": 5, "hash_ids": [4]}',  # line 6
    '{"timestamp": "x", "input_length": 4, "output_length": 5, "hash_ids": [4]}',  # line 7
    "",  # blank lines are not errors
    _mc(10, 10, 5, [5]),
]


def test_mooncake_bad_line_stop_reports_line_number(tmp_path: Path) -> None:
    path = _write_lines(tmp_path / "bad.jsonl", BAD_MOONCAKE)
    with pytest.raises(BadLineError) as info:
        load_mooncake(path, on_bad_line="stop")
    assert info.value.line_no == 3 and f"{path}:3:" in str(info.value) and "invalid JSON" in str(info.value)


def test_mooncake_bad_line_skip_counts_and_logs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = _write_lines(tmp_path / "bad.jsonl", BAD_MOONCAKE)
    with caplog.at_level(logging.WARNING, logger="zdyn.bench"):
        trace = load_mooncake(path, on_bad_line="skip")
    assert [n for n, _ in trace.bad_lines] == [3, 5, 6, 7]
    assert "expected 2" in trace.bad_lines[1][1] and "input_length" in trace.bad_lines[2][1]
    assert len(trace.entries) == 4
    assert f"{path}:5" in caplog.text and "skipped 4 malformed" in caplog.text
    assert len(load_mooncake(path, on_bad_line="skip", limit=2).entries) == 2


def test_parse_mooncake_line_rejects_bad_types() -> None:
    for text in (
        "[]",
        '{"timestamp": 0, "input_length": 3, "output_length": 1, "hash_ids": [true]}',
        '{"timestamp": 0, "input_length": 3, "output_length": 0, "hash_ids": [1]}',
    ):
        with pytest.raises(ValueError):
            parse_mooncake_line(text)


AZURE = (
    "TIMESTAMP,ContextTokens,GeneratedTokens\r\n"
    "2023-11-16 18:15:46.6805900,374,44\r\n"
    "2023-11-16 18:15:50.9951690,396,109\r\n"
    "2023-11-16 18:15:51.x,1,1\r\n"
    "2023-11-16 18:15:52.0000000,12,zero\r\n"
    "2023-11-16 18:16:46.6805900,1000,3"
)


def test_azure_csv_replay_times_and_bad_rows(tmp_path: Path) -> None:
    path = tmp_path / "azure.csv"
    path.write_bytes(AZURE.encode())
    with pytest.raises(BadLineError) as info:
        load_azure(path)
    assert info.value.line_no == 4
    trace = load_azure(path, on_bad_line="skip")
    assert [n for n, _ in trace.bad_lines] == [4, 5]
    assert [e.arrival_ms for e in trace.entries] == pytest.approx([0.0, 4314.579, 60000.0])
    assert [(e.input_length, e.output_length) for e in trace.entries] == [(374, 44), (396, 109), (1000, 3)]
    reqs = list(TraceDataset(tuple(trace.entries)).requests(0))
    assert reqs[2].arrival_s == pytest.approx(60.0) and reqs[0].prompt_len == 374
    (tmp_path / "noheader.csv").write_text("a,b\r\n1,2")
    with pytest.raises(BadLineError):
        load_azure(tmp_path / "noheader.csv", on_bad_line="skip")


# from ../shared/data/README.md: a replaced file must fail loudly
AZURE_CODE_SHA256 = "54e9a6d2a4bd06ba1e060304b900abbc74cbea53de96506e60fe5bb4f2277fb6"
MOONCAKE_SYNTHETIC_SHA256 = "bd070915a98fc0ed264d7cfef2ce746002eb3076a695ec31ba2674c0111ec131"
SHA256 = {
    "azure_llm_inference_trace_2023_code.csv": AZURE_CODE_SHA256,
    "mooncake_fast25_synthetic_trace.jsonl": MOONCAKE_SYNTHETIC_SHA256,
}


@pytest.mark.parametrize(
    ("name", "count", "span_s"),
    [
        ("azure_llm_inference_trace_2023_code.csv", 8819, 3436),
        ("mooncake_fast25_synthetic_trace.jsonl", 3993, 1022),
    ],
)
def test_shipped_traces_parse(name: str, count: int, span_s: float) -> None:
    path = DATA / name
    if not path.is_file():
        pytest.skip(f"{path} not present")
    assert hashlib.sha256(path.read_bytes()).hexdigest() == SHA256[name]
    loader = load_azure if name.endswith(".csv") else load_mooncake
    trace = loader(path)
    assert len(trace.entries) == count and trace.bad_lines == []
    assert trace.entries[-1].arrival_ms / 1000 == pytest.approx(span_s, abs=1)
