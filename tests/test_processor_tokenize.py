"""The processor's tokenization: the Rust tokenizer's ids, long prompts on threads, packed ids out."""

import asyncio

import pytest
from transformers import AutoTokenizer

from zdyn.errors import RequestError
from zdyn.processor import LONG_PROMPT_CHARS, Processor, text_chars
from zdyn.protocol import TextRequest, TokenIds
from zdyn.router.selector import RoundRobin
from zdyn.rpc import Hub


@pytest.fixture(scope="module")
def processor(tiny_model):
    return Processor(str(tiny_model), "m", Hub("tcp://127.0.0.1:0", role="worker"), RoundRobin())


TEXTS = ["", "Hello world, how are you?", " spaced  text\n\nand a newline", "ünïcödé 🙂 " * 50]


@pytest.mark.parametrize("text", TEXTS)
def test_ids_match_the_transformers_tokenizer(processor, tiny_model, text):
    reference = AutoTokenizer.from_pretrained(str(tiny_model))
    completion = processor.tokenize(TextRequest(prompt=text))
    assert isinstance(completion, TokenIds)
    assert completion == reference.encode(text, add_special_tokens=True)
    messages = [{"role": "user", "content": text}]
    chat = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert processor.tokenize(TextRequest(messages=messages)) == reference.encode(chat, add_special_tokens=False)


def test_long_prompts_go_to_threads_and_give_the_same_ids(processor):
    short = TextRequest(messages=[{"role": "user", "content": "word " * 10}])
    long = TextRequest(messages=[{"role": "user", "content": "word " * LONG_PROMPT_CHARS}])
    assert text_chars(short) <= LONG_PROMPT_CHARS < text_chars(long)

    async def both() -> tuple[TokenIds, TokenIds]:
        before = processor.num_tokenized_on_threads
        ids_short = await processor.tokenize_async(short)
        assert processor.num_tokenized_on_threads == before
        ids = await asyncio.gather(*(processor.tokenize_async(long) for _ in range(4)))
        assert processor.num_tokenized_on_threads == before + 4
        assert all(x == ids[0] for x in ids)
        return ids_short, ids[0]

    ids_short, ids_long = asyncio.run(both())
    assert ids_short == processor.tokenize(short) and ids_long == processor.tokenize(long)
    assert len(ids_long) > LONG_PROMPT_CHARS


def test_token_id_prompts_are_checked_against_the_vocabulary(processor):
    assert processor.tokenize(TextRequest(prompt=[1, 2, 3])) == [1, 2, 3]
    for bad in ([1, -1], [len(processor.tokenizer)]):
        with pytest.raises(RequestError, match="prompt token ids"):
            processor.tokenize(TextRequest(prompt=bad))
