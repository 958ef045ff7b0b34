"""Reading JSONL/Parquet records and normalising every accepted field set to one schema."""

import json
import sys

import pytest
from data_helpers import write_jsonl

from jaxmoelora.data import normalize_record, read_records
from jaxmoelora.errors import DataError


def test_prompt_response_records_get_defaults():
    r = normalize_record({"prompt": "2+2?", "response": "4"})
    assert r == {"prompt": "2+2?", "response": "4", "task_type": 0, "context": None, "messages": None,
                 "answer": None, "answers": []}  # fmt: skip


def test_alpaca_input_follows_the_instruction_after_a_blank_line():
    r = normalize_record({"instruction": "Translate to French.", "input": "cat", "output": "chat"})
    assert (r["prompt"], r["response"]) == ("Translate to French.\n\ncat", "chat")
    r = normalize_record({"instruction": "Say hi.", "input": "", "output": "hi"})
    assert r["prompt"] == "Say hi."


def test_chat_messages_keep_the_conversation_and_learn_the_last_assistant_turn():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And Japan?"},
        {"role": "assistant", "content": "Tokyo."},
    ]
    r = normalize_record({"messages": messages, "task_type": 1})
    assert r["response"] == "Tokyo."
    assert r["messages"] == messages and r["task_type"] == 1
    assert r["prompt"] == "Capital of France?\n\nParis.\n\nAnd Japan?"


def test_chat_messages_must_end_with_the_assistant():
    with pytest.raises(DataError, match="last message must be the assistant"):
        normalize_record({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                       {"role": "user", "content": "c"}]})  # fmt: skip
    with pytest.raises(DataError, match="no assistant message"):
        normalize_record({"messages": [{"role": "user", "content": "a"}]})


def test_bigbench_style_list_targets_become_accepted_answers():
    r = normalize_record({"input": "The capital of Peru is", "target": ["Lima", "Lima, Peru"]})
    assert r["response"] == "Lima" and r["answers"] == ["Lima", "Lima, Peru"] and r["answer"] == "Lima"


def test_answer_and_context_are_kept():
    r = normalize_record({"prompt": "q", "response": "It is 12.\n#### 12", "answer": 12, "context": "passage"})
    assert r["answer"] == "12" and r["answers"] == ["12"] and r["context"] == "passage"


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "response": "b"}, "", '{"prompt": "c", "response"'])
    with pytest.raises(DataError) as e:
        read_records(path)
    assert str(path) in str(e.value) and "line 3" in str(e.value) and "malformed JSON" in str(e.value)


def test_missing_fields_name_file_line_and_the_accepted_field_sets(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "response": "b"}, {"question": "a", "answer": "b"}])
    with pytest.raises(DataError) as e:
        read_records(path)
    message = str(e.value)
    assert f"{path}, line 2" in message
    for accepted in ("{prompt, response}", "{instruction, output}", "{messages}"):
        assert accepted in message


def test_wrong_field_type_is_named(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "response": 7}])
    with pytest.raises(DataError, match=r"line 1: field 'response' must be a string"):
        read_records(path)


@pytest.mark.parametrize("task_type", ["1", 1.0, True, -1])
def test_task_type_must_be_a_non_negative_int(task_type):
    with pytest.raises(DataError, match="task_type"):
        normalize_record({"prompt": "a", "response": "b", "task_type": task_type}, "f.jsonl, line 4")


def test_empty_dataset_names_the_path(tmp_path):
    path = write_jsonl(tmp_path / "empty.jsonl", ["", "   "])
    with pytest.raises(DataError, match=f"{path}.* is empty"):
        read_records(path)


def test_missing_path_and_empty_glob_are_reported(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_records(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="matches no data files"):
        read_records(str(tmp_path / "*.jsonl"))


def test_directory_and_glob_read_files_in_name_order(tmp_path):
    write_jsonl(tmp_path / "b.jsonl", [{"prompt": "b", "response": "2"}])
    write_jsonl(tmp_path / "a.jsonl", [{"prompt": "a", "response": "1"}])
    (tmp_path / "c.json").write_text(json.dumps([{"prompt": "c", "response": "3"}]))
    (tmp_path / "notes.txt").write_text("ignored")
    assert [r["prompt"] for r in read_records(tmp_path)] == ["a", "b", "c"]
    assert [r["prompt"] for r in read_records(str(tmp_path / "*.jsonl"))] == ["a", "b"]


def test_parquet_records(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"instruction": ["i1", "i2"], "input": ["", "x"], "output": ["o1", "o2"]}), path)
    assert [r["prompt"] for r in read_records(path)] == ["i1", "i2\n\nx"]


def test_parquet_without_pyarrow_says_how_to_install_it(tmp_path, monkeypatch):
    path = tmp_path / "d.parquet"
    path.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(DataError, match="pip install pyarrow"):
        read_records(path)
