"""Rows of `max_length` tokens: several examples packed per row (first-fit), or one example padded per row.

Every row, packed or padded, is a dict of numpy arrays of shape (max_length,):
  input_ids    int32  token ids; `pad_id` on padding
  targets      int32  next-token targets: targets[t] = input_ids[t+1] inside a segment, `pad_id` at a segment's
                      last token and on padding
  loss_mask    int32  aligned with targets: 1 where targets[t] is a response token of the same segment
  positions    int32  position within the segment, restarting at 0 (0 on padding)
  segment_ids  int32  1..k for the k examples in the row, 0 on padding (attention stays within a segment)
  task_type    int32  the segment's task type on its tokens, -1 on padding

Packing is grain's `FirstFitPackIterDataset` (bins filled in order, all bins emitted once an example fits in
none; bins are not shuffled), so the row stream is deterministic and its iterator state is checkpointable.
"""

from __future__ import annotations

import functools

import grain
import numpy as np

ROW_KEYS = ("input_ids", "targets", "loss_mask", "positions", "segment_ids", "task_type")


def next_token_row(
    input_ids: np.ndarray,
    response_mask: np.ndarray,
    segment_ids: np.ndarray,
    positions: np.ndarray,
    task_type: np.ndarray,
    pad_id: int,
) -> dict[str, np.ndarray]:
    """The row's next-token targets and loss mask from per-token arrays; targets never cross segments."""
    same_segment = np.zeros(input_ids.shape, dtype=bool)
    same_segment[:-1] = (segment_ids[1:] == segment_ids[:-1]) & (segment_ids[:-1] != 0)
    next_ids = np.roll(input_ids, -1)
    next_is_response = np.roll(response_mask, -1) != 0
    return {
        "input_ids": input_ids.astype(np.int32),
        "targets": np.where(same_segment, next_ids, pad_id).astype(np.int32),
        "loss_mask": (same_segment & next_is_response).astype(np.int32),
        "positions": positions.astype(np.int32),
        "segment_ids": segment_ids.astype(np.int32),
        "task_type": task_type.astype(np.int32),
    }


def pad_example(example: dict, max_length: int, pad_id: int) -> dict[str, np.ndarray]:
    """One tokenized example (at most `max_length` tokens) as a padded row."""
    n = len(example["input_ids"])
    if n > max_length:
        raise ValueError(f"example of {n} tokens is longer than max_length={max_length}; tokenize_example cuts it")
    input_ids = np.full(max_length, pad_id, dtype=np.int32)
    input_ids[:n] = example["input_ids"]
    response_mask = np.zeros(max_length, dtype=np.int32)
    response_mask[:n] = example["loss_mask"]
    segment_ids = np.zeros(max_length, dtype=np.int32)
    segment_ids[:n] = 1
    positions = np.zeros(max_length, dtype=np.int32)
    positions[:n] = np.arange(n)
    task_type = np.full(max_length, -1, dtype=np.int32)
    task_type[:n] = example["task_type"]
    return next_token_row(input_ids, response_mask, segment_ids, positions, task_type, pad_id)


def empty_row(max_length: int, pad_id: int) -> dict[str, np.ndarray]:
    """A row of padding only (fills the last, partial batch of a finite dataset)."""
    zeros = np.zeros(max_length, dtype=np.int32)
    return next_token_row(
        np.full(max_length, pad_id, np.int32), zeros, zeros, zeros, np.full(max_length, -1, np.int32), pad_id
    )


def _packable(example: dict) -> dict[str, np.ndarray]:
    n = len(example["input_ids"])
    return {
        "input_ids": np.asarray(example["input_ids"], dtype=np.int32),
        "response_mask": np.asarray(example["loss_mask"], dtype=np.int32),
        "task_type": np.full(n, example["task_type"], dtype=np.int32),
    }


def _packed_to_row(packed: dict, pad_id: int) -> dict[str, np.ndarray]:
    return next_token_row(
        packed["input_ids"],
        packed["response_mask"],
        packed["input_ids_segment_ids"],
        packed["input_ids_positions"],
        packed["task_type"],
        pad_id,
    )


def pack_examples(examples: grain.IterDataset, max_length: int, *, num_bins: int, pad_id: int) -> grain.IterDataset:
    """First-fit packs tokenized examples (`tokenize_example` outputs) into rows of `max_length` tokens.

    `num_bins` rows are filled at a time: each example goes to the first of them with room, and once one fits
    in none, all of them are emitted in order. More bins pack tighter; the pipeline uses the global batch size.
    """
    packed = grain.experimental.FirstFitPackIterDataset(
        examples.map(_packable),
        length_struct={"input_ids": max_length, "response_mask": max_length, "task_type": max_length},
        num_packing_bins=num_bins,
        shuffle_bins=False,
        padding_struct={"input_ids": pad_id, "response_mask": 0, "task_type": -1},
    )
    return packed.map(functools.partial(_packed_to_row, pad_id=pad_id))
