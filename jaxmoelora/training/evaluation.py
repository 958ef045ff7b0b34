"""Held-out exact-match accuracy by greedy generation (GSM-style `#### N` answers, numbers, or short strings)."""

from __future__ import annotations

import dataclasses
import re

from jaxmoelora.data.config import DataConfig
from jaxmoelora.data.tokenize import uses_chat_template, with_context
from jaxmoelora.generation import GenerationConfig, generate

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
ANSWER_FORMAT = re.compile(r"####\s*-?\d")


def extract_answer(text: str) -> str:
    """The answer in a generation: what follows `####`, else the last number, else the first line."""
    if "####" in text:
        text = text.split("####", 1)[1]
        match = NUMBER.search(text)
        return match.group(0) if match else text.strip().splitlines()[0] if text.strip() else ""
    numbers = NUMBER.findall(text)
    if numbers:
        return numbers[-1]
    return text.strip().splitlines()[0] if text.strip() else ""


def normalize(answer: str) -> str:
    answer = answer.strip().rstrip(".").replace(",", "").lower()
    try:
        value = float(answer)
        return str(int(value)) if value == int(value) else str(value)
    except ValueError:
        return answer


@dataclasses.dataclass
class ExactMatch:
    accuracy: float
    correct: int
    total: int
    samples: list[dict]  # prompt, generation, extracted, gold
    formatted: int = 0  # generations that give their answer as `#### N`, when the gold answers do
    expects_format: bool = False  # whether the gold answers or responses are written as `#### N`


def exact_match(model, tokenizer, records: list[dict], data: DataConfig, *, max_new_tokens: int,
                batch_size: int) -> ExactMatch:
    """Greedy generation for each record's prompt (rendered as in training) compared with its answers."""
    chat = uses_chat_template(tokenizer, data.chat_template)
    prompts = []
    for record in records:
        question = with_context(record["prompt"], record.get("context"))
        if chat:
            prompts.append(list(record["messages"][:-1]) if record.get("messages") else question)
        else:
            prompts.append(data.prompt_template.replace("{eos}", tokenizer.eos_token or "").replace(
                "{prompt}", question))
    config = GenerationConfig(max_new_tokens=max_new_tokens)
    generations = []
    for start in range(0, len(prompts), batch_size):
        generations += generate(model, tokenizer, prompts[start:start + batch_size], config, chat_template=chat)
    correct, formatted, expects_format, samples = 0, 0, False, []
    for record, text in zip(records, generations):
        golds = record.get("answers") or ([record["answer"]] if record.get("answer") else [record["response"]])
        if any(ANSWER_FORMAT.search(g) for g in [*golds, record.get("response") or ""]):
            expects_format = True
            formatted += bool(ANSWER_FORMAT.search(text))
        extracted = extract_answer(text)
        ok = normalize(extracted) in {normalize(extract_answer(g)) for g in golds}
        correct += ok
        samples.append({"prompt": record["prompt"], "generation": text, "extracted": extracted,
                        "gold": golds[0], "correct": bool(ok)})
    return ExactMatch(correct / max(len(records), 1), correct, len(records), samples, formatted, expects_format)
