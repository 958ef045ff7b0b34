"""Adapter-only checkpoints with orbax: the train state (adapters, routers, adapter state, optimizer state, step, RNG),
the data iterator's position and the resolved config. Never the frozen base.

Saves are asynchronous and atomic (orbax writes to a temporary directory and renames it when complete, so an
interrupted save is never taken as a checkpoint); the newest `keep` are kept. Restoring takes target shardings, so a
checkpoint restores onto another mesh or device count.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from jaxmoelora.errors import CheckpointError
from jaxmoelora.training.config import CheckpointOptions


class AdapterCheckpointer:
    def __init__(self, directory: str | Path, options: CheckpointOptions):
        self.directory = Path(directory).absolute()
        manager_options = ocp.CheckpointManagerOptions(
            max_to_keep=options.keep, enable_async_checkpointing=options.async_save, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=manager_options,
                                             item_names=("state", "data", "config"))
        self._writing: int | None = None  # the step whose asynchronous save may still be in flight

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, data_iterator, config: dict, *, force: bool = False) -> bool:
        """Starts an (asynchronous) save; a failure is raised as CheckpointError and earlier checkpoints stay.
        The previous save is finished first, so its failure is reported under its own step."""
        self.wait()
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  data=grain.checkpoint.CheckpointSave(data_iterator),
                                  config=ocp.args.JsonSave(config))
        try:
            saved = self.manager.save(step, args=args, force=force)
        except Exception as e:
            raise CheckpointError(f"saving the checkpoint of step {step} into {self.directory} failed: {e}; "
                                  f"the earlier checkpoints {self.all_steps()} are intact") from e
        self._writing = step if saved else None
        return saved

    def wait(self) -> None:
        step, self._writing = self._writing, None
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            what = f"the checkpoint of step {step}" if step is not None else "a checkpoint"
            raise CheckpointError(f"writing {what} into {self.directory} failed: {e}; the earlier checkpoints "
                                  f"{self.all_steps()} are intact") from e

    def restore(self, step: int, abstract_state: Any, data_iterator) -> tuple[Any, dict]:
        """The train state placed on the shardings of `abstract_state` (ShapeDtypeStructs with shardings); the data
        iterator is moved to the saved position in place; returns (state, saved config)."""
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                  data=grain.checkpoint.CheckpointRestore(data_iterator),
                                  config=ocp.args.JsonRestore())
        try:
            restored = self.manager.restore(step, args=args)
        except Exception as e:
            raise CheckpointError(f"cannot restore step {step} from {self.directory}: {e}") from e
        return restored["state"], restored["config"]

    def restore_state(self, step: int, abstract_state: Any) -> Any:
        """The train state alone (the data iterator's position is left unread), on `abstract_state`'s shardings."""
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state)))
        except Exception as e:
            raise CheckpointError(f"cannot restore step {step} from {self.directory}: {e}") from e
        return restored["state"]

    def read_config(self, step: int) -> dict:
        path = self.directory / str(step) / "config" / "metadata"
        if path.is_file():
            return json.loads(path.read_text())
        restored = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        return restored["config"]

    def close(self) -> None:
        self.manager.close()


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs with the shardings of `tree`'s arrays: the restore target for the same placement."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def checkpoint_bytes(directory: str | Path, step: int) -> int:
    return sum(p.stat().st_size for p in (Path(directory) / str(step)).rglob("*") if p.is_file())
