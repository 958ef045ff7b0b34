"""The training step: a pure function of (train state, frozen base, batch), jitted with explicit shardings.

Only the trainable adapter/router tree is differentiated; the frozen base is an input that is read and never written.
The global batch is split into `grad_accum_steps` micro-batches scanned in order, their gradients summed, and one
optimizer update applied, so a step means the same thing whatever the accumulation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxmoelora.adapters.apply import merge_model
from jaxmoelora.adapters.variables import AdapterState
from jaxmoelora.training.config import TrainOptions
from jaxmoelora.training.cross_entropy import head_cross_entropy
from jaxmoelora.training.optimizer import learning_rate_schedule

BATCH_KEYS = ("input_ids", "targets", "loss_mask", "positions", "segment_ids", "task_type")


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer updates done
    trainable: nnx.State  # experts and routers
    adapter_state: nnx.State  # non-trainable adapter state (SLIM clusters)
    opt_state: Any
    rng: jax.Array  # uint32[2]: the run's base key; step keys are folded from it


def token_loss(logits_btv: jax.Array, targets_bt: jax.Array, loss_mask_bt: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Summed cross-entropy over the masked (response) tokens, and their count."""
    ce_bt = optax.softmax_cross_entropy_with_integer_labels(logits_btv, targets_bt)
    mask_bt = loss_mask_bt.astype(jnp.float32)
    return jnp.sum(ce_bt * mask_bt), jnp.sum(mask_bt)


def forward(graphdef, trainable, adapter_state, frozen, batch: dict, rng: jax.Array | None, train: bool):
    """The model's output on a batch, and the model itself (to read back its adapter state)."""
    model = merge_model(graphdef, trainable, adapter_state, frozen)
    segment_ids_bt = batch["segment_ids"]
    output = model(batch["input_ids"], positions_bt=batch["positions"], attention_mask_bt=segment_ids_bt > 0,
                   segment_ids_bt=segment_ids_bt, train=train, rng=rng, task_type_bt=batch["task_type"])
    return output, model


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    options: TrainOptions) -> Callable:
    """`train_step(state, frozen, batch) -> (state, metrics)`, not yet jitted."""
    schedule = learning_rate_schedule(options, options.learning_rate)
    accum = options.grad_accum_steps

    def micro_loss(trainable, adapter_state, frozen, batch, rng, total_tokens):
        output, model = forward(graphdef, trainable, adapter_state, frozen, batch, rng, train=True)
        # The logits are never formed whole: the loss takes the final hidden states and the frozen head in chunks.
        ce_sum, _ = head_cross_entropy(output.hidden_btd, model.head_weight_vd(), batch["targets"], batch["loss_mask"])
        aux_total = sum(output.aux_losses.values()) if output.aux_losses else jnp.zeros(())
        loss = ce_sum / total_tokens + aux_total / accum
        return loss, (ce_sum, output.aux_losses, output.router_stats, nnx.state(model, AdapterState))

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def train_step(state: TrainState, frozen: nnx.State, batch: dict[str, jax.Array]):
        step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        total_tokens = jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)
        micro = jax.tree.map(lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:]), batch)

        def one_micro(carry, inputs):
            grads_acc, adapter_state = carry
            micro_batch, index = inputs
            (_, (ce_sum, aux, stats, adapter_state)), grads = grad_fn(
                state.trainable, adapter_state, frozen, micro_batch, jax.random.fold_in(step_key, index),
                total_tokens)
            grads_acc = jax.tree.map(jnp.add, grads_acc, grads)
            return (grads_acc, adapter_state), (ce_sum, aux, stats)

        zeros = jax.tree.map(jnp.zeros_like, state.trainable)
        (grads, adapter_state), (ce_sums, aux, stats) = jax.lax.scan(
            one_micro, (zeros, state.adapter_state), (micro, jnp.arange(accum)))
        updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        ce = jnp.sum(ce_sums) / total_tokens
        aux = jax.tree.map(jnp.mean, aux)
        metrics = {
            "loss": ce + (sum(aux.values()) if aux else 0.0),
            "ce": ce,
            **{f"aux/{name}": value for name, value in aux.items()},
            "grad_norm": optax.tree.norm(grads),
            "learning_rate": schedule(state.step),
            "tokens": jnp.sum(batch["segment_ids"] > 0),
            "loss_tokens": total_tokens,
            "router": jax.tree.map(lambda x: jnp.mean(x, axis=0), stats),
        }
        new_state = TrainState(state.step + 1, trainable, adapter_state, opt_state, state.rng)
        return new_state, metrics

    return train_step


def make_eval_loss(graphdef: nnx.GraphDef) -> Callable:
    """`eval_loss(trainable, adapter_state, frozen, batch) -> (ce_sum, tokens)` without training randomness."""

    def eval_loss(trainable, adapter_state, frozen, batch):
        output, _ = forward(graphdef, trainable, adapter_state, frozen, batch, None, train=False)
        return token_loss(output.logits_btv, batch["targets"], batch["loss_mask"])

    return eval_loss
