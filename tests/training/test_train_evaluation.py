"""Held-out exact match: answer extraction, scoring against greedy generations, and the before/after report of a run."""

from __future__ import annotations

import pytest
from training_helpers import tiny_overrides

import jaxmoelora
from jaxmoelora.data import DataConfig
from jaxmoelora.training.config import load_experiment
from jaxmoelora.training.evaluation import exact_match, extract_answer, normalize
from jaxmoelora.training.trainer import train


@pytest.mark.parametrize("text, answer", [
    ("so 3 + 4 = 7\n#### 1,232.", "1232"),
    ("#### -5", "-5"),
    ("first 12 then 30 apples", "30"),  # no `####`: the last number
    ("Paris\nis the capital", "paris"),  # no number: the first line
])
def test_extracted_answers_are_normalized(text, answer):
    assert normalize(extract_answer(text)) == answer


def test_exact_match_scores_greedy_generations_and_counts_the_answer_format(tiny_chat_model):
    model = jaxmoelora.from_pretrained(str(tiny_chat_model))
    tokenizer = jaxmoelora.load_tokenizer(str(tiny_chat_model))
    data = DataConfig(path="unused.jsonl", max_length=64)
    probe = exact_match(model, tokenizer, [{"prompt": "1+2=", "answer": "x"}], data, max_new_tokens=6, batch_size=2)
    generated = probe.samples[0]["generation"]
    records = [{"prompt": "1+2=", "answer": generated},  # the model's own answer: correct
               {"prompt": "1+2=", "answer": "123456789", "response": "1 and 2 #### 123456789"}]  # `#### N` taught
    result = exact_match(model, tokenizer, records, data, max_new_tokens=6, batch_size=2)
    assert [s["correct"] for s in result.samples] == [True, False]
    assert (result.correct, result.total, result.accuracy) == (1, 2, 0.5)
    assert result.expects_format and result.formatted == ("####" in generated)


def test_a_run_reports_exact_match_before_and_after(tiny_chat_model, arithmetic_jsonl, tmp_path, capsys):
    overrides = tiny_overrides(tiny_chat_model, arithmetic_jsonl, tmp_path, "lora", steps=2)
    config = load_experiment(None, [*overrides, "data.eval_size=4", "eval.examples=4", "eval.max_new_tokens=4",
                                    "eval.batch_size=4", "eval.show=1"])
    result = train(config, quiet=False)
    printed = capsys.readouterr().out
    assert result.eval_before.total == result.eval_after.total == 4
    assert "exact match before training" in printed and "exact match after training" in printed
    assert (f"held-out exact match: {result.eval_before.accuracy:.1%} before -> {result.eval_after.accuracy:.1%} "
            "after (4 problems)") in printed
    assert "--- " in printed and "Q: " in printed  # eval.show generations
    assert "training format" not in printed  # the sums' answers are plain numbers, not `#### N`
