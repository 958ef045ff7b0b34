"""Bad input and faults: each gets a message that says what and where, and nothing already saved is lost (the run
resumes from the last good checkpoint with the uninterrupted run's losses)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import pytest
from training_helpers import losses, subprocess_env, write_arithmetic_jsonl

from jaxmoelora.cli import main
from jaxmoelora.errors import CheckpointError
from jaxmoelora.training.checkpointing import AdapterCheckpointer
from jaxmoelora.training.config import CheckpointOptions, load_experiment
from jaxmoelora.training.trainer import TrainingDivergedError, train


def saved_steps(output_dir: Path) -> list[int]:
    return AdapterCheckpointer(output_dir / "checkpoints", CheckpointOptions()).all_steps()


def with_lines(path: Path, *lines: str) -> Path:
    """The arithmetic records with `lines` written after the first two."""
    records = write_arithmetic_jsonl(path.with_suffix(".base")).read_text().splitlines()
    path.write_text("\n".join([*records[:2], *lines, *records[2:]]) + "\n")
    return path


# ----------------------------------------------------------------------------------------------------------------------
# Bad data


def test_malformed_jsonl_line_through_the_cli_names_file_and_line(runs, tmp_path, compilation_cache):
    data = with_lines(tmp_path / "broken.jsonl", '{"prompt": "1+1=", "response": "2"')  # line 3, no closing brace
    overrides = runs.overrides("lora", tmp_path / "run")
    overrides = [o if not o.startswith("data.path=") else f"data.path={data}" for o in overrides]
    done = subprocess.run([sys.executable, "-m", "jaxmoelora.cli", "train", *overrides], capture_output=True, text=True,
                          env=subprocess_env(compilation_cache), timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    error = done.stderr.strip().splitlines()[-1]
    assert error.startswith("error: ") and f"{data}, line 3: malformed JSON" in error, done.stderr[-3000:]
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("content, message", [
    ("", "is empty"),
    ('{"prompt": "1+1="}\n', "line 1: no accepted field set in the record (fields: ['prompt'])"),
    ('{"prompt": "1+1=", "response": 2}\n', "line 1: field 'response' must be a string, got int"),
], ids=["empty", "missing-response", "wrong-type"])
def test_unusable_dataset_stops_with_a_message_before_the_model_loads(runs, tmp_path, capsys, monkeypatch, content,
                                                                      message):
    import jaxmoelora.loading.pretrained as pretrained

    monkeypatch.setattr(pretrained, "from_pretrained", lambda *a, **k: pytest.fail("the model was loaded"))
    data = tmp_path / "data.jsonl"
    data.write_text(content)
    overrides = [o if not o.startswith("data.path=") else f"data.path={data}"
                 for o in runs.overrides("lora", tmp_path / "run")]
    assert main(["train", *overrides]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and str(data) in error and message in error, error


@pytest.mark.parametrize("policy, reported", [("truncate", "4 truncated, 0 dropped"), ("drop", "0 truncated, 4 dropped")])
def test_overlong_records_are_truncated_or_dropped_and_counted_in_the_output(runs, tmp_path, capsys, policy, reported):
    long = json.dumps({"prompt": "Spell it out:", "response": "one two three four five six seven " * 4})
    data = with_lines(tmp_path / "long.jsonl", long, long, long, long)
    overrides = [o if not o.startswith("data.path=") else f"data.path={data}"
                 for o in runs.overrides("lora", tmp_path / "run", f"data.overlong={policy}")]
    result = train(load_experiment(None, overrides), stop_after=1)
    assert result.step == 1
    out = capsys.readouterr().out
    examples = 68 if policy == "truncate" else 64
    assert f"data: 68 records -> {examples} examples" in out and reported in out, out


# ----------------------------------------------------------------------------------------------------------------------
# Divergence


@pytest.mark.parametrize("first_bad_step", [5, 1])
def test_nan_loss_stops_the_run_and_the_last_good_checkpoint_resumes(runs, tmp_path, monkeypatch, first_bad_step):
    """From `first_bad_step` on the step's loss and weights become NaN: the run stops there with TrainingDivergedError
    naming the last good checkpoint (step 3) or saying there is none, saves nothing of the diverged state, and a
    rerun resumes exactly."""
    import jaxmoelora.training.step as step_module

    reference = runs.reference("lora")
    real_make_train_step = step_module.make_train_step

    def diverging_make_train_step(graphdef, tx, options):
        real_step = real_make_train_step(graphdef, tx, options)

        def train_step(state, frozen, batch):
            new_state, metrics = real_step(state, frozen, batch)
            poison = state.step >= first_bad_step - 1
            trainable = jax_tree_where(poison, new_state.trainable)
            return new_state.replace(trainable=trainable), {**metrics, "loss": jnp.where(poison, jnp.nan,
                                                                                          metrics["loss"])}
        return train_step

    monkeypatch.setattr(step_module, "make_train_step", diverging_make_train_step)
    config = load_experiment(None, runs.overrides("lora", tmp_path))
    with pytest.raises(TrainingDivergedError) as error:
        train(config, quiet=True)
    message = str(error.value)
    assert f"the loss became nan at step {first_bad_step}" in message and "learning_rate" in message
    good = [3] if first_bad_step > 3 else []
    assert saved_steps(tmp_path) == good
    if good:
        assert f"{tmp_path / 'checkpoints' / '3'} (step 3)" in message
    else:
        assert "No checkpoint was saved" in message
    metrics_file = tmp_path / "metrics.jsonl"
    logged = [json.loads(line)["step"] for line in metrics_file.read_text().splitlines()] if metrics_file.exists() else []
    assert logged == list(range(1, first_bad_step))

    monkeypatch.undo()
    resumed = train(config, quiet=True)
    assert losses(resumed.history) == reference.losses


def jax_tree_where(condition, tree):
    import jax
    return jax.tree.map(lambda x: jnp.where(condition, jnp.nan, x), tree)


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoint faults


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_failed_checkpoint_write_is_reported_and_earlier_checkpoints_stay_valid(runs, tmp_path, monkeypatch,
                                                                                async_save):
    """Writing step 6 fails (a full disk, as orbax's own writer sees it): the run stops with CheckpointError, step 3
    stays the newest valid checkpoint, and a rerun resumes from it exactly."""
    from orbax.checkpoint._src.handlers import json_checkpoint_handler

    reference = runs.reference("lora")
    real_save = json_checkpoint_handler.JsonCheckpointHandler._save_fn

    async def failing_save(self, item, directory):
        if Path(directory).parent.name.split(".")[0] == "6":
            raise OSError(28, "No space left on device")
        return await real_save(self, item, directory)

    monkeypatch.setattr(json_checkpoint_handler.JsonCheckpointHandler, "_save_fn", failing_save)
    config = load_experiment(None, runs.overrides("lora", tmp_path, f"checkpoint.async_save={str(async_save).lower()}"))
    with pytest.raises(CheckpointError) as error:
        train(config, quiet=True)
    message = str(error.value)  # an asynchronous write fails in the background; still reported under its step
    assert "checkpoint of step 6" in message and "No space left on device" in message
    assert f"{tmp_path / 'checkpoints'} failed" in message and "checkpoints [3] are intact" in message
    assert saved_steps(tmp_path) == [3]

    monkeypatch.undo()
    resumed = train(config, quiet=True)
    assert losses(resumed.history) == reference.losses


def test_checkpoint_left_unfinished_by_a_crash_is_not_resumed_from(runs, tmp_path):
    """A crash while writing step 6 leaves orbax's temporary directory; resuming ignores it and continues from
    step 5 (the newest finished checkpoint) with the uninterrupted run's losses."""
    reference = runs.reference("lora")
    config = load_experiment(None, runs.overrides("lora", tmp_path))
    assert train(config, stop_after=5, quiet=True).step == 5
    partial = tmp_path / "checkpoints" / "6.orbax-checkpoint-tmp-1764000000000000"
    shutil.copytree(tmp_path / "checkpoints" / "5", partial)
    for marker in partial.rglob("*"):  # as if the crash came before orbax finalised anything
        if marker.name in ("commit_success.txt", "_CHECKPOINT_METADATA", "manifest.ocdbt"):
            marker.unlink()
    assert saved_steps(tmp_path) == [3, 5]

    resumed = train(config, quiet=True)
    assert resumed.step == 12 and losses(resumed.history) == reference.losses
