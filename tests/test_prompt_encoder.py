"""Prompts through tiktoken's BPE: taken only for a tokenizer of the shape it implements, the same ids as the Rust
tokenizer, and a difference turns it off without a wrong token."""

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from tests.helpers import examples, sample
from zdyn import prompt_encoder
from zdyn.bench.tokens import TokenSynth
from zdyn.models import ensure_smollm2
from zdyn.prompt_encoder import VERIFY_EVERY, VERIFY_FIRST, PromptEncoder, PromptEncoderCollector


def rust(path: Path) -> Tokenizer:
    return Tokenizer.from_file(str(path / "tokenizer.json"))


def spec(path: Path) -> dict:
    return json.loads((path / "tokenizer.json").read_text())


@pytest.fixture(scope="module")
def encoder(tiny_model) -> PromptEncoder:
    return PromptEncoder(rust(tiny_model))


def corpus(tokenizer: Tokenizer) -> list[str]:
    """The benchmarks' synthetic prompts, this repository's code, and special tokens inside text."""
    synth = TokenSynth(tokenizer, seed=3)
    code = "\n".join(p.read_text() for p in sorted(Path(prompt_encoder.__file__).parent.glob("*.py")))
    added = [t.content for t in tokenizer.get_added_tokens_decoder().values()]
    chat = "".join(f"{t}user\nHi there {t}\n" for t in added)
    return [synth.text(synth.ids((i,), 4000)) for i in range(3)] + [code, chat, "", " ", "\n\n"]


def test_the_tiny_llamas_byte_level_bpe_takes_the_fast_path_with_the_same_ids(encoder, tiny_model):
    assert encoder.fast is not None
    reference = rust(tiny_model)
    for text in corpus(reference):
        for special in (False, True):
            want = reference.encode(text, add_special_tokens=special).ids
            assert encoder.fast_ids(text) == reference.encode(text, add_special_tokens=False).ids
            assert encoder.encode(text, special) == want
    assert encoder.mismatches == 0 and encoder.fast is not None


@pytest.mark.parametrize("budget", examples(200, 2000))
def test_any_text_gives_the_rust_tokenizers_ids(encoder, tiny_model, budget):
    reference = rust(tiny_model)

    @settings(max_examples=budget, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(text=st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=200))
    def check(text):
        ids = encoder.fast_ids(text)
        assert ids is None or ids == reference.encode(text, add_special_tokens=False).ids

    check()


@pytest.mark.slow
def test_smollm2s_tokenizer_takes_the_fast_path_with_the_same_ids():
    path = ensure_smollm2()
    reference = rust(path)
    encoder = PromptEncoder(reference)
    assert encoder.fast is not None
    for text in corpus(reference):
        assert encoder.fast_ids(text) == reference.encode(text, add_special_tokens=False).ids
    # bytes this vocabulary lacks (some control characters, the lead bytes 0xF1/0xF2): the Rust tokenizer drops
    # them, so such prompts are its to encode
    for text in ("a\x04b", "x \U00040000 y", "\U000a0000"):
        assert encoder.fast_ids(text) is None
        assert encoder.encode(text, False) == reference.encode(text, add_special_tokens=False).ids

    @settings(max_examples=300, deadline=None)
    @given(text=st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=200))
    def check(text):
        ids = encoder.fast_ids(text)
        assert ids is None or ids == reference.encode(text, add_special_tokens=False).ids

    check()


@pytest.mark.parametrize(
    "change",
    [
        lambda s: s.update(normalizer={"type": "NFC"}),
        lambda s: s["model"].update(byte_fallback=True),
        lambda s: s.update(pre_tokenizer={"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always"}),
        lambda s: s["pre_tokenizer"].update(add_prefix_space=True),
        lambda s: s["model"]["merges"].reverse(),  # merge results no longer numbered in merge order
        lambda s: s["added_tokens"][0].update(lstrip=True),
    ],
    ids=["normalizer", "byte-fallback", "metaspace", "prefix-space", "merge-order", "added-lstrip"],
)
def test_other_tokenizer_shapes_use_the_rust_tokenizer(tiny_model, change):
    changed = spec(tiny_model)
    change(changed)
    assert prompt_encoder.tiktoken_encoding(changed) is None
    encoder = PromptEncoder(rust(tiny_model), changed)
    assert encoder.fast is None
    assert encoder.encode("hello world", True) == rust(tiny_model).encode("hello world").ids
    assert sample(PromptEncoderCollector(encoder, "t"), "zdyn_prompts_encoded_total", role="t", by="rust") == 1


def test_no_tiktoken_means_the_rust_tokenizer(tiny_model):
    assert PromptEncoder(rust(tiny_model), fast=False).fast is None


def test_the_first_prompts_and_then_one_in_n_are_verified(tiny_model):
    encoder = PromptEncoder(rust(tiny_model))
    for _ in range(VERIFY_FIRST + 2 * VERIFY_EVERY):
        encoder.encode("a short prompt", False)
    assert encoder.num_fast == VERIFY_FIRST + 2 * VERIFY_EVERY
    assert encoder.num_verified == VERIFY_FIRST + 2
    collector = PromptEncoderCollector(encoder, "frontend")
    assert sample(collector, "zdyn_prompts_encoded_total", role="frontend", by="verified") == VERIFY_FIRST + 2


class OffByOne:
    """A fast encoder that is wrong on the last token (a regex difference, as seen from the outside)."""

    def __init__(self, real) -> None:
        self.real = real

    def encode(self, text: str, allowed_special: str) -> list[int]:
        ids = self.real.encode(text, allowed_special=allowed_special)
        return ids[:-1] + [ids[-1] + 1] if ids else ids


def test_a_difference_gives_the_rust_ids_and_turns_the_fast_path_off(tiny_model):
    reference = rust(tiny_model)
    encoder = PromptEncoder(reference)
    encoder.fast = OffByOne(encoder.fast)
    assert encoder.encode("hello world", False) == reference.encode("hello world", add_special_tokens=False).ids
    assert encoder.mismatches == 1 and encoder.fast is None
    assert encoder.encode("hello again", True) == reference.encode("hello again").ids
    collector = PromptEncoderCollector(encoder, "frontend")
    assert sample(collector, "zdyn_prompt_encoder_mismatches_total", role="frontend") == 1
    assert sample(collector, "zdyn_prompts_encoded_total", role="frontend", by="rust") == 1
