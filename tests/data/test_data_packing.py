"""Packing examples into rows: segments never straddle rows, positions restart, targets stay in a segment."""

import grain
import numpy as np
import pytest

from jaxmoelora.data import ROW_KEYS, pack_examples, pad_example

PAD = 0


def make_examples(n, max_length, seed=0):
    rng = np.random.default_rng(seed)
    examples = []
    for i in range(n):
        length = int(rng.integers(2, max_length + 1))
        prompt = int(rng.integers(1, length))
        ids = rng.integers(5, 100, size=length).astype(np.int32)
        mask = np.r_[np.zeros(prompt), np.ones(length - prompt)].astype(np.int32)
        examples.append({"input_ids": ids, "loss_mask": mask, "task_type": i % 2})
    return examples


def reference_rows(examples, max_length, num_bins, pad_id):
    """Plain-python first-fit: fill `num_bins` bins in order; when an example fits none, emit them all."""
    rows, bins = [], []

    def emit():
        for contents in bins:
            rows.append(reference_row(contents, max_length, pad_id))
        bins.clear()

    for ex in examples:
        n = len(ex["input_ids"])
        for contents in bins:
            if sum(len(e["input_ids"]) for e in contents) + n <= max_length:
                contents.append(ex)
                break
        else:
            if len(bins) == num_bins:
                emit()
            bins.append([ex])
    emit()
    return rows


def reference_row(contents, max_length, pad_id):
    ids, response, segment, position, task = [], [], [], [], []
    for s, ex in enumerate(contents, start=1):
        for p, (token, m) in enumerate(zip(ex["input_ids"].tolist(), ex["loss_mask"].tolist())):
            ids.append(token), response.append(m), segment.append(s), position.append(p), task.append(ex["task_type"])
    pad = max_length - len(ids)
    ids += [pad_id] * pad
    response += [0] * pad
    segment += [0] * pad
    position += [0] * pad
    task += [-1] * pad
    targets, loss = [], []
    for t in range(max_length):
        inside = t + 1 < max_length and segment[t] != 0 and segment[t + 1] == segment[t]
        targets.append(ids[t + 1] if inside else pad_id)
        loss.append(response[t + 1] if inside else 0)
    row = dict(input_ids=ids, targets=targets, loss_mask=loss, positions=position, segment_ids=segment, task_type=task)
    return {k: np.asarray(v, dtype=np.int32) for k, v in row.items()}


def packed_rows(examples, max_length, num_bins):
    source = grain.MapDataset.source(examples).to_iter_dataset()
    return list(pack_examples(source, max_length, num_bins=num_bins, pad_id=PAD))


@pytest.mark.parametrize("num_bins", [1, 4])
def test_packing_equals_the_plain_python_reference(num_bins):
    examples = make_examples(50, 24)
    rows, expected = packed_rows(examples, 24, num_bins), reference_rows(examples, 24, num_bins, PAD)
    assert len(rows) == len(expected)
    for row, ref in zip(rows, expected):
        assert set(row) == set(ROW_KEYS)
        for key in ROW_KEYS:
            assert row[key].dtype == np.int32 and row[key].shape == (24,)
            np.testing.assert_array_equal(row[key], ref[key], err_msg=key)


def test_segments_are_whole_examples_with_restarting_positions():
    examples = make_examples(40, 16, seed=1)
    rows = packed_rows(examples, 16, num_bins=3)
    seen = []
    for row in rows:
        seg = row["segment_ids"]
        used = seg != 0
        assert used[: used.sum()].all(), "padding only at the end"
        for s in range(1, seg.max() + 1):
            where = np.flatnonzero(seg == s)
            assert (np.diff(where) == 1).all(), "a segment is contiguous"
            np.testing.assert_array_equal(row["positions"][where], np.arange(len(where)))
            seen.append(tuple(row["input_ids"][where]))
            last = where[-1]
            assert row["loss_mask"][last] == 0 and row["targets"][last] == PAD, "no target across a boundary"
        assert (row["task_type"][~used] == -1).all() and (row["loss_mask"][~used] == 0).all()
    assert sorted(seen) == sorted(tuple(e["input_ids"]) for e in examples), "every example exactly once, whole"


def test_loss_mask_marks_targets_that_are_response_tokens():
    examples = make_examples(30, 20, seed=2)
    rows = packed_rows(examples, 20, num_bins=2)
    response_tokens = sum(int(e["loss_mask"].sum()) for e in examples)
    # The first token of an example is never a target, so every response token is learned exactly once
    # (responses never start at position 0 here because prompts have at least one token).
    assert sum(int(r["loss_mask"].sum()) for r in rows) == response_tokens


def test_padding_mode_puts_one_example_per_row():
    ex = {"input_ids": np.array([7, 8, 9, 10], np.int32), "loss_mask": np.array([0, 0, 1, 1], np.int32),
          "task_type": 1}  # fmt: skip
    row = pad_example(ex, 6, pad_id=PAD)
    np.testing.assert_array_equal(row["input_ids"], [7, 8, 9, 10, 0, 0])
    np.testing.assert_array_equal(row["targets"], [8, 9, 10, 0, 0, 0])
    np.testing.assert_array_equal(row["loss_mask"], [0, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(row["positions"], [0, 1, 2, 3, 0, 0])
    np.testing.assert_array_equal(row["segment_ids"], [1, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(row["task_type"], [1, 1, 1, 1, -1, -1])
    assert set(row) == set(ROW_KEYS)


def test_packing_iterator_state_resumes_exactly():
    examples = make_examples(60, 16, seed=3)
    source = grain.MapDataset.source(examples).to_iter_dataset()
    it = iter(pack_examples(source, 16, num_bins=4, pad_id=PAD))
    for _ in range(5):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(7)]
    it2 = iter(pack_examples(source, 16, num_bins=4, pad_id=PAD))
    it2.set_state(state)
    for row, ref in zip([next(it2) for _ in range(7)], expected):
        for key in ROW_KEYS:
            np.testing.assert_array_equal(row[key], ref[key])
