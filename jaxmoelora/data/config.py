"""`DataConfig`: where the training examples come from and how they become batches."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from jaxmoelora.errors import ConfigError

OVERLONG_POLICIES = ("truncate", "drop")
BUILDERS = ("gsm_symbolic", "bigbench:<task>")


@dataclass
class DataConfig:
    """The data side of a run. Exactly one of `path` or `builder` names the examples.

    Fields:
      path: a JSONL (`.jsonl`, `.jsonl.gz`, `.json`) or Parquet file, a directory of them, or a glob.
      builder: a built-in dataset, `gsm_symbolic` or `bigbench:<task>` (e.g. `bigbench:qa_wikidata`,
        `bigbench:elementary_math_qa/question_only`).
      builder_size: how many examples a builder makes (`gsm_symbolic`) or samples (`bigbench`); None = all
        of a BIG-bench task.
      eval_fraction / eval_size: the held-out split, as a fraction of the records or a count (not both).
      max_length: tokens per row; longer examples are handled by `overlong`.
      pack: pack several examples per row (first-fit); False pads one example per row.
      overlong: "truncate" cuts an example at `max_length` (the response loses its end); "drop" skips it.
      shuffle / seed: shuffle the training records with this seed (reshuffled each epoch).
      batch_size: the global batch in rows; each process reads `batch_size // process_count` of them.
      chat_template: render examples with the tokenizer's chat template; None = if the tokenizer has one.
      num_epochs: passes over the training records; None repeats forever.
      worker_count: grain worker processes (0 = in the main process). Examples are tokenized once up front, so
        workers only pack and batch, and cost ~10 s to start; the batch order depends on worker_count, so resume
        a run with the same value.
      prompt_template: without a chat template, the text before the response; `{prompt}` is the prompt,
        `{eos}` the tokenizer's EOS token. LoRAMoE's official format is `"{prompt}{eos}"`.
      split_seed: seeds the held-out split and the builders, apart from `seed`, so that runs with
        different shuffling seeds train and evaluate on the same records.
    """

    path: str | None = None
    builder: str | None = None
    builder_size: int | None = 2000
    eval_fraction: float = 0.0
    eval_size: int | None = None
    max_length: int = 512
    pack: bool = True
    overlong: str = "truncate"
    shuffle: bool = True
    seed: int = 0
    batch_size: int = 8
    chat_template: bool | None = None
    num_epochs: int | None = None
    worker_count: int = 0
    prompt_template: str = "{prompt}\n"
    split_seed: int = 0

    def __post_init__(self):
        if (self.path is None) == (self.builder is None):
            raise ConfigError(
                "data: set exactly one of `path` (a JSONL/Parquet file, directory or glob) or `builder` "
                f"({', '.join(BUILDERS)}); got path={self.path!r}, builder={self.builder!r}"
            )
        if self.builder is not None:
            name, _, task = self.builder.partition(":")
            if not (self.builder == "gsm_symbolic" or (name == "bigbench" and task.strip("/"))):
                raise ConfigError(
                    f"data.builder={self.builder!r} is not a built-in dataset; use one of {', '.join(BUILDERS)}, "
                    "e.g. `bigbench:qa_wikidata`"
                )
        if self.builder_size is not None and (not _is_int(self.builder_size) or self.builder_size < 1):
            raise ConfigError(f"data.builder_size must be a positive integer or None, got {self.builder_size!r}")
        if self.builder == "gsm_symbolic" and self.builder_size is None:
            raise ConfigError("data.builder_size must be set for gsm_symbolic (it generates that many problems)")
        if not isinstance(self.eval_fraction, (int, float)) or not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(f"data.eval_fraction must be in [0, 1), got {self.eval_fraction!r}")
        if self.eval_size is not None:
            if not _is_int(self.eval_size) or self.eval_size < 0:
                raise ConfigError(f"data.eval_size must be a non-negative integer or None, got {self.eval_size!r}")
            if self.eval_fraction:
                raise ConfigError(
                    f"data: set eval_fraction ({self.eval_fraction}) or eval_size ({self.eval_size}), not both"
                )
        if not _is_int(self.max_length) or self.max_length < 2:
            raise ConfigError(f"data.max_length must be an integer >= 2, got {self.max_length!r}")
        if self.overlong not in OVERLONG_POLICIES:
            raise ConfigError(f"data.overlong must be one of {OVERLONG_POLICIES}, got {self.overlong!r}")
        if not _is_int(self.batch_size) or self.batch_size < 1:
            raise ConfigError(f"data.batch_size must be a positive integer, got {self.batch_size!r}")
        if self.chat_template not in (None, True, False):
            raise ConfigError(f"data.chat_template must be true, false or null, got {self.chat_template!r}")
        if self.num_epochs is not None and (not _is_int(self.num_epochs) or self.num_epochs < 1):
            raise ConfigError(
                f"data.num_epochs must be a positive integer, or None to repeat forever; got {self.num_epochs!r}"
            )
        if not _is_int(self.worker_count) or self.worker_count < 0:
            raise ConfigError(f"data.worker_count must be a non-negative integer, got {self.worker_count!r}")
        if not isinstance(self.prompt_template, str) or "{prompt}" not in self.prompt_template:
            raise ConfigError(
                f"data.prompt_template must contain `{{prompt}}`, got {self.prompt_template!r} "
                '(e.g. "{prompt}\\n", or "{prompt}{eos}" for LoRAMoE\'s format)'
            )
        for name in ("seed", "split_seed"):
            if not _is_int(getattr(self, name)):
                raise ConfigError(f"data.{name} must be an integer, got {getattr(self, name)!r}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DataConfig:
        """Builds a config from a mapping (e.g. a YAML section), rejecting unknown keys by name."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"data: unknown field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**values)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)
