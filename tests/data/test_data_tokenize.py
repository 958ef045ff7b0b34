"""Tokenizing one record: the loss mask covers exactly the response tokens and the final EOS."""

import numpy as np
import pytest
from data_helpers import byte_tokenizer

from jaxmoelora.data import DataStats, normalize_record, tokenize_example
from jaxmoelora.errors import DataError


def split_decode(tokenizer, example):
    ids, mask = example["input_ids"], example["loss_mask"].astype(bool)
    first = int(np.argmax(mask))
    assert mask[first:].all() and not mask[:first].any(), "the response must be one block at the end"
    return tokenizer.decode(ids[:first]), tokenizer.decode(ids[first:])


def test_plain_format_is_prompt_newline_then_response_and_eos(plain_tokenizer):
    record = normalize_record({"prompt": "What is 2+2?", "response": "4", "task_type": 1})
    ex = tokenize_example(record, plain_tokenizer, 64)
    assert ex["input_ids"].dtype == np.int32 and ex["loss_mask"].dtype == np.int32 and ex["task_type"] == 1
    assert split_decode(plain_tokenizer, ex) == ("What is 2+2?\n", "4</s>")


def test_loramoe_prompt_template_puts_eos_after_the_instruction(plain_tokenizer):
    record = normalize_record({"instruction": "Name a color.", "output": "Blue"})
    ex = tokenize_example(record, plain_tokenizer, 64, prompt_template="{prompt}{eos}")
    assert split_decode(plain_tokenizer, ex) == ("Name a color.</s>", "Blue</s>")


def test_bos_adding_tokenizer_keeps_its_bos_before_the_prompt():
    tokenizer = byte_tokenizer(add_bos=True)
    ex = tokenize_example(normalize_record({"prompt": "Hi", "response": "Yo"}), tokenizer, 64)
    assert ex["input_ids"][0] == tokenizer.bos_token_id
    assert split_decode(tokenizer, ex) == ("<s>Hi\n", "Yo</s>")


def test_context_goes_before_the_question(plain_tokenizer, chat_tokenizer):
    record = normalize_record({"prompt": "Who wrote it?", "response": "Ann", "context": "Ann wrote the book."})
    prompt, _ = split_decode(plain_tokenizer, tokenize_example(record, plain_tokenizer, 128))
    assert prompt == "Context: Ann wrote the book.\n\nQuestion: Who wrote it?\n"
    prompt, _ = split_decode(chat_tokenizer, tokenize_example(record, chat_tokenizer, 128))
    assert "user\nContext: Ann wrote the book.\n\nQuestion: Who wrote it?<|im_end|>" in prompt


def test_chat_template_response_is_the_assistant_turn_ending_in_eos(chat_tokenizer):
    record = normalize_record({"prompt": "What is 2+2?", "response": "4"})
    ex = tokenize_example(record, chat_tokenizer, 128)
    prompt, response = split_decode(chat_tokenizer, ex)
    assert prompt == "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    assert response == "4<|im_end|>"  # the newline the template adds after the turn is cut
    assert ex["input_ids"][-1] == chat_tokenizer.eos_token_id


def test_chat_multi_turn_learns_only_the_last_assistant_turn(chat_tokenizer):
    record = normalize_record({"messages": [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye"}]})  # fmt: skip
    prompt, response = split_decode(chat_tokenizer, tokenize_example(record, chat_tokenizer, 256))
    assert response == "Goodbye<|im_end|>"
    assert "assistant\nHello<|im_end|>" in prompt


def test_chat_template_choice(chat_tokenizer, plain_tokenizer):
    record = normalize_record({"prompt": "Q", "response": "A"})
    prompt, _ = split_decode(chat_tokenizer, tokenize_example(record, chat_tokenizer, 64, chat_template=False))
    assert prompt == "Q\n"
    with pytest.raises(DataError, match="no chat template"):
        tokenize_example(record, plain_tokenizer, 64, chat_template=True)


def test_template_without_the_prefix_property_falls_back_to_the_first_difference():
    # The generation prompt opens a reasoning block that the rendered answer does not contain.
    template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}"
    )
    tokenizer = byte_tokenizer(chat_template=template, eos="<|im_end|>")
    stats = DataStats()
    ex = tokenize_example(normalize_record({"prompt": "Q", "response": "A"}), tokenizer, 64, stats=stats)
    assert split_decode(tokenizer, ex) == ("<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n", "A<|im_end|>")
    assert stats.template_fallbacks == 1


def test_overlong_truncate_cuts_the_response_and_drop_skips_the_example(plain_tokenizer):
    record = normalize_record({"prompt": "abcd", "response": "0123456789"})  # 5 prompt + 11 response tokens
    stats = DataStats()
    ex = tokenize_example(record, plain_tokenizer, 10, overlong="truncate", stats=stats)
    assert len(ex["input_ids"]) == 10 and ex["loss_mask"].sum() == 5
    assert split_decode(plain_tokenizer, ex) == ("abcd\n", "01234")
    assert tokenize_example(record, plain_tokenizer, 10, overlong="drop", stats=stats) is None
    assert tokenize_example(record, plain_tokenizer, 16, overlong="drop", stats=stats) is not None  # fits exactly
    assert (stats.truncated, stats.dropped, stats.examples) == (1, 1, 2)


def test_a_prompt_that_fills_max_length_is_dropped_even_when_truncating(plain_tokenizer):
    stats = DataStats()
    record = normalize_record({"prompt": "x" * 20, "response": "y"})
    assert tokenize_example(record, plain_tokenizer, 21, overlong="truncate", stats=stats) is None
    assert (stats.dropped, stats.truncated, stats.examples) == (1, 0, 0)


def test_stats_count_tokens_and_response_tokens(plain_tokenizer):
    stats = DataStats()
    for prompt, response in [("a", "b"), ("cc", "dd")]:
        tokenize_example(normalize_record({"prompt": prompt, "response": response}), plain_tokenizer, 32, stats=stats)
    assert (stats.examples, stats.tokens, stats.response_tokens) == (2, 2 + 2 + 3 + 3, 2 + 3)
    assert "2 examples" in stats.summary()
