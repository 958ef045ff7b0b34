"""The grain pipeline: batch format, per-process shards, seeded shuffling, exact resume, held-out split."""

import json

import numpy as np
import pytest
from data_helpers import qa_rows, write_jsonl

from jaxmoelora.data import ROW_KEYS, DataConfig, eval_examples, make_dataset, prepare_examples, read_records
from jaxmoelora.errors import ConfigError, DataError


def batches(config, tokenizer, n, **kwargs):
    it = iter(make_dataset(config, tokenizer, process_index=kwargs.pop("process_index", 0),
                           process_count=kwargs.pop("process_count", 1), **kwargs))  # fmt: skip
    return [next(it) for _ in range(n)]


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for key in ROW_KEYS:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def prompts_in(batch, tokenizer):
    """The 'Qi' ids of the examples in a batch, row by row, segment by segment."""
    out = []
    for ids, seg in zip(batch["input_ids"], batch["segment_ids"]):
        for s in range(1, seg.max() + 1):
            out.append(tokenizer.decode(ids[seg == s]).split(":")[0])
    return out


@pytest.mark.parametrize("pack", [True, False])
def test_batches_have_the_documented_format(qa_file, plain_tokenizer, pack):
    config = DataConfig(path=str(qa_file), max_length=128, batch_size=4, pack=pack)
    (batch,) = batches(config, plain_tokenizer, 1)
    assert set(batch) == set(ROW_KEYS)
    for key in ROW_KEYS:
        assert batch[key].shape == (4, 128) and batch[key].dtype == np.int32
    if not pack:
        assert (batch["segment_ids"].max(axis=1) == 1).all()
    # Every learned target is a response token: decoding them gives the responses plus EOS.
    learned = plain_tokenizer.decode(batch["targets"][batch["loss_mask"] == 1])
    assert learned.count("</s>") >= 4 and learned.startswith("A")


@pytest.mark.parametrize("pack", [True, False])
def test_process_shards_are_disjoint_and_together_equal_the_one_process_batch(qa_file, plain_tokenizer, pack):
    config = DataConfig(path=str(qa_file), max_length=128, batch_size=6, pack=pack, seed=3)
    whole = batches(config, plain_tokenizer, 4)
    shards = [batches(config, plain_tokenizer, 4, process_index=p, process_count=3) for p in range(3)]
    for step in range(4):
        parts = [shard[step] for shard in shards]
        for key in ROW_KEYS:
            assert all(part[key].shape == (2, 128) for part in parts)
            np.testing.assert_array_equal(np.concatenate([part[key] for part in parts]), whole[step][key])
        names = [prompts_in(part, plain_tokenizer) for part in parts]
        assert not set(names[0]) & set(names[1]) and not set(names[1]) & set(names[2])


def test_batch_size_must_divide_by_the_process_count(qa_file, plain_tokenizer):
    with pytest.raises(ConfigError, match="batch_size"):
        make_dataset(DataConfig(path=str(qa_file), batch_size=4), plain_tokenizer, process_index=0, process_count=3)


def test_shuffling_is_deterministic_per_seed(qa_file, plain_tokenizer):
    def order(seed, shuffle=True):
        config = DataConfig(path=str(qa_file), max_length=128, batch_size=4, seed=seed, shuffle=shuffle, pack=False)
        return [name for b in batches(config, plain_tokenizer, 5) for name in prompts_in(b, plain_tokenizer)]

    assert order(1) == order(1)
    assert order(1) != order(2)
    assert order(1, shuffle=False) == [f"Q{i}" for i in range(20)]


def test_iterator_state_restores_exactly(qa_file, plain_tokenizer):
    config = DataConfig(path=str(qa_file), max_length=128, batch_size=4, seed=5)
    prepared = prepare_examples(config, plain_tokenizer)
    dataset = make_dataset(config, plain_tokenizer, process_index=0, process_count=1, prepared=prepared)
    it = iter(dataset)
    for _ in range(5):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # survives a round trip through a checkpoint file
    expected = [next(it) for _ in range(5)]
    resumed = iter(make_dataset(config, plain_tokenizer, process_index=0, process_count=1, prepared=prepared))
    resumed.set_state(state)
    assert_same([next(resumed) for _ in range(5)], expected)


