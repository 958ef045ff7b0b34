"""DataConfig validates its fields and names the field at fault."""

import pytest

from jaxmoelora.data import DataConfig
from jaxmoelora.errors import ConfigError


def test_defaults_are_valid_with_a_path_or_a_builder():
    assert DataConfig(path="x.jsonl").pack is True
    assert DataConfig(builder="gsm_symbolic").builder_size == 2000
    assert DataConfig(builder="bigbench:qa_wikidata").max_length == 512


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(), "path"),
        (dict(path="a.jsonl", builder="gsm_symbolic"), "path"),
        (dict(builder="squad"), "builder"),
        (dict(builder="bigbench:"), "builder"),
        (dict(builder="gsm_symbolic", builder_size=0), "builder_size"),
        (dict(path="a", eval_fraction=1.0), "eval_fraction"),
        (dict(path="a", eval_size=-1), "eval_size"),
        (dict(path="a", eval_size=10, eval_fraction=0.1), "eval_fraction"),
        (dict(path="a", max_length=1), "max_length"),
        (dict(path="a", overlong="wrap"), "overlong"),
        (dict(path="a", batch_size=0), "batch_size"),
        (dict(path="a", num_epochs=0), "num_epochs"),
        (dict(path="a", worker_count=-1), "worker_count"),
        (dict(path="a", chat_template="yes"), "chat_template"),
        (dict(path="a", prompt_template="Q: "), "prompt_template"),
        (dict(path="a", seed=1.5), "seed"),
    ],
)
def test_invalid_values_raise_naming_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        DataConfig(**kwargs)


def test_from_dict_rejects_unknown_keys():
    assert DataConfig.from_dict({"path": "a.jsonl", "batch_size": 4}).batch_size == 4
    with pytest.raises(ConfigError, match="batchsize"):
        DataConfig.from_dict({"path": "a.jsonl", "batchsize": 4})
