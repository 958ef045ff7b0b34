"""Training data: records -> tokens -> packed rows -> per-process batches (a grain pipeline).

    config = DataConfig(builder="gsm_symbolic", eval_size=200, max_length=512, batch_size=8)
    prepared = prepare_examples(config, tokenizer)          # tokenize once; prepared.stats.summary()
    dataset = make_dataset(config, tokenizer, prepared=prepared)
    iterator = iter(dataset)                                  # iterator.get_state() / set_state(state)
    batch = next(iterator)   # input_ids, targets, loss_mask, positions, segment_ids, task_type: (B_local, L)
    held_out = eval_examples(config)                          # raw records with `answer` for exact match
"""

from jaxmoelora.data.builders import bigbench_records, build_records, cache_dir, gsm_symbolic_records
from jaxmoelora.data.config import DataConfig
from jaxmoelora.data.packing import ROW_KEYS, pack_examples, pad_example
from jaxmoelora.data.pipeline import (
    PreparedSplit,
    eval_examples,
    load_records,
    make_dataset,
    prepare_examples,
    split_records,
)
from jaxmoelora.data.records import normalize_record, read_records
from jaxmoelora.data.tokenize import DataStats, tokenize_example

__all__ = [
    "ROW_KEYS",
    "DataConfig",
    "DataStats",
    "PreparedSplit",
    "bigbench_records",
    "build_records",
    "cache_dir",
    "eval_examples",
    "gsm_symbolic_records",
    "load_records",
    "make_dataset",
    "normalize_record",
    "pack_examples",
    "pad_example",
    "prepare_examples",
    "read_records",
    "split_records",
    "tokenize_example",
]
