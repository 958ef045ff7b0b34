"""Reading training records from JSONL / Parquet files and normalising them to one schema.

Every record becomes a dict with the keys
  prompt: str          the prompt text (for chat records, the user turns joined by blank lines)
  response: str        the text the model learns to produce
  task_type: int       LoRAMoE's group of the example: 0 = downstream task, 1 = world knowledge (default 0)
  context: str | None  a passage for open-book QA, put before the question when tokenizing
  messages: list | None  the chat conversation ({role, content} dicts) ending in the assistant response
  answer: str | None   the short reference answer for exact-match evaluation (e.g. GSM's final integer)
  answers: list[str]   every accepted answer ([answer] when there is one, [] when there is none)

Accepted input field sets (first match wins):
  messages                        chat: the last assistant message is the response
  instruction, output [, input]   Alpaca: a non-empty input follows the instruction after a blank line
  prompt, response                plain
  input, target                   BIG-bench style (target a string or a list of accepted strings)
Optional on every record: task_type, context, answer.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
from pathlib import Path
from typing import Any, Iterator

from jaxmoelora.errors import DataError

FIELD_SETS = (
    "{messages}",
    "{instruction, output} (+ optional input)",
    "{prompt, response}",
    "{input, target}",
)
_JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json")
_PARQUET_SUFFIXES = (".parquet",)


def read_records(path: str | os.PathLike) -> list[dict]:
    """All records of a JSONL/Parquet file, a directory of them (sorted by name) or a glob, normalised."""
    files = resolve_data_files(path)
    records: list[dict] = []
    for file in files:
        for where, raw in _read_raw(file):
            records.append(normalize_record(raw, where))
    if not records:
        raise DataError(f"the dataset at {path} is empty: {len(files)} file(s) hold no records")
    return records


def resolve_data_files(path: str | os.PathLike) -> list[Path]:
    """The data files that `path` names: a file, the data files in a directory, or a glob's matches."""
    text = str(path)
    p = Path(text).expanduser()
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and _is_data_file(f))
        if not files:
            raise DataError(
                f"the directory {p} holds no data files (looked for {', '.join(_JSONL_SUFFIXES + _PARQUET_SUFFIXES)})"
            )
        return files
    if p.is_file():
        if not _is_data_file(p):
            raise DataError(
                f"{p} is not a data file this reader knows: use one of "
                f"{', '.join(_JSONL_SUFFIXES + _PARQUET_SUFFIXES)}"
            )
        return [p]
    if glob.has_magic(text):
        files = sorted(Path(f) for f in glob.glob(os.path.expanduser(text), recursive=True))
        files = [f for f in files if f.is_file() and _is_data_file(f)]
        if not files:
            raise DataError(f"the glob {text!r} matches no data files")
        return files
    raise DataError(f"the data path {text} does not exist")


def _is_data_file(p: Path) -> bool:
    name = p.name.lower()
    return name.endswith(_JSONL_SUFFIXES + _PARQUET_SUFFIXES)


def _read_raw(file: Path) -> Iterator[tuple[str, Any]]:
    """Yields (where, raw record) pairs; `where` names the file and line/row for error messages."""
    name = file.name.lower()
    if name.endswith(_PARQUET_SUFFIXES):
        yield from _read_parquet(file)
    elif name.endswith(".json") and _starts_with_array(file):
        try:
            with open(file, encoding="utf-8") as f:
                items = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{file}: not valid JSON: {e}") from e
        for i, item in enumerate(items):
            yield f"{file}, item {i}", item
    else:
        yield from _read_jsonl(file)


def _starts_with_array(file: Path) -> bool:
    with open(file, "rb") as f:
        head = f.read(4096).lstrip()
    return head.startswith(b"[")


def _read_jsonl(file: Path) -> Iterator[tuple[str, Any]]:
    opener = gzip.open if file.name.lower().endswith(".gz") else open
    with opener(file, "rt", encoding="utf-8") as f:
        line_number = 0
        while True:
            try:
                line = f.readline()
            except UnicodeDecodeError as e:
                raise DataError(f"{file}, line {line_number + 1}: not UTF-8 text ({e})") from e
            if not line:
                break
            line_number += 1
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as e:
                snippet = line.strip()[:80]
                raise DataError(
                    f"{file}, line {line_number}: malformed JSON ({e.msg} at column {e.colno}): {snippet!r}. "
                    "Each line of a JSONL file must be one JSON object."
                ) from e
            yield f"{file}, line {line_number}", raw


