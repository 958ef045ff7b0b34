"""Turning a normalised record into token ids and a loss mask over the response tokens.

With a chat template the prompt conversation is rendered with `add_generation_prompt=True`, the whole
conversation without it, and the response tokens are what the second adds to the first. Without one the
prompt is `prompt_template` (default "{prompt}\\n"; LoRAMoE's official `data.py` uses "{prompt}</s>", i.e.
"{prompt}{eos}") followed by the response and EOS. Either way the example ends with EOS and the loss mask is 1
on the response tokens, EOS included, and 0 on the prompt.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from jaxmoelora.errors import DataError


@dataclass
class DataStats:
    """Counts from tokenizing one split, for the trainer to report.

    records: records in the split; examples: those kept; dropped: skipped as overlong (overlong="drop", or a
    prompt that leaves no room for a response token); truncated: cut at max_length; tokens / response_tokens:
    in the kept examples; template_fallbacks: chat renders whose prompt was not a token prefix of the full
    conversation (the response was then taken from the first differing token).
    """

    records: int = 0
    examples: int = 0
    dropped: int = 0
    truncated: int = 0
    tokens: int = 0
    response_tokens: int = 0
    template_fallbacks: int = 0

    def merge(self, other: DataStats) -> DataStats:
        return DataStats(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    def summary(self) -> str:
        mean = self.tokens / max(self.examples, 1)
        text = (
            f"{self.records} records -> {self.examples} examples, {self.tokens} tokens ({mean:.1f}/example, "
            f"{self.response_tokens} in responses); {self.truncated} truncated, {self.dropped} dropped as overlong"
        )
        if self.template_fallbacks:
            text += f"; {self.template_fallbacks} chat renders without the prefix property"
        return text


def uses_chat_template(tokenizer, chat_template: bool | None) -> bool:
    """Whether to render with the tokenizer's chat template: `chat_template`, or None = if it has one."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if chat_template is None:
        return has_template
    if chat_template and not has_template:
        raise DataError(
            "data.chat_template is true but the tokenizer has no chat template; set chat_template to false "
            "(the prompt_template is used then) or give the tokenizer one (tokenizer.chat_template = ...)"
        )
    return bool(chat_template)


def with_context(question: str, context: str | None) -> str:
    """Open-book QA: the passage goes before the question."""
    if not context:
        return question
    return f"Context: {context}\n\nQuestion: {question}"


def tokenize_example(
    record: dict,
    tokenizer,
    max_length: int,
    chat_template: bool | None = None,
    overlong: str = "truncate",
    *,
    prompt_template: str = "{prompt}\n",
    stats: DataStats | None = None,
) -> dict | None:
    """`{input_ids: int32[n], loss_mask: int32[n], task_type: int}` for one record, or None when dropped.

    `loss_mask[i]` is 1 when token i is a response token (the final EOS included). Examples longer than
    `max_length` are cut there (overlong="truncate") or dropped ("drop"); an example whose prompt alone fills
    `max_length` is always dropped, as no response token would remain. `stats`, when given, is updated.
    """
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise DataError("the tokenizer has no eos_token; set tokenizer.eos_token (e.g. to its end-of-turn token)")
    if uses_chat_template(tokenizer, chat_template):
        prompt_ids, response_ids, fell_back = _chat_tokens(record, tokenizer)
        response_ids = _cut_after_last_eos(response_ids, eos_id)
        if stats is not None and fell_back:
            stats.template_fallbacks += 1
    else:
        prompt_text = prompt_template.replace("{eos}", tokenizer.eos_token or "")
        prompt_text = prompt_text.replace("{prompt}", with_context(record["prompt"], record.get("context")))
        prompt_ids = list(tokenizer(prompt_text, add_special_tokens=True)["input_ids"])
        response_ids = list(tokenizer(record["response"], add_special_tokens=False)["input_ids"])
        if not response_ids or response_ids[-1] != eos_id:
            response_ids.append(eos_id)

    truncated = False
    if len(prompt_ids) + len(response_ids) > max_length:
        if overlong == "drop" or len(prompt_ids) >= max_length:
            if stats is not None:
                stats.dropped += 1
            return None
        response_ids = response_ids[: max_length - len(prompt_ids)]
        truncated = True
    input_ids = np.asarray(prompt_ids + response_ids, dtype=np.int32)
    loss_mask = np.zeros(len(input_ids), dtype=np.int32)
    loss_mask[len(prompt_ids) :] = 1
    if stats is not None:
        stats.examples += 1
        stats.truncated += truncated
        stats.tokens += len(input_ids)
        stats.response_tokens += len(response_ids)
    return {"input_ids": input_ids, "loss_mask": loss_mask, "task_type": int(record.get("task_type", 0))}


def _cut_after_last_eos(response_ids: list[int], eos_id: int) -> list[int]:
    """Cuts what a chat template renders after the turn's last EOS (e.g. a newline); appends EOS if it has none."""
    if eos_id in response_ids:
        last = len(response_ids) - 1 - response_ids[::-1].index(eos_id)
        return response_ids[: last + 1]
    return response_ids + [eos_id]


def _chat_messages(record: dict) -> list[dict]:
    messages = record.get("messages")
    if messages is None:
        user = with_context(record["prompt"], record.get("context"))
        return [{"role": "user", "content": user}, {"role": "assistant", "content": record["response"]}]
    messages = [dict(m) for m in messages]
    if record.get("context"):
        users = [i for i, m in enumerate(messages) if m["role"] == "user"]
        if users:
            messages[users[-1]]["content"] = with_context(messages[users[-1]]["content"], record["context"])
    return messages


def _chat_tokens(record: dict, tokenizer) -> tuple[list[int], list[int], bool]:
    """(prompt ids, response ids, whether the prefix property failed) from the tokenizer's chat template."""
    messages = _chat_messages(record)
    try:
        prompt_text = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        full_text = tokenizer.apply_chat_template(messages, tokenize=False)
    except ImportError as e:
        raise DataError(
            f"rendering the tokenizer's chat template needs jinja2 ({e}): pip install jinja2, or set "
            "data.chat_template=false to use the plain prompt_template"
        ) from e
    except Exception as e:  # jinja raises TemplateError (e.g. templates that insist on alternating roles)
        raise DataError(
            f"the tokenizer's chat template cannot render this conversation ({type(e).__name__}: {e}); roles: "
            f"{[m['role'] for m in messages]}. Set data.chat_template=false to use the plain prompt_template."
        ) from e
    prompt_ids = list(tokenizer(prompt_text, add_special_tokens=False)["input_ids"])
    full_ids = list(tokenizer(full_text, add_special_tokens=False)["input_ids"])
    if full_ids[: len(prompt_ids)] == prompt_ids:
        return prompt_ids, full_ids[len(prompt_ids) :], False
    # Some templates render the last turn differently once it is answered (e.g. dropping a reasoning block):
    # learn everything from the first token where the two renders differ.
    common = 0
    for a, b in zip(prompt_ids, full_ids):
        if a != b:
            break
        common += 1
    return full_ids[:common], full_ids[common:], True
