"""What trains and how: one label per parameter decides it, and optax follows the labels.

`parameter_labels` is the single place that decides what trains: expert factors -> "adapter", routers -> "router",
non-trainable adapter state -> "state", everything else (the base model) -> "frozen". The model is split along these
labels; only the "adapter" and "router" leaves are differentiated and handed to the optimizer, whose
`optax.partition` gives each label its transform, so the base never has gradients or optimizer state.
"""

from __future__ import annotations

import jax
import optax
from flax import nnx

from jaxmoelora.adapters.variables import AdapterState, ExpertParam, RouterParam
from jaxmoelora.training.config import TrainOptions

TRAINABLE_LABELS = ("adapter", "router")


def variable_label(variable: nnx.Variable) -> str:
    if isinstance(variable, RouterParam):
        return "router"
    if isinstance(variable, (ExpertParam, nnx.LoRAParam)):
        return "adapter"
    if isinstance(variable, AdapterState):
        return "state"
    return "frozen"


def parameter_labels(model: nnx.Module) -> nnx.State:
    """A label for every variable of the model (same tree as `nnx.state(model)`)."""
    return jax.tree.map(variable_label, nnx.state(model), is_leaf=lambda x: isinstance(x, nnx.Variable))


def split_by_labels(model: nnx.Module):
    """(graphdef, trainable, adapter_state, frozen) following `variable_label`."""
    trainable = lambda path, v: variable_label(v) in TRAINABLE_LABELS  # noqa: E731
    state = lambda path, v: variable_label(v) == "state"  # noqa: E731
    return nnx.split(model, trainable, state, ...)


def learning_rate_schedule(options: TrainOptions, peak: float) -> optax.Schedule:
    warmup = options.warmup
    decay_steps = max(options.steps - warmup, 1)
    if options.schedule == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps)
    elif options.schedule == "linear":
        decay = optax.linear_schedule(peak, 0.0, decay_steps)
    else:
        decay = optax.constant_schedule(peak)
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def make_optimizer(options: TrainOptions, trainable: nnx.State) -> optax.GradientTransformation:
    """AdamW on expert factors and routers (routers optionally at their own rate), after global-norm clipping;
    `trainable` is the tree the optimizer will see (adapter and router leaves only)."""

    def adamw(peak: float) -> optax.GradientTransformation:
        return optax.adamw(learning_rate_schedule(options, peak), b1=options.adam_b1, b2=options.adam_b2,
                           weight_decay=options.weight_decay)

    labels = jax.tree.map(variable_label, trainable, is_leaf=lambda x: isinstance(x, nnx.Variable))
    router_peak = options.router_learning_rate or options.learning_rate
    partitioned = optax.partition({"adapter": adamw(options.learning_rate), "router": adamw(router_peak)}, labels)
    if options.grad_clip:
        return optax.chain(optax.clip_by_global_norm(options.grad_clip), partitioned)
    return partitioned


def optimizer_state_shardings(tx: optax.GradientTransformation, trainable: nnx.State, default):
    """Where each optimizer-state leaf lives: a leaf shaped like a trainable parameter (AdamW's moments), found by the
    parameter's path at the end of its own, takes that parameter's sharding; the rest (step counts) take `default`.
    So the optimizer state is sharded like the adapters rather than replicated on every device."""
    params = {jax.tree_util.keystr(path): x for path, x in jax.tree_util.tree_leaves_with_path(trainable)}

    def sharding(path, leaf):
        for start in range(len(path)):
            param = params.get(jax.tree_util.keystr(path[start:]))
            if param is not None and param.shape == leaf.shape:
                return param.sharding
        return default

    return jax.tree_util.tree_map_with_path(sharding, jax.eval_shape(tx.init, trainable))
