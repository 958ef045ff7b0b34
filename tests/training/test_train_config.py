"""The experiment config: a YAML file plus `section.field=value` overrides on the preset of the chosen method; bad
fields stop `jaxmoelora train` at once, naming the field; the resolved config is kept with every checkpoint; every
shipped config loads."""

from __future__ import annotations

import time
from pathlib import Path

import jax
import pytest
import yaml

from jaxmoelora.cli import main
from jaxmoelora.errors import ConfigError
from jaxmoelora.training.checkpointing import AdapterCheckpointer
from jaxmoelora.training.config import CheckpointOptions, experiment_from_dict, load_experiment

CONFIGS = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))


def test_yaml_then_overrides_on_the_method_preset(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"output_dir": "runs/x", "model": {"path": "some/model"},
                                    "adapter": {"method": "loramoe", "num_experts": 4},
                                    "data": {"path": "train.jsonl", "batch_size": 4}, "train": {"steps": 50}}))
    config = load_experiment(path, ["train.steps=7", "adapter.rank=3", "mesh.data=2"])
    assert config.train.steps == 7 and config.adapter.rank == 3 and config.mesh.data == 2  # overrides win
    assert config.adapter.num_experts == 4 and config.data.batch_size == 4  # the file over the defaults
    assert config.adapter.lbc_weight == 0.1 and config.adapter.target_modules == ("gate_proj", "up_proj", "down_proj")
    switched = load_experiment(path, ["adapter.method=moelora"])  # another method's preset under the same file
    assert switched.adapter.top_k == 2 and switched.adapter.num_experts == 4 and switched.adapter.lbc_weight == 0.0


BAD = [
    (["train.stpes=3"], "train.stpes"),
    (["trian.steps=3"], "trian"),
    (["train.steps=abc"], "train.steps"),
    (["train.steps=0"], "train.steps"),
    (["train.learning_rate=-1"], "train.learning_rate"),
    (["mesh.data=0"], "mesh.data"),
    (["adapter.method=lorax"], "adapter.method"),
    (["adapter.top_k=9"], "adapter.top_k"),  # loramoe has 6 experts
    (["model.dtype=float13"], "model.dtype"),
    (["model.remat_policy=everything"], "model.remat_policy"),
    (["data.overlong=cut"], "data.overlong"),
    (["data.batch_size=6", "train.grad_accum_steps=4"], "train.grad_accum_steps"),
    (["mesh.data=3"], "mesh"),  # 3 devices on a 1-device machine: found by the trainer, before the model loads
    (["train.steps"], "train.steps=200"),  # not an override: the message shows the form
]


@pytest.mark.parametrize("overrides, field", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_field_stops_the_cli_at_once_naming_it(tiny_chat_model, arithmetic_jsonl, tmp_path, capsys, monkeypatch,
                                                    overrides, field):
    import jaxmoelora.loading.pretrained as pretrained

    monkeypatch.setattr(pretrained, "from_pretrained", lambda *a, **k: pytest.fail("the model was loaded"))
    monkeypatch.setattr(pretrained, "load_tokenizer", lambda *a, **k: pytest.fail("the tokenizer was loaded"))
    base = [f"model.path={tiny_chat_model}", f"data.path={arithmetic_jsonl}", f"output_dir={tmp_path / 'run'}",
            "adapter.method=loramoe"]
    compiled = []
    listener = lambda event, seconds, **kwargs: compiled.append(event) if "/compile/" in event else None  # noqa
    jax.monitoring.register_event_duration_secs_listener(listener)
    started = time.perf_counter()
    try:
        status = main(["train", *base, *overrides])
    finally:
        seconds = time.perf_counter() - started
        jax.monitoring.unregister_event_duration_listener(listener)
    error = capsys.readouterr().err
    assert status == 2 and error.startswith("error: ") and field in error, error
    assert seconds < 3, f"{seconds:.1f} s to reject the config"
    assert not compiled, f"jax traced or compiled before the error: {sorted(set(compiled))}"
    assert not (tmp_path / "run").exists()


def test_config_errors_are_config_errors():
    with pytest.raises(ConfigError, match="adapter.rnak"):
        load_experiment(None, ["adapter.rnak=4"])


def test_every_checkpoint_keeps_the_resolved_config(runs):
    run = runs.reference("loramoe")
    checkpointer = AdapterCheckpointer(run.checkpoints, CheckpointOptions())
    assert checkpointer.all_steps() == [6, 9, 12]
    for step in checkpointer.all_steps():
        saved = checkpointer.read_config(step)
        assert saved == run.config.to_dict()
        assert experiment_from_dict(saved) == run.config


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads_and_validates(path, tmp_path):
    config = load_experiment(path)
    if path.stem != "demo":
        assert config.adapter.method == path.stem
    resolved = tmp_path / "resolved.yaml"
    resolved.write_text(config.to_yaml())  # what a run prints and saves loads back to the same experiment
    assert load_experiment(resolved) == config


def test_there_is_a_config_per_method_and_a_demo():
    from jaxmoelora.adapters.config import METHODS

    assert {p.stem for p in CONFIGS} >= {*METHODS, "demo"}
