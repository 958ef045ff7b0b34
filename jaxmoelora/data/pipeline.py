"""The training input pipeline: records -> held-out split -> tokens -> shuffled epochs -> rows -> batches.

    records (JSONL / Parquet / builder)          load_records, split_records
      -> tokenize_example, once per record       prepare_examples (DataStats: kept / truncated / dropped)
      -> grain.MapDataset.source(examples).shuffle(seed).repeat(num_epochs)
      -> .to_iter_dataset() -> first-fit packing (or one padded example per row)
      -> .batch(global batch) -> this process's slice of the rows

Sharding: every process builds the same global stream of rows and keeps rows
[process_index * local_batch, (process_index + 1) * local_batch) of each global batch. Each process's rows are
distinct, their concatenation in process order is exactly the one-process batch (so
`jax.make_array_from_process_local_data` assembles the same global batch for any process count), and the
iterator state does not depend on the process count, so a run can resume on a different number of hosts. The
price is that every process tokenizes and packs the whole dataset.

Batches are dicts of numpy arrays of shape (batch_size // process_count, max_length); the keys and their
meaning are in `packing.py`. A finite dataset's last batch is filled up with padding rows (segment_ids 0,
loss_mask 0), so no example is lost and shapes never change.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import grain
import numpy as np

from jaxmoelora.data.builders import build_records
from jaxmoelora.data.config import DataConfig
from jaxmoelora.data.packing import ROW_KEYS, empty_row, pack_examples, pad_example
from jaxmoelora.data.records import read_records
from jaxmoelora.data.tokenize import DataStats, tokenize_example
from jaxmoelora.errors import ConfigError, DataError

SPLITS = ("train", "eval")


@dataclass
class PreparedSplit:
    """A split's tokenized examples (`tokenize_example` outputs, dropped ones left out) and their counts."""

    examples: list[dict]
    stats: DataStats


def load_records(config: DataConfig) -> list[dict]:
    """Every normalised record of the configured data file(s) or built-in dataset, in file order."""
    if config.path is not None:
        return read_records(config.path)
    return build_records(config.builder, config.builder_size, config.split_seed)


def split_records(records: list[dict], config: DataConfig) -> tuple[list[dict], list[dict]]:
    """(train, eval): a held-out set of `eval_size` records or `eval_fraction` of them, chosen with
    `split_seed`; both keep the file order."""
    n = len(records)
    if config.eval_size is not None:
        n_eval = config.eval_size
    else:
        n_eval = int(round(config.eval_fraction * n))
        if config.eval_fraction > 0:
            n_eval = max(n_eval, 1)
    if n_eval == 0:
        return list(records), []
    if n_eval >= n:
        raise DataError(
            f"the held-out split takes {n_eval} of the {n} records and leaves none to train on; lower "
            "data.eval_size / data.eval_fraction"
        )
    held_out = np.zeros(n, dtype=bool)
    held_out[np.random.default_rng(config.split_seed).permutation(n)[:n_eval]] = True
    train = [r for r, h in zip(records, held_out) if not h]
    evaluation = [r for r, h in zip(records, held_out) if h]
    return train, evaluation


def eval_examples(config: DataConfig, split: str = "eval") -> list[dict]:
    """The raw normalised records of a split (default the held-out one), for exact-match evaluation.

    Each has `prompt`, `response`, `context`, `messages`, `task_type`, `answer` and `answers` (see records.py).
    """
    _check_split(split)
    train, evaluation = split_records(load_records(config), config)
    return train if split == "train" else evaluation


def prepare_examples(
    config: DataConfig, tokenizer, split: str = "train", *, records: list[dict] | None = None
) -> PreparedSplit:
    """Tokenizes a split once (`records` overrides loading it) and counts what was kept, cut and dropped."""
    if records is None:
        records = eval_examples(config, split)
    stats = DataStats(records=len(records))
    examples = []
    for record in records:
        example = tokenize_example(
            record,
            tokenizer,
            config.max_length,
            config.chat_template,
            config.overlong,
            prompt_template=config.prompt_template,
            stats=stats,
        )
        if example is not None:
            examples.append(example)
    return PreparedSplit(examples, stats)


def make_dataset(
    config: DataConfig,
    tokenizer,
    *,
    split: str = "train",
    process_index: int | None = None,
    process_count: int | None = None,
    prepared: PreparedSplit | None = None,
) -> grain.IterDataset:
    """A grain IterDataset of this process's batches (see the module docstring for the format).

    The train split is shuffled with `config.seed` (reshuffled every epoch) and repeated `num_epochs` times
    (None: forever); the eval split is read once, in order. `iter(dataset)` gives an iterator whose
    `get_state()` / `set_state()` resume it exactly. Pass `prepared` (from `prepare_examples`) to reuse a
    tokenization, e.g. one whose `stats` the trainer has already reported.
    """
    _check_split(split)
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ConfigError(f"process_index {process_index} is outside [0, process_count={process_count})")
    if config.batch_size % process_count:
        raise ConfigError(
            f"data.batch_size={config.batch_size} (the global batch) must be a multiple of the process count "
            f"{process_count}"
        )
    if prepared is None:
        prepared = prepare_examples(config, tokenizer, split)
    if not prepared.stats.records and not prepared.examples:
        raise DataError(f"the {split} split is empty; set data.eval_size or data.eval_fraction to hold records out")
    if not prepared.examples:
        raise DataError(
            f"the {split} split has no examples left to batch ({prepared.stats.summary()}); raise "
            "data.max_length or use data.overlong='truncate'"
        )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    training = split == "train"

    ds = grain.MapDataset.source(prepared.examples)
    if training and config.shuffle:
        ds = ds.shuffle(seed=config.seed)
    num_epochs = config.num_epochs if training else 1
    if num_epochs != 1:
        ds = ds.repeat(num_epochs)
    if not config.pack:
        ds = ds.map(functools.partial(pad_example, max_length=config.max_length, pad_id=pad_id))
    rows = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=64))
    if config.pack:
        rows = pack_examples(rows, config.max_length, num_bins=config.batch_size, pad_id=pad_id)
    local_batch = config.batch_size // process_count
    batches = rows.batch(
        config.batch_size,
        drop_remainder=False,
        batch_fn=functools.partial(
            _local_batch,
            batch_size=config.batch_size,
            start=process_index * local_batch,
            stop=(process_index + 1) * local_batch,
            max_length=config.max_length,
            pad_id=pad_id,
        ),
    )
    if config.worker_count > 0:
        _allow_unparsed_absl_flags()
        batches = batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.worker_count))
    return batches


def _local_batch(
    rows: list[dict], *, batch_size: int, start: int, stop: int, max_length: int, pad_id: int
) -> dict[str, np.ndarray]:
    """Rows [start, stop) of a global batch, stacked; a short (final) global batch is filled with padding."""
    rows = list(rows) + [empty_row(max_length, pad_id)] * (batch_size - len(rows))
    mine = rows[start:stop]
    return {key: np.stack([row[key] for row in mine]) for key in ROW_KEYS}


def _allow_unparsed_absl_flags() -> None:
    """grain <= 0.2.18 reads an absl flag in mp_prefetch that raises unless flags were parsed (google/grain#1355,
    fixed in #1362); scripts that do not run under absl.app get the flags' defaults instead."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; use one of {SPLITS}")
