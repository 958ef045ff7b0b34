"""Adapters on a whole (tiny) model, for every preset:

- with B at its zero initialisation the logits are exactly the base model's, in evaluation and in training;
- one jitted training step (split_model, then jax.grad of cross-entropy plus the auxiliary losses with every state an
  argument) gives gradients for the adapter and router parameters only: the gradient tree holds nnx.LoRAParam leaves
  and nothing of the frozen base, and once B is nonzero every expert and router of every layer gets a nonzero one;
- the auxiliary losses each method names appear, finite; SLIM's clusters move in training only;
- plain LoRA merges into the base kernel and unmerges back.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxmoelora
from jaxmoelora.adapters.apply import merge_model, split_model
from jaxmoelora.adapters.variables import AdapterState, ExpertParam, RouterParam
from jaxmoelora.errors import ConfigError
from jaxmoelora.models.decoder import init_model

from adapter_helpers import TINY, TOL, normal, randomize_lora_b

BATCH, SEQ = 4, 24
EXPECTED_AUX = {"lora": set(), "loramoe": {"lbc"}, "moelora": {"load_balance", "contrastive"}, "slim": {"l1"},
                "moral": {"load_balance"}, "mixlora": {"load_balance"}, "hydralora": set()}


def batch():
    rng = np.random.default_rng(0)
    ids_bt = jnp.asarray(rng.integers(1, TINY.vocab_size, (BATCH, SEQ)), jnp.int32)
    mask_bt = np.ones((BATCH, SEQ), bool)
    mask_bt[1, 18:] = False
    task_bt = jnp.asarray(np.where(mask_bt, np.array([[1], [0], [0], [1]]), -1), jnp.int32)
    return ids_bt, jnp.asarray(mask_bt), task_bt


def cross_entropy(logits_btv, ids_bt, mask_bt):
    log_probs = jax.nn.log_softmax(logits_btv[:, :-1], axis=-1)
    nll_bt = -jnp.take_along_axis(log_probs, ids_bt[:, 1:, None], axis=-1)[..., 0]
    weight_bt = mask_bt[:, 1:].astype(jnp.float32)
    return jnp.sum(nll_bt * weight_bt) / jnp.sum(weight_bt)


@functools.partial(jax.jit, static_argnums=0)
def train_and_eval_step(graphdef, trainable, adapter_state, base, ids_bt, mask_bt, task_bt, key):
    """Gradients of CE + aux w.r.t. the trainable adapters, with the training logits, losses and the adapter state
    after the training forward; then an evaluation forward and the adapter state after it."""

    def loss_fn(trainable):
        model = merge_model(graphdef, trainable, adapter_state, base)
        out = model(ids_bt, attention_mask_bt=mask_bt, train=True, rng=key, task_type_bt=task_bt)
        loss = cross_entropy(out.logits_btv, ids_bt, mask_bt) + sum(out.aux_losses.values())
        return loss, (out.logits_btv, out.aux_losses, out.router_stats, nnx.state(model, AdapterState))

    grads, (train_logits, aux, stats, state_after_train) = jax.grad(loss_fn, has_aux=True)(trainable)
    model = merge_model(graphdef, trainable, adapter_state, base)
    eval_logits = model(ids_bt, attention_mask_bt=mask_bt).logits_btv
    return grads, train_logits, aux, stats, state_after_train, eval_logits, nnx.state(model, AdapterState)


@functools.cache
def base_logits():
    graphdef, state = nnx.split(init_model(TINY))
    ids_bt, mask_bt, _ = batch()
    return jax.jit(lambda s: nnx.merge(graphdef, s)(ids_bt, attention_mask_bt=mask_bt).logits_btv)(state)


def adapted_model(name):
    model = jaxmoelora.apply_adapters(init_model(TINY), name)
    if name == "slim":  # clusters near the data, so the LoRA experts get tokens too and yielding is partial
        centres = model.layers.mlp.cluster_centres
        centres.set_value(0.1 * centres[...])
    return model


def sharpen_routers(model, scale=3.0):
    """Random routers sharper than their initialisation, so that the tokens of the test batch reach every expert."""
    state = nnx.state(model, RouterParam)
    for i, (_, variable) in enumerate(nnx.to_flat_state(state)):
        shape = variable.get_value().shape
        variable.set_value(normal(100 + i, shape, scale / np.sqrt(shape[-2])))
    nnx.update(model, state)


def expert_slices(path, grad):
    """(layer, expert) slices of a gradient leaf: experts on axis 1 of A/B stacks, on the last axis of routers."""
    g = np.asarray(grad)
    if path[-1] == "router":
        g = np.moveaxis(g, -1, 1)
    return [(layer, e, g[layer, e]) for layer in range(g.shape[0]) for e in range(g.shape[1])]


@pytest.mark.parametrize("name", sorted(jaxmoelora.PRESETS))
def test_preset_on_a_model(name):
    model = adapted_model(name)
    ids_bt, mask_bt, task_bt = batch()
    key = jax.random.key(0)

    # Zero B: the base model's logits exactly.
    graphdef, trainable, adapter_state, base = split_model(model)
    grads, train_logits, aux, _, _, eval_logits, _ = train_and_eval_step(graphdef, trainable, adapter_state, base,
                                                                       ids_bt, mask_bt, task_bt, key)
    np.testing.assert_array_equal(eval_logits, base_logits())
    # The training forward runs inside jax.grad, which XLA compiles as another program (other fusions, other
    # rounding of the base computation), so it is compared to a tolerance.
    np.testing.assert_allclose(train_logits, base_logits(), **TOL)
    assert set(aux) == EXPECTED_AUX[name]
    assert all(np.isfinite(float(v)) for v in aux.values())

    # Nonzero B: gradients for every adapter and router parameter, of every expert and layer, and nothing else.
    randomize_lora_b(model, scale=0.2)
    sharpen_routers(model)
    graphdef, trainable, adapter_state, base = split_model(model)
    grads, train_logits, aux, stats, state_after_train, eval_logits, state_after_eval = train_and_eval_step(
        graphdef, trainable, adapter_state, base, ids_bt, mask_bt, task_bt, key)
    for module, module_stats in stats.items():  # the precondition: the batch reaches every expert
        assert np.all(np.asarray(module_stats["load_share"]) > 0), (module, module_stats["load_share"])
    assert not np.allclose(eval_logits, base_logits())
    grad_variables = nnx.to_flat_state(grads)
    assert [p for p, _ in grad_variables] == [p for p, _ in nnx.to_flat_state(trainable)]
    for path, variable in grad_variables:
        assert isinstance(variable, (ExpertParam, RouterParam)), (path, type(variable))
        assert path[-1] in ("lora_a", "lora_b", "router"), path
        for layer, expert, g in expert_slices(path, variable.get_value()):
            assert np.all(np.isfinite(g)) and np.any(g != 0), f"no gradient for {path} layer {layer} expert {expert}"
    base_paths = {p for p, _ in nnx.to_flat_state(base)}
    assert base_paths and not base_paths & {p for p, _ in grad_variables}

    # SLIM's clusters move in training, not in evaluation.
    before = nnx.to_flat_state(adapter_state)
    if name == "slim":
        assert before
        for (path, old), (_, trained), (_, evaluated) in zip(before, nnx.to_flat_state(state_after_train),
                                                             nnx.to_flat_state(state_after_eval)):
            assert not np.array_equal(trained.get_value(), old.get_value()), path
            np.testing.assert_array_equal(evaluated.get_value(), old.get_value())
    else:
        assert not before


def test_router_statistics_are_per_layer_shares():
    model = adapted_model("slim")
    ids_bt, mask_bt, _ = batch()
    graphdef, state = nnx.split(model)
    out = jax.jit(lambda s: nnx.merge(graphdef, s)(ids_bt, attention_mask_bt=mask_bt))(state)
    stats = out.router_stats["mlp"]
    np.testing.assert_allclose(jnp.sum(stats["load_share"], axis=-1), np.ones(TINY.num_layers), **TOL)
    np.testing.assert_allclose(jnp.sum(stats["top1_share"], axis=-1), np.ones(TINY.num_layers), **TOL)
    assert stats["identity_share"].shape == (TINY.num_layers,)
    assert np.all((stats["identity_share"] >= 0) & (stats["identity_share"] <= 1))
    assert np.all(stats["router_entropy"] > 0) and np.all(stats["router_entropy"] <= np.log(10) + 1e-5)


def test_plain_lora_merges_into_the_kernel_and_unmerges_back():
    model = jaxmoelora.apply_adapters(init_model(TINY), jaxmoelora.preset("lora", target_modules=("q_proj", "down_proj")))
    randomize_lora_b(model, scale=0.5)
    ids_bt, mask_bt, _ = batch()

    def logits():
        graphdef, state = nnx.split(model)
        return jax.jit(lambda s: nnx.merge(graphdef, s)(ids_bt, attention_mask_bt=mask_bt).logits_btv)(state)

    kernel_before = np.asarray(model.layers.self_attn.q_proj.base.kernel[...])
    unmerged = logits()
    jaxmoelora.merge_lora(model)
    assert model.layers.self_attn.q_proj.merged
    assert not np.allclose(model.layers.self_attn.q_proj.base.kernel[...], kernel_before)
    np.testing.assert_allclose(logits(), unmerged, **TOL)
    jaxmoelora.unmerge_lora(model)
    np.testing.assert_allclose(model.layers.self_attn.q_proj.base.kernel[...], kernel_before, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(logits(), unmerged, **TOL)


def test_a_routed_mixture_cannot_be_merged():
    model = jaxmoelora.apply_adapters(init_model(TINY), "loramoe")
    with pytest.raises(ConfigError, match="has a router"):
        jaxmoelora.merge_lora(model)
