"""Fixtures for the data-pipeline tests: tiny tokenizers and data files made here, nothing downloaded."""

import pytest
from data_helpers import CHATML, byte_tokenizer, qa_rows, write_jsonl


@pytest.fixture(scope="session")
def plain_tokenizer():
    return byte_tokenizer()


@pytest.fixture(scope="session")
def chat_tokenizer():
    """ChatML like SmolLM2: the end-of-turn token <|im_end|> is the EOS."""
    return byte_tokenizer(chat_template=CHATML, eos="<|im_end|>")


@pytest.fixture
def qa_file(tmp_path):
    return write_jsonl(tmp_path / "qa.jsonl", qa_rows(60))
