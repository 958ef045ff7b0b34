"""AdaptedLinear (plain LoRA, LoRAMoE, MoELoRA, MoRAL, HydraLoRA) equals a per-token, per-expert loop written as the
papers write it:

    y = W0 x + s * sum_e w_e(x) B_e A_e dropout_e(x)

with w = softmax(W_g x) (dense), or the top-k of it (zeros elsewhere; divided by their sum when renormalised).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxmoelora.adapters.config import AdapterConfig
from jaxmoelora.adapters.fast_random import expert_keep_masks, mask_seed
from jaxmoelora.adapters.lora_linear import AdaptedLinear, expert_dropout
from jaxmoelora.adapters.routing import topk_weights
from jaxmoelora.models.layers import Linear

from adapter_helpers import TOL, context, f64, normal, np_softmax, randomize_lora_b

D_IN, D_OUT, SHAPE = 24, 20, (2, 7)


def make_linear(config: AdapterConfig, *, num_experts, top_k, shared_a=False, router_scale=1.0) -> AdaptedLinear:
    base = Linear(D_IN, D_OUT, axes=("embed", "mlp"), use_bias=False, dtype=jnp.float32, param_dtype=jnp.float32,
                  rngs=nnx.Rngs(0))
    module = AdaptedLinear(base, "mlp.up_proj", config, num_experts=num_experts, top_k=top_k, shared_a=shared_a,
                           rngs=nnx.Rngs(1), layers=None)
    randomize_lora_b(module)
    if module.router is not None:  # sharper than kaiming init, so that top-k choices are clear
        module.router.set_value(module.router[...] * router_scale)
    return module


def reference_forward(x_btd, w0_df, a_edr, b_erf, router_de, scaling, top_k, renormalize, x_per_expert=None):
    """Loop over tokens and experts. `x_per_expert[e]` is the (dropped-out) input expert e sees; A may be shared."""
    x_btd, w0_df, a_edr, b_erf = f64(x_btd), f64(w0_df), f64(a_edr), f64(b_erf)
    num_experts = b_erf.shape[0]
    y_btf = x_btd @ w0_df
    for b in range(x_btd.shape[0]):
        for t in range(x_btd.shape[1]):
            x = x_btd[b, t]
            if router_de is None:
                weights = np.ones(1)
            else:
                probs = np_softmax(x @ f64(router_de))
                if top_k:
                    chosen = np.argsort(-probs)[:top_k]
                    weights = np.zeros(num_experts)
                    weights[chosen] = probs[chosen] / (probs[chosen].sum() if renormalize else 1.0)
                else:
                    weights = probs
            for e in range(num_experts):
                a_dr = a_edr[e if a_edr.shape[0] > 1 else 0]
                x_e = x if x_per_expert is None else f64(x_per_expert[e, b, t])
                y_btf[b, t] += weights[e] * scaling * (x_e @ a_dr) @ b_erf[e]
    return y_btf


CASES = {
    "lora": (AdapterConfig(target_modules=("up_proj",), rank=4, alpha=8.0), 1, 0, False),
    "loramoe_dense": (AdapterConfig(method="loramoe", target_modules=("up_proj",), rank=4, alpha=32.0,
                                    num_experts=6), 6, 0, False),
    "moelora_top2_renormalized": (AdapterConfig(method="moelora", target_modules=("up_proj",), rank=4, alpha=8.0,
                                                num_experts=8, top_k=2, renormalize_topk=True), 8, 2, False),
    "moral_top3_raw_softmax": (AdapterConfig(method="moral", target_modules=("up_proj",), rank=3, alpha=6.0,
                                             num_experts=5, top_k=3, renormalize_topk=False), 5, 3, False),
    "hydralora_shared_a": (AdapterConfig(method="hydralora", target_modules=("up_proj",), rank=4, alpha=32.0,
                                         num_experts=4, shared_a=True), 4, 0, True),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_equals_the_per_expert_loop(case):
    config, num_experts, top_k, shared_a = CASES[case]
    module = make_linear(config, num_experts=num_experts, top_k=top_k, shared_a=shared_a, router_scale=4.0)
    x_btd = normal(2, (*SHAPE, D_IN))
    expected = reference_forward(x_btd, module.base.kernel[...], module.experts.lora_a[...],
                                 module.experts.lora_b[...], None if module.router is None else module.router[...],
                                 config.scaling, top_k, config.renormalize_topk)
    for ctx in (None, context(train=False, shape=SHAPE), context(train=True, shape=SHAPE)):  # no dropout here
        np.testing.assert_allclose(module(x_btd, ctx), expected, **TOL)
    assert module.experts.lora_a.shape[0] == (1 if shared_a else num_experts)


@pytest.mark.parametrize("case", ["loramoe_dense", "hydralora_shared_a", "moelora_top2_renormalized"])
def test_training_dropout_is_resampled_for_every_expert(case):
    config, num_experts, top_k, shared_a = CASES[case]
    config = config.replace(dropout=0.3)
    module = make_linear(config, num_experts=num_experts, top_k=top_k, shared_a=shared_a, router_scale=4.0)
    x_btd = normal(3, (*SHAPE, D_IN))
    ctx = context(train=True, shape=SHAPE, seed=5)
    x_ebtd = expert_dropout(ctx.key_for("mlp.up_proj/dropout"), x_btd, 0.3, num_experts)
    expected = reference_forward(x_btd, module.base.kernel[...], module.experts.lora_a[...],
                                 module.experts.lora_b[...], module.router[...], config.scaling, top_k,
                                 config.renormalize_topk, x_per_expert=x_ebtd)
    np.testing.assert_allclose(module(x_btd, ctx), expected, **TOL)
    dropped_e = np.asarray(x_ebtd == 0).reshape(num_experts, -1)
    assert all(not np.array_equal(dropped_e[0], dropped_e[e]) for e in range(1, num_experts)), "masks are shared"
    # At evaluation the adapter sees the clean input.
    clean = reference_forward(x_btd, module.base.kernel[...], module.experts.lora_a[...], module.experts.lora_b[...],
                              module.router[...], config.scaling, top_k, config.renormalize_topk)
    np.testing.assert_allclose(module(x_btd, context(train=False, shape=SHAPE)), clean, **TOL)


def test_expert_dropout_keeps_each_entry_with_probability_one_minus_rate_and_rescales():
    x_btd = jnp.ones((4, 64, 32))
    x_ebtd = np.asarray(expert_dropout(jax.random.key(0), x_btd, 0.25, 6))
    assert set(np.unique(x_ebtd)) <= {0.0, np.float32(1 / 0.75)}
    assert abs((x_ebtd == 0).mean() - 0.25) < 0.01
    for e in range(1, 6):
        assert abs((x_ebtd[0] != x_ebtd[e]).mean() - 2 * 0.25 * 0.75) < 0.01  # independent: differ in 2 p (1 - p)
    next_step = np.asarray(expert_dropout(jax.random.key(1), x_btd, 0.25, 6))
    assert abs((next_step != x_ebtd).mean() - 2 * 0.25 * 0.75) < 0.01


def test_dropout_masks_of_a_time_window_are_that_window_of_the_whole_inputs_masks():
    # The chunked dropout loop asks for windows of the masks; they must be the masks of the whole input.
    seed = mask_seed(jax.random.key(7))
    whole = [np.asarray(m) for m in expert_keep_masks(seed, 5, 0.7, (3, 12, 8))]
    for start, size in ((0, 4), (4, 4), (8, 4), (6, 3)):
        window = expert_keep_masks(seed, 5, 0.7, (3, 12, 8), jnp.uint32(start), size)
        for e in range(5):
            np.testing.assert_array_equal(np.asarray(window[e]), whole[e][:, start:start + size])


@pytest.mark.parametrize("renormalize", [True, False])
def test_top_k_keeps_the_largest_probabilities_and_renormalises_as_configured(renormalize):
    probs_bte = jax.nn.softmax(3.0 * normal(4, (3, 5, 8)), axis=-1)
    weights_bte, weights_btk, index_btk = topk_weights(probs_bte, 2, renormalize)
    probs = np.asarray(probs_bte)
    for b in range(3):
        for t in range(5):
            best = np.argsort(-probs[b, t])[:2]
            np.testing.assert_array_equal(index_btk[b, t], best)
            kept = probs[b, t, best] / (probs[b, t, best].sum() if renormalize else 1.0)
            np.testing.assert_allclose(weights_btk[b, t], kept, **TOL)
            dense = np.zeros(8)
            dense[best] = kept
            np.testing.assert_allclose(weights_bte[b, t], dense, **TOL)
    assert np.allclose(np.asarray(weights_bte).sum(-1), 1.0) == renormalize


def test_zero_b_adds_nothing_to_the_frozen_projection():
    config = CASES["loramoe_dense"][0]
    module = AdaptedLinear(Linear(D_IN, D_OUT, axes=("embed", "mlp"), use_bias=True, dtype=jnp.float32,
                                  param_dtype=jnp.float32, rngs=nnx.Rngs(0)),
                           "mlp.up_proj", config.replace(dropout=0.1), num_experts=6, top_k=0, shared_a=False,
                           rngs=nnx.Rngs(1), layers=None)
    x_btd = normal(5, (*SHAPE, D_IN))
    base = module.base(x_btd)
    np.testing.assert_array_equal(module(x_btd, context(train=True, shape=SHAPE)), base)
    np.testing.assert_array_equal(module(x_btd, context(train=False, shape=SHAPE)), base)


def test_initialisation_follows_the_official_code():
    """A and the router kaiming-uniform(a=sqrt 5) = U(-1/sqrt(d_in), 1/sqrt(d_in)); B zero (LoRAMoE [code])."""
    config = CASES["loramoe_dense"][0]
    module = AdaptedLinear(Linear(256, 64, axes=("embed", "mlp"), use_bias=False, dtype=jnp.float32,
                                  param_dtype=jnp.float32, rngs=nnx.Rngs(0)),
                           "mlp.up_proj", config, num_experts=6, top_k=0, shared_a=False, rngs=nnx.Rngs(1), layers=None)
    bound = 1 / 16
    for w in (module.experts.lora_a[...], module.router[...]):
        assert np.abs(w).max() <= bound and np.abs(w).max() > 0.9 * bound
        assert abs(float(np.std(w)) - bound / np.sqrt(3)) < 0.1 * bound
    assert not np.any(module.experts.lora_b[...])
    assert module.router[...].dtype == jnp.float32
    assert not np.array_equal(module.experts.lora_a[...][0], module.experts.lora_a[...][1]), "experts differ"


def loop_forward_jnp(x_btd, w0_df, a_edr, b_erf, router_de, scaling, keep_ebtd=None, rate=0.0):
    """The dense mixture as a plain loop over experts in jnp, differentiated by JAX's own rules; expert e sees
    x * keep_e / (1 - rate) when keep masks are given."""
    y_btf = x_btd @ w0_df
    weights_bte = jax.nn.softmax(x_btd @ router_de, axis=-1)
    for e in range(b_erf.shape[0]):
        x_e = x_btd if keep_ebtd is None else jnp.where(keep_ebtd[e], x_btd / (1.0 - rate), 0.0)
        y_btf = y_btf + weights_bte[..., e:e + 1] * scaling * ((x_e @ a_edr[e % a_edr.shape[0]]) @ b_erf[e])
    return y_btf


@pytest.mark.parametrize("case", ["loramoe_dense", "hydralora_shared_a"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_gradients_equal_those_of_the_per_expert_loop(case, dropout):
    """The experts' hand-written backward (masks recomputed from the seed, gradients ordered for XLA:CPU) gives JAX's
    gradients of the plain loop for every input: A, B, router and x; with per-expert dropout too."""
    config, num_experts, top_k, shared_a = CASES[case]
    config = config.replace(dropout=dropout)
    module = make_linear(config, num_experts=num_experts, top_k=top_k, shared_a=shared_a, router_scale=4.0)
    x_btd = normal(4, (*SHAPE, D_IN))
    cotangent_btf = normal(5, (*SHAPE, D_OUT))
    w0_df = module.base.kernel[...]
    graphdef, state = nnx.split(module)
    ctx = context(train=True, shape=SHAPE, seed=7)
    keep_ebtd = None
    if dropout:
        keep_ebtd = expert_dropout(ctx.key_for("mlp.up_proj/dropout"), jnp.ones_like(x_btd), dropout, num_experts) > 0

    def ours(state, x_btd):
        return jnp.sum(nnx.merge(graphdef, state)(x_btd, ctx) * cotangent_btf)

    def reference(a_edr, b_erf, router_de, x_btd):
        return jnp.sum(loop_forward_jnp(x_btd, w0_df, a_edr, b_erf, router_de, config.scaling, keep_ebtd, dropout)
                       * cotangent_btf)

    expected = jax.grad(reference, argnums=(0, 1, 2, 3))(module.experts.lora_a[...], module.experts.lora_b[...],
                                                         module.router[...], x_btd)
    grad_state, grad_x = jax.grad(ours, argnums=(0, 1))(state, x_btd)
    got = (grad_state["experts"]["lora_a"][...], grad_state["experts"]["lora_b"][...], grad_state["router"][...],
           grad_x)
    for name, g, e in zip(("A", "B", "router", "x"), got, expected):
        assert float(jnp.max(jnp.abs(e))) > 0, name
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5, err_msg=name)
