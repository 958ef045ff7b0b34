"""The training run: config -> mesh -> model with adapters -> data -> jitted steps -> checkpoints, metrics, plots."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxmoelora.errors import CheckpointError, ConfigError, JaxMoeLoraError
from jaxmoelora.training.config import DistributedOptions, ExperimentConfig

CHECKPOINT_SUBDIR = "checkpoints"


class TrainingDivergedError(JaxMoeLoraError):
    """The loss became NaN or infinite."""


@dataclasses.dataclass
class TrainResult:
    output_dir: Path
    step: int  # optimizer steps done
    stop_reason: str  # "completed", "interrupted", "stop_after", "data_exhausted"
    history: list[dict[str, float]]
    first_step_seconds: float | None  # compilation + first step
    eval_before: Any = None
    eval_after: Any = None
    plots: list[Path] = dataclasses.field(default_factory=list)
    checkpoint_dir: Path | None = None


def initialize_distributed(options: DistributedOptions) -> None:
    """`jax.distributed.initialize` when a multi-process run is configured (config or JAX_* environment)."""
    from jax._src import distributed as jax_distributed
    if jax_distributed.global_state.client is not None:
        return
    address = options.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    num = options.num_processes or (int(os.environ["JAX_NUM_PROCESSES"]) if "JAX_NUM_PROCESSES" in os.environ else None)
    pid = options.process_id if options.process_id is not None else (
        int(os.environ["JAX_PROCESS_ID"]) if "JAX_PROCESS_ID" in os.environ else None)
    if address or num:
        jax.distributed.initialize(coordinator_address=address, num_processes=num, process_id=pid)


class _StopSignals:
    """Turns SIGINT/SIGTERM into a flag so the loop can save a checkpoint and exit cleanly."""

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self):
        if sys.platform != "win32" and _in_main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _in_main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


def train(config: ExperimentConfig, *, stop_after: int | None = None, quiet: bool = False) -> TrainResult:
    """Runs (or resumes) the experiment. `stop_after` stops after that many optimizer steps in total, saving a
    checkpoint as an interrupted run would (used to test resuming)."""
    from flax import nnx

    from jaxmoelora.data import make_dataset, prepare_examples
    from jaxmoelora.loading.pretrained import from_pretrained, load_tokenizer
    from jaxmoelora.sharding.rules import batch_sharding, make_mesh
    from jaxmoelora.training.checkpointing import AdapterCheckpointer, abstract_like
    from jaxmoelora.training.compilation_cache import enable_compilation_cache
    from jaxmoelora.training.metrics import MetricsLogger, plot_run
    from jaxmoelora.training.optimizer import make_optimizer, optimizer_state_shardings, split_by_labels
    from jaxmoelora.training.step import BATCH_KEYS, TrainState, make_train_step

    initialize_distributed(config.distributed)
    enable_compilation_cache(config.train.compilation_cache_dir)
    is_main = jax.process_index() == 0
    say = (lambda text: print(text, flush=True)) if is_main and not quiet else (lambda text: None)
    output_dir = Path(config.output_dir).absolute()
    try:
        mesh = make_mesh(config.mesh.axis_sizes())
    except ValueError as e:
        raise ConfigError(f"mesh {config.mesh.axis_sizes()}: {e}; set the mesh.* sizes so that their product is "
                          f"the device count ({jax.device_count()}), or one of them to -1") from None
    options = config.train
    say(f"jaxmoelora: {jax.process_count()} process(es), {jax.device_count()} device(s), mesh "
        f"{dict(mesh.shape)}\nresolved config:\n{config.to_yaml()}")

    tokenizer = load_tokenizer(config.model.path)
    prepared = prepare_examples(config.data, tokenizer, "train")  # data errors show before the model loads
    say(f"data: {prepared.stats.summary()}")
    iterator = iter(make_dataset(config.data, tokenizer, prepared=prepared))
    model = from_pretrained(config.model.path, dtype=config.model.dtype, param_dtype=config.model.param_dtype,
                            mesh=mesh, scan_layers=config.model.scan_layers, remat=config.model.remat,
                            remat_policy=config.model.remat_policy,
                            adapter=config.adapter, adapter_seed=options.seed)
    graphdef, trainable, adapter_state, frozen = split_by_labels(model)
    del model
    trainable_count = sum(x.size for x in jax.tree.leaves(trainable))
    frozen_count = sum(x.size for x in jax.tree.leaves(frozen))
    say(f"trainable parameters: {trainable_count:,} ({100 * trainable_count / (trainable_count + frozen_count):.3f}%"
        f" of {trainable_count + frozen_count:,}); method {config.adapter.method}")

    tx = make_optimizer(options, trainable)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    with jax.set_mesh(mesh):
        opt_state = jax.jit(tx.init, out_shardings=optimizer_state_shardings(tx, trainable, replicated))(trainable)
    rng = jax.random.key_data(jax.random.key(options.seed))
    state = TrainState(jax.numpy.zeros((), jax.numpy.int32), trainable, adapter_state, opt_state, rng)
    # Every leaf on the mesh: the step counter and any leaf made outside it (on one device) are replicated, so the
    # jitted step sees one device set on any mesh and process count.
    state = jax.device_put(state, jax.tree.map(
        lambda x: x.sharding if isinstance(getattr(x, "sharding", None), jax.sharding.NamedSharding) else replicated,
        state))

    checkpointer = AdapterCheckpointer(output_dir / CHECKPOINT_SUBDIR, config.checkpoint)
    start_step = 0
    latest = checkpointer.latest_step() if config.checkpoint.resume else None
    if latest is not None:
        state, _ = checkpointer.restore(latest, abstract_like(state), iterator)
        start_step = int(state.step)
        say(f"resumed from {checkpointer.directory / str(latest)} at step {start_step}")

    state_shardings = jax.tree.map(lambda x: x.sharding, state)
    frozen_shardings = jax.tree.map(lambda x: x.sharding, frozen)
    data_sharding = batch_sharding(mesh)
    step_fn = jax.jit(make_train_step(graphdef, tx, options),
                      in_shardings=(state_shardings, frozen_shardings, data_sharding),
                      out_shardings=(state_shardings, None), donate_argnums=(0,))

    eval_before = eval_after = None
    eval_records = _eval_records(config) if config.eval.examples else []
    if eval_records:
        eval_before = _evaluate(graphdef, state, frozen, tokenizer, eval_records, config, say, "before training")

    logger = MetricsLogger(output_dir, total_steps=options.steps, start_step=start_step, enabled=is_main,
                           progress=config.log.progress and not quiet, tensorboard=config.log.tensorboard)
    end_step = options.steps if stop_after is None else min(stop_after, options.steps)
    stop_reason = "completed"
    first_step_seconds = None
    step = start_step
    last_saved = latest
    config_dict = config.to_dict()
    try:
        with _StopSignals() as signals, jax.set_mesh(mesh):
            while step < end_step:
                try:
                    local = next(iterator)
                except StopIteration:
                    stop_reason = "data_exhausted"
                    logger.message(f"the training data ran out after step {step} (data.num_epochs="
                                   f"{config.data.num_epochs}); stopping")
                    break
                batch = {k: jax.make_array_from_process_local_data(data_sharding, np.asarray(local[k]))
                         for k in BATCH_KEYS}
                started = time.perf_counter()
                state, metrics = step_fn(state, frozen, batch)
                metrics = jax.device_get(metrics)
                seconds = time.perf_counter() - started
                if first_step_seconds is None:
                    first_step_seconds = seconds
                step += 1
                if not math.isfinite(float(metrics["loss"])):
                    checkpointer.wait()
                    good = checkpointer.latest_step()
                    where = (f"The last good checkpoint is {checkpointer.directory / str(good)} (step {good}); "
                             if good is not None else "No checkpoint was saved before it; ")
                    raise TrainingDivergedError(
                        f"the loss became {float(metrics['loss'])} at step {step}; stopping. {where}lower "
                        "train.learning_rate or set train.grad_clip, then run again"
                        + (" to resume from it" if good is not None else ""))
                if step % config.log.every == 0 or step == end_step:
                    logger.log(step, metrics, seconds)
                if step % config.checkpoint.save_every == 0 and step < end_step:
                    checkpointer.save(step, state, iterator, config_dict)
                    last_saved = step
                if signals.received is not None:
                    stop_reason = "interrupted"
                    logger.message(f"received signal {signals.received}: saving a checkpoint at step {step} and "
                                   "exiting; run the same command again to resume")
                    break
            if stop_after is not None and step == end_step < options.steps:
                stop_reason = "stop_after"
            if step > 0 and last_saved != step:
                checkpointer.save(step, state, iterator, config_dict, force=True)
            checkpointer.wait()
    finally:
        with contextlib.suppress(CheckpointError):
            checkpointer.wait()
        checkpointer.close()
        logger.close()

    if eval_records and stop_reason in ("completed", "data_exhausted"):
        eval_after = _evaluate(graphdef, state, frozen, tokenizer, eval_records, config, say, "after training")
        if eval_before is not None:
            say(f"held-out exact match: {eval_before.accuracy:.1%} before -> {eval_after.accuracy:.1%} after "
                f"({eval_after.total} problems)")
            if eval_after.expects_format:
                say(f"answers given in the training format (#### N): {eval_before.formatted}/{eval_before.total} "
                    f"before -> {eval_after.formatted}/{eval_after.total} after")
        for sample in eval_after.samples[:config.eval.show]:
            say(f"--- {'correct' if sample['correct'] else 'wrong'} (gold {sample['gold']})\n"
                f"Q: {sample['prompt']}\nA: {sample['generation']}")
    plots = plot_run(logger.history, output_dir) if is_main and config.log.plots else []
    result = TrainResult(output_dir, step, stop_reason, logger.history, first_step_seconds, eval_before,
                         eval_after, plots, checkpointer.directory)
    _print_summary(result, config, say)
    return result


def _eval_records(config: ExperimentConfig) -> list[dict]:
    from jaxmoelora.data import eval_examples
    return eval_examples(config.data, "eval")[:config.eval.examples]


def _evaluate(graphdef, state, frozen, tokenizer, records, config, say, when: str):
    from jaxmoelora.adapters.apply import merge_model
    from jaxmoelora.training.evaluation import exact_match
    model = merge_model(graphdef, state.trainable, state.adapter_state, frozen)
    started = time.perf_counter()
    result = exact_match(model, tokenizer, records, config.data, max_new_tokens=config.eval.max_new_tokens,
                         batch_size=config.eval.batch_size)
    say(f"exact match {when}: {result.accuracy:.1%} ({result.correct}/{result.total}) "
        f"in {time.perf_counter() - started:.0f} s")
    return result


def _print_summary(result: TrainResult, config: ExperimentConfig, say) -> None:
    if not result.history:
        return
    last = result.history[-1]
    tokens_per_s = [h["tokens_per_s"] for h in result.history[1:]] or [last["tokens_per_s"]]
    lines = [f"finished at step {result.step} ({result.stop_reason}); loss {last['loss']:.4f}; "
             f"median {np.median(tokens_per_s):.0f} tokens/s; first step (with compilation) "
             f"{result.first_step_seconds or 0:.1f} s",
             f"checkpoints: {result.checkpoint_dir}",
             f"metrics: {result.output_dir / 'metrics.jsonl'} (TensorBoard: {result.output_dir / 'tensorboard'})"]
    lines += [f"plot: {p}" for p in result.plots]
    lines.append(f"resume or continue: jaxmoelora train <config> output_dir={config.output_dir} "
                 f"train.steps=<more steps>")
    say("\n".join(lines))
