"""A trained model rebuilt from a run's checkpoint: the base model named in the saved config, with the adapter it
trained and the adapter weights of the chosen step."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from jaxmoelora.adapters.config import AdapterConfig
from jaxmoelora.errors import CheckpointError, JaxMoeLoraError
from jaxmoelora.models.decoder import CausalLM
from jaxmoelora.training.config import CheckpointOptions, ModelOptions, TrainOptions
from jaxmoelora.training.trainer import CHECKPOINT_SUBDIR


@dataclasses.dataclass(frozen=True)
class RunCheckpoint:
    """One step of a training run and the parts of the run's saved config that rebuild its model."""

    directory: Path  # the run's checkpoints/ directory
    step: int
    model: ModelOptions
    adapter: AdapterConfig
    train: TrainOptions


def find_run_checkpoint(run_dir: str | Path, step: int | None = None) -> RunCheckpoint:
    """The checkpoint of `step` (default: the newest) in a run's output_dir or its checkpoints/ directory."""
    from jaxmoelora.training.checkpointing import AdapterCheckpointer

    directory = _checkpoint_directory(Path(run_dir))
    checkpointer = AdapterCheckpointer(directory, CheckpointOptions(async_save=False))
    try:
        steps = checkpointer.all_steps()
        if not steps:
            raise CheckpointError(f"{directory} holds no complete checkpoint; train until one is saved "
                                  "(checkpoint.save_every steps, or the end of the run)")
        step = max(steps) if step is None else step
        if step not in steps:
            raise CheckpointError(f"{directory} has no checkpoint of step {step}; its steps are {sorted(steps)}")
        values = checkpointer.read_config(step)
    finally:
        checkpointer.close()
    try:
        return RunCheckpoint(directory, step, ModelOptions(**values["model"]),
                             AdapterConfig.from_dict(values["adapter"]), TrainOptions(**values["train"]))
    except JaxMoeLoraError:
        raise
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"the config saved with step {step} in {directory} cannot be read ({e}); it was "
                              "written by another version of jaxmoelora") from e


def restore_model(checkpoint: RunCheckpoint) -> CausalLM:
    """The run's base model (read from the model.path in its config) with the adapter of `checkpoint`, on one
    device."""
    import jax
    from flax import nnx

    from jaxmoelora.loading.pretrained import from_pretrained
    from jaxmoelora.sharding.rules import make_mesh
    from jaxmoelora.training.checkpointing import AdapterCheckpointer
    from jaxmoelora.training.optimizer import split_by_labels

    options = checkpoint.model
    mesh = make_mesh({"data": 1}, devices=jax.local_devices()[:1])
    model = from_pretrained(options.path, dtype=options.dtype, param_dtype=options.param_dtype, mesh=mesh,
                            scan_layers=options.scan_layers, adapter=checkpoint.adapter,
                            adapter_seed=checkpoint.train.seed)
    _, trainable, adapter_state, _ = split_by_labels(model)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                            _train_state_shapes(checkpoint.train, trainable, adapter_state))
    checkpointer = AdapterCheckpointer(checkpoint.directory, CheckpointOptions(async_save=False))
    try:
        state = checkpointer.restore_state(checkpoint.step, abstract)
    finally:
        checkpointer.close()
    nnx.update(model, state.trainable, state.adapter_state)
    return model


def _train_state_shapes(options: TrainOptions, trainable: Any, adapter_state: Any) -> Any:
    """The shapes of the trainer's `TrainState` (its optimizer state included): the tree a checkpoint restores into."""
    import jax
    import jax.numpy as jnp

    from jaxmoelora.training.optimizer import make_optimizer
    from jaxmoelora.training.step import TrainState

    tx = make_optimizer(options, trainable)
    return jax.eval_shape(lambda t, s: TrainState(jnp.zeros((), jnp.int32), t, s, tx.init(t),
                                                  jax.random.key_data(jax.random.key(options.seed))),
                          trainable, adapter_state)


def _checkpoint_directory(run_dir: Path) -> Path:
    if (run_dir / CHECKPOINT_SUBDIR).is_dir():
        return (run_dir / CHECKPOINT_SUBDIR).absolute()
    if run_dir.is_dir() and any(p.name.isdigit() for p in run_dir.iterdir()):
        return run_dir.absolute()
    raise CheckpointError(f"{run_dir} is not a training run: it has no {CHECKPOINT_SUBDIR}/ directory; pass the "
                          "output_dir of a `jaxmoelora train` run")
