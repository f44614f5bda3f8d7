import random

import pytest
from tokenizers import Tokenizer

from zdyn.detokenizer import Detokenizer


@pytest.fixture(scope="module")
def tok(tiny_model) -> Tokenizer:
    return Tokenizer.from_file(str(tiny_model / "tokenizer.json"))


def stream(tok, ids, chunk=1, **kw):
    """Feed ``ids`` in chunks; return the emitted pieces and the detokenizer."""
    detok = Detokenizer(tok, **kw)
    pieces = [detok.step(ids[i : i + chunk]) for i in range(0, len(ids), chunk)]
    pieces.append(detok.finish())
    return pieces, detok


TEXTS = [
    "hello world",
    "def f(x):\n    return x ** 2\n",
    "héllo wörld, ça va? Übermäßig",
    "日本語のテキストと中文字符",
    "family 👩‍👩‍👧‍👦, flag 🇫🇷, coder 🧑‍💻 🎉🎉",
    "mixed ascii 🎉 and ünïcödé at the end é",
]


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("chunk", [1, 3])
def test_pieces_join_to_the_full_decode(tok, text, chunk):
    ids = tok.encode(text, add_special_tokens=False).ids
    pieces, _ = stream(tok, ids, chunk)
    assert "".join(pieces) == tok.decode(ids) == text


def test_never_emits_a_broken_multibyte_character(tok):
    ids = tok.encode("日本語🎉", add_special_tokens=False).ids
    assert len(ids) > 4  # byte-level BPE splits these characters across tokens
    pieces, _ = stream(tok, ids)
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == "日本語🎉"


def test_random_token_sequences_match_full_decode(tok):
    rng = random.Random(0)
    vocab = tok.get_vocab_size()
    for _ in range(300):
        ids = [rng.randrange(vocab) for _ in range(rng.randrange(1, 40))]
        for skip in (True, False):
            pieces, _ = stream(tok, ids, rng.choice([1, 2, 5]), skip_special_tokens=skip)
            assert "".join(pieces) == tok.decode(ids, skip_special_tokens=skip)


def test_special_tokens_are_skipped_by_default(tok):
    eos = tok.token_to_id("<|eos|>")
    ids = tok.encode("one two", add_special_tokens=False).ids + [eos]
    assert "".join(stream(tok, ids)[0]) == "one two"
    assert "".join(stream(tok, ids, skip_special_tokens=False)[0]) == "one two<|eos|>"


def test_stop_string_cuts_the_output(tok):
    ids = tok.encode("alpha beta STOP gamma delta", add_special_tokens=False).ids
    pieces, detok = stream(tok, ids, stop=["STOP"])
    assert "".join(pieces) == "alpha beta "
    assert detok.stop == "STOP"
    assert detok.step(tok.encode(" more", add_special_tokens=False).ids) == ""


def test_stop_string_can_be_kept(tok):
    ids = tok.encode("alpha beta STOP gamma", add_special_tokens=False).ids
    pieces, detok = stream(tok, ids, stop=["STOP"], include_stop_str_in_output=True)
    assert "".join(pieces) == "alpha beta STOP"


def test_earliest_of_several_stop_strings_wins(tok):
    ids = tok.encode("x = 1\ny = 2 END", add_special_tokens=False).ids
    pieces, detok = stream(tok, ids, 4, stop=["END", "\n"])
    assert "".join(pieces) == "x = 1"
    assert detok.stop == "\n"


def test_stop_string_split_across_tokens_is_held_back(tok):
    text = "abc <|STOP|> tail"
    ids = tok.encode(text, add_special_tokens=False).ids
    detok = Detokenizer(tok, stop=["<|STOP|>"])
    emitted = ""
    for token_id in ids:
        emitted += detok.step([token_id])
        assert "<|" not in emitted  # the start of the stop string is never released early
    assert emitted == "abc "
    assert detok.stop == "<|STOP|>"


def test_text_that_only_looks_like_a_stop_prefix_is_released(tok):
    ids = tok.encode("a <b <c done", add_special_tokens=False).ids
    pieces, detok = stream(tok, ids, stop=["<|x|>"])
    assert "".join(pieces) == "a <b <c done"
    assert detok.stop is None
    held = Detokenizer(tok, stop=["<|x|>"])
    assert held.step(tok.encode("a <", add_special_tokens=False).ids) == "a "  # "<" might start the stop
    assert held.finish() == "<"  # the output ended: nothing is held any more


def test_stop_string_spanning_earlier_released_text_boundary(tok):
    detok = Detokenizer(tok, stop=["ab"])
    out = detok.step(tok.encode("xa", add_special_tokens=False).ids)
    out += detok.step(tok.encode("b", add_special_tokens=False).ids)
    assert out == "x" and detok.stop == "ab"