def _read_parquet(file: Path) -> Iterator[tuple[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise DataError(f"reading {file} needs pyarrow, which is not installed: pip install pyarrow") from e
    try:
        rows = pq.read_table(file).to_pylist()
    except Exception as e:  # pyarrow raises its own error types for corrupt files
        raise DataError(f"{file}: cannot read it as Parquet: {e}") from e
    for i, row in enumerate(rows):
        yield f"{file}, row {i}", row


def normalize_record(raw: Any, where: str = "record") -> dict:
    """One raw record (any accepted field set) as the normalised schema; `where` prefixes error messages."""
    if not isinstance(raw, dict):
        raise DataError(f"{where}: a record must be a JSON object, got {type(raw).__name__}")
    messages = None
    if "messages" in raw:
        messages = _check_messages(raw["messages"], where)
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        if last != len(messages) - 1:
            raise DataError(
                f"{where}: the last message must be the assistant's response; {len(messages) - 1 - last} "
                "message(s) follow the last assistant message"
            )
        prompt = "\n\n".join(m["content"] for m in messages[:-1] if m["role"] != "system")
        response = messages[-1]["content"]
    elif "instruction" in raw and "output" in raw:
        prompt = _text(raw, "instruction", where)
        extra = _text(raw, "input", where) if raw.get("input") is not None else ""
        if extra.strip():
            prompt = f"{prompt}\n\n{extra}"
        response = _text(raw, "output", where)
    elif "prompt" in raw and "response" in raw:
        prompt, response = _text(raw, "prompt", where), _text(raw, "response", where)
    elif "input" in raw and "target" in raw:
        prompt = _text(raw, "input", where)
        targets = _targets(raw["target"], where, "target")
        response = targets[0]
        if "answer" not in raw:
            raw = {**raw, "answers": targets}
    else:
        raise DataError(
            f"{where}: no accepted field set in the record (fields: {sorted(raw)}); "
            f"accepted: {'; '.join(FIELD_SETS)}"
        )
    task_type = raw.get("task_type", 0)
    if task_type is None:
        task_type = 0
    if not isinstance(task_type, int) or isinstance(task_type, bool) or task_type < 0:
        raise DataError(
            f"{where}: task_type must be a non-negative integer (LoRAMoE: 0 = downstream task, "
            f"1 = world knowledge), got {task_type!r}"
        )
    context = raw.get("context")
    if context is not None and not isinstance(context, str):
        raise DataError(f"{where}: context must be a string or null, got {type(context).__name__}")
    answer, answers = _answers(raw, where)
    return {
        "prompt": prompt,
        "response": response,
        "task_type": task_type,
        "context": context or None,
        "messages": messages,
        "answer": answer,
        "answers": answers,
    }


def _text(raw: dict, field: str, where: str) -> str:
    value = raw.get(field)
    if not isinstance(value, str):
        raise DataError(f"{where}: field {field!r} must be a string, got {type(value).__name__}")
    return value


def _targets(value: Any, where: str, field: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [str(value)]
    if isinstance(value, list) and value and all(isinstance(v, (str, int, float)) for v in value):
        return [str(v) for v in value]
    raise DataError(f"{where}: field {field!r} must be a string or a non-empty list of strings, got {value!r}")


def _answers(raw: dict, where: str) -> tuple[str | None, list[str]]:
    if raw.get("answer") is not None:
        answers = _targets(raw["answer"], where, "answer")
    elif raw.get("answers") is not None:
        answers = _targets(raw["answers"], where, "answers")
    else:
        return None, []
    return answers[0], answers


def _check_messages(messages: Any, where: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: messages must be a non-empty list of {{role, content}} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: messages[{i}] must be an object with string `role` and `content`, got {m!r}")
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{where}: messages has no assistant message to learn (roles: {[m['role'] for m in out]})")
    return out