def test_one_epoch_sees_every_example_once_and_pads_the_last_batch(tmp_path, plain_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", qa_rows(13))
    config = DataConfig(path=str(path), max_length=128, batch_size=4, num_epochs=1, pack=False)
    out = list(make_dataset(config, plain_tokenizer, process_index=0, process_count=1))
    assert len(out) == 4 and all(b["input_ids"].shape == (4, 128) for b in out)
    names = [n for b in out for n in prompts_in(b, plain_tokenizer)]
    assert sorted(names) == sorted(f"Q{i}" for i in range(13))
    last = out[-1]
    assert (last["segment_ids"][1:] == 0).all() and (last["loss_mask"][1:] == 0).all()


def test_epochs_are_reshuffled(tmp_path, plain_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", qa_rows(12))
    config = DataConfig(path=str(path), max_length=128, batch_size=4, num_epochs=2, pack=False)
    names = [n for b in make_dataset(config, plain_tokenizer, process_index=0, process_count=1)
             for n in prompts_in(b, plain_tokenizer)]  # fmt: skip
    first, second = names[:12], names[12:]
    assert sorted(first) == sorted(second) and first != second


def test_held_out_split_is_disjoint_fixed_and_independent_of_the_shuffle_seed(qa_file, plain_tokenizer):
    config = DataConfig(path=str(qa_file), eval_size=10, seed=1)
    held_out = eval_examples(config)
    train = eval_examples(config, split="train")
    assert len(held_out) == 10 and len(train) == 50
    assert {r["prompt"] for r in held_out}.isdisjoint(r["prompt"] for r in train)
    assert held_out == eval_examples(DataConfig(path=str(qa_file), eval_size=10, seed=2))
    assert {"prompt", "response", "answer", "answers", "task_type", "context"} <= set(held_out[0])
    assert len(eval_examples(DataConfig(path=str(qa_file), eval_fraction=0.25))) == 15
    # The eval split as batches: one ordered pass over the held-out records.
    eval_config = DataConfig(path=str(qa_file), eval_size=10, max_length=128, batch_size=4, pack=False)
    out = list(make_dataset(eval_config, plain_tokenizer, split="eval", process_index=0, process_count=1))
    assert [n for b in out for n in prompts_in(b, plain_tokenizer)] == [r["prompt"].split(":")[0] for r in held_out]


def test_stats_report_truncated_and_dropped_examples(tmp_path, plain_tokenizer):
    rows = [{"prompt": "p", "response": "short"}, {"prompt": "p", "response": "x" * 50},
            {"prompt": "y" * 50, "response": "r"}]  # fmt: skip
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    stats = prepare_examples(DataConfig(path=str(path), max_length=20), plain_tokenizer).stats
    assert (stats.records, stats.examples, stats.truncated, stats.dropped) == (3, 2, 1, 1)
    stats = prepare_examples(DataConfig(path=str(path), max_length=20, overlong="drop"), plain_tokenizer).stats
    assert (stats.examples, stats.truncated, stats.dropped) == (1, 0, 2)


def test_a_split_with_nothing_left_raises(tmp_path, plain_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "y" * 50, "response": "r"}])
    with pytest.raises(DataError, match="no examples left"):
        make_dataset(DataConfig(path=str(path), max_length=20), plain_tokenizer, process_index=0, process_count=1)
    with pytest.raises(DataError, match="eval split is empty; set data.eval_size"):
        make_dataset(DataConfig(path=str(path)), plain_tokenizer, split="eval", process_index=0, process_count=1)
    with pytest.raises(DataError, match="leaves none to train"):
        eval_examples(DataConfig(path=str(path), eval_size=1))


def test_chat_records_flow_through_the_pipeline(tmp_path, chat_tokenizer):
    rows = [{"messages": [{"role": "user", "content": f"Hi {i}"}, {"role": "assistant", "content": f"Hello {i}"}]}
            for i in range(8)]  # fmt: skip
    config = DataConfig(path=str(write_jsonl(tmp_path / "c.jsonl", rows)), max_length=64, batch_size=2)
    assert len(read_records(config.path)) == 8
    (batch,) = batches(config, chat_tokenizer, 1)
    learned = chat_tokenizer.decode(batch["targets"][batch["loss_mask"] == 1])
    assert learned.startswith("Hello ") and learned.count("<|im_end|>") == int(batch["segment_ids"].max(1).sum())
